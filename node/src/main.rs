//! `talaria-node`: serves the Talaria snapshotter to containerd over a unix socket.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use talaria_node::service::serve_unix;
use talaria_node::snapshotter::Snapshotter;
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;

#[derive(Parser, Debug)]
#[command(version, about = "Talaria node agent: a containerd proxy snapshotter")]
struct Args {
    /// Directory for snapshots and metadata.
    #[arg(
        long,
        env = "TALARIA_NODE_ROOT",
        default_value = "/var/lib/talaria-node"
    )]
    root: PathBuf,
    /// Unix socket to serve containerd's snapshots API on.
    #[arg(
        long,
        env = "TALARIA_NODE_SOCKET",
        default_value = "/run/talaria/snapshotter.sock"
    )]
    socket: PathBuf,
    /// Log filter (tracing env-filter syntax), e.g. "info" or "talaria_node=debug".
    #[arg(long, env = "TALARIA_NODE_LOG", default_value = "info")]
    log: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&args.log).context("--log")?)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let root = args.root.clone();
    let sn = tokio::task::spawn_blocking(move || Snapshotter::open(&root))
        .await
        .context("opening the snapshotter")?
        .with_context(|| format!("opening snapshotter root {}", args.root.display()))?;
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: shutting down"),
            _ = int.recv() => info!("SIGINT: shutting down"),
        }
    };
    info!(root = %args.root.display(), socket = %args.socket.display(), "serving");
    serve_unix(Arc::new(sn), &args.socket, shutdown)
        .await
        .with_context(|| format!("serving on {}", args.socket.display()))?;
    info!("stopped");
    Ok(())
}
