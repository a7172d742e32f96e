//! A TCP relay that adds latency, standing in for `tc netem`, which this kernel lacks
//! (CONFIG_NET_SCH_NETEM is off; `tbf` is available and shapes the rate on the veth pair).
//!
//! Each accepted connection waits one round trip before it is forwarded (the TCP handshake a
//! distant server would cost), then every chunk read in either direction is written out half a
//! round trip later. Memory per connection is bounded (64 chunks of 64 KiB per direction).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::EnvError;

const CHUNK: usize = 64 * 1024;
const IN_FLIGHT_CHUNKS: usize = 64;

/// Open connections by id, so that stopping the relay can cut them.
type Conns = Arc<Mutex<HashMap<u64, (TcpStream, TcpStream)>>>;

/// Accepts on `listener` until `stop` is set, relaying each connection to `upstream` with the
/// given round-trip time added. Blocks the calling thread.
pub fn serve(listener: TcpListener, upstream: SocketAddr, rtt: Duration, stop: Arc<AtomicBool>) {
    serve_tracked(
        listener,
        upstream,
        rtt,
        stop,
        Arc::default(),
        Arc::default(),
    );
}

fn serve_tracked(
    listener: TcpListener,
    upstream: SocketAddr,
    rtt: Duration,
    stop: Arc<AtomicBool>,
    conns: Conns,
    down: Arc<AtomicU64>,
) {
    // Non-blocking accept so the stop flag is noticed; poll wakes at once for a connection.
    // (A fixed sleep between accept attempts added up to its length to every new connection,
    // a delay the link being emulated does not have.)
    if let Err(e) = listener.set_nonblocking(true) {
        tracing::error!(error = %e, "relay: cannot make the listener non-blocking");
        return;
    }
    let mut next_id = 0u64;
    while !stop.load(Ordering::Relaxed) {
        use std::os::fd::AsFd;
        let mut fds = [nix::poll::PollFd::new(
            listener.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(50u8)) {
            Ok(0) => continue,
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                tracing::warn!(error = %e, "relay: poll failed");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        match listener.accept() {
            Ok((client, _)) => {
                let (conns, down) = (conns.clone(), down.clone());
                next_id += 1;
                let id = next_id;
                let _ = std::thread::Builder::new()
                    .name("relay-conn".into())
                    .spawn(move || handle(id, client, upstream, rtt, conns, down));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                tracing::warn!(error = %e, "relay: accept failed");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn handle(
    id: u64,
    client: TcpStream,
    upstream: SocketAddr,
    rtt: Duration,
    conns: Conns,
    down: Arc<AtomicU64>,
) {
    if client.set_nonblocking(false).is_err() {
        return;
    }
    std::thread::sleep(rtt);
    let Ok(server) = TcpStream::connect_timeout(&upstream, Duration::from_secs(5)) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let clones = (
        client.try_clone(),
        server.try_clone(),
        client.try_clone(),
        server.try_clone(),
    );
    let (Ok(c2), Ok(s2), Ok(c3), Ok(s3)) = clones else {
        return;
    };
    if let Ok(mut map) = conns.lock() {
        map.insert(id, (c3, s3));
    }
    let half = rtt / 2;
    let up = std::thread::spawn(move || pipe(client, server, half, None));
    pipe(s2, c2, half, Some(&down));
    let _ = up.join();
    if let Ok(mut map) = conns.lock() {
        map.remove(&id);
    }
}

/// Copies `from` to `to`, each chunk delayed by `delay` after it was read, adding what it
/// read to `count`.
fn pipe(mut from: TcpStream, mut to: TcpStream, delay: Duration, count: Option<&AtomicU64>) {
    let (tx, rx) = sync_channel::<(Instant, Vec<u8>)>(IN_FLIGHT_CHUNKS);
    let writer = std::thread::spawn(move || {
        for (due, data) in rx {
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if to.write_all(&data).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
    let mut buf = vec![0u8; CHUNK];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let Some(data) = buf.get(..n) else { break };
                if let Some(c) = count {
                    c.fetch_add(n as u64, Ordering::Relaxed);
                }
                if tx.send((Instant::now() + delay, data.to_vec())).is_err() {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.join();
}

/// A relay running on a thread of this process, optionally inside a network namespace.
pub struct Relay {
    stop: Arc<AtomicBool>,
    conns: Conns,
    down: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
    addr: SocketAddr,
}

impl Relay {
    /// Listens on `listen` inside the named network namespace (`ip netns` name; `None` for the
    /// current one) and relays to `upstream`, which is resolved in that namespace too.
    pub fn start(
        netns: Option<&str>,
        listen: SocketAddr,
        upstream: SocketAddr,
        rtt: Duration,
    ) -> Result<Relay, EnvError> {
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Conns = Arc::default();
        let down: Arc<AtomicU64> = Arc::default();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<SocketAddr, EnvError>>();
        let netns = netns.map(str::to_string);
        let (stop2, conns2, down2) = (stop.clone(), conns.clone(), down.clone());
        let thread = std::thread::Builder::new()
            .name("relay-accept".into())
            .spawn(move || {
                // setns(CLONE_NEWNET) changes only this thread; the connection threads it
                // spawns inherit the namespace, so upstream sockets are created inside it.
                if let Some(ns) = &netns {
                    let path = format!("/run/netns/{ns}");
                    let entered = std::fs::File::open(&path)
                        .map_err(|e| EnvError::io(format!("opening {path}"), e))
                        .and_then(|f| {
                            nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
                                .map_err(|e| EnvError::Shaping(format!("entering netns {ns}: {e}")))
                        });
                    if let Err(e) = entered {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                }
                let listener = match TcpListener::bind(listen) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ =
                            ready_tx.send(Err(EnvError::io(format!("relay: binding {listen}"), e)));
                        return;
                    }
                };
                let addr = listener.local_addr().unwrap_or(listen);
                let _ = ready_tx.send(Ok(addr));
                serve_tracked(listener, upstream, rtt, stop2, conns2, down2);
            })
            .map_err(|e| EnvError::io("spawning the relay thread", e))?;
        let addr = ready_rx
            .recv()
            .map_err(|_| EnvError::Shaping("relay thread ended before listening".into()))??;
        Ok(Relay {
            stop,
            conns,
            down,
            thread: Some(thread),
            addr,
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Bytes relayed from upstream to clients so far (what crossed the emulated link towards
    /// its clients).
    pub fn bytes_down(&self) -> u64 {
        self.down.load(Ordering::Relaxed)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Ok(map) = self.conns.lock() {
            for (a, b) in map.values() {
                let _ = a.shutdown(Shutdown::Both);
                let _ = b.shutdown(Shutdown::Both);
            }
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
