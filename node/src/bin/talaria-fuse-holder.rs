//! `talaria-fuse-holder`: keeps talaria-node's FUSE connections open while the agent is
//! gone, and hands them to the next one (`talaria_node::holder`, docs/survive.md). It runs
//! in its own DaemonSet, not rolled with the agent's.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use talaria_node::holder::server::{Holder, Limits};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Holds talaria-node's FUSE connections across agent restarts"
)]
struct Args {
    /// Unix socket the agent connects to.
    #[arg(
        long,
        env = "TALARIA_FUSE_HOLDER_SOCKET",
        default_value = "/run/talaria/fuse-holder.sock"
    )]
    socket: PathBuf,
    /// Most mounted layers held.
    #[arg(long, env = "TALARIA_FUSE_HOLDER_MAX_ENTRIES", default_value_t = 8192)]
    max_entries: usize,
    /// Log filter (tracing env-filter syntax).
    #[arg(long, env = "TALARIA_FUSE_HOLDER_LOG", default_value = "info")]
    log: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&args.log).context("--log")?)
        .with_writer(std::io::stderr)
        .init();
    // Each entry is an open fd: as many as the hard limit allows.
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .context("getrlimit")?;
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard)
        .context("setrlimit")?;
    let holder = Holder::new(Limits {
        max_entries: args.max_entries,
        ..Limits::default()
    });
    holder
        .serve(&args.socket)
        .with_context(|| format!("serving {}", args.socket.display()))
}
