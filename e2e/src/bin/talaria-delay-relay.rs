//! Relays TCP connections with added latency (stand-in for `tc netem`, missing from this
//! kernel). Used by hack/netem-registry.sh inside a network namespace.
//!
//! Usage: talaria-delay-relay LISTEN_ADDR UPSTREAM_ADDR RTT_MS

use std::net::{SocketAddr, TcpListener};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, upstream, rtt] = args.as_slice() else {
        eprintln!("usage: talaria-delay-relay LISTEN_ADDR UPSTREAM_ADDR RTT_MS");
        return ExitCode::from(2);
    };
    let (Ok(listen), Ok(upstream), Ok(rtt)) = (
        listen.parse::<SocketAddr>(),
        upstream.parse::<SocketAddr>(),
        rtt.parse::<u64>(),
    ) else {
        eprintln!("talaria-delay-relay: bad arguments {args:?}");
        return ExitCode::from(2);
    };
    let listener = match TcpListener::bind(listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("talaria-delay-relay: binding {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!("talaria-delay-relay: {listen} -> {upstream}, +{rtt} ms round trip");
    talaria_testenv::relay::serve(
        listener,
        upstream,
        Duration::from_millis(rtt),
        Arc::new(AtomicBool::new(false)),
    );
    ExitCode::SUCCESS
}
