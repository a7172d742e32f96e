//! `talaria-node`: serves the Talaria snapshotter to containerd over a unix socket, mounting
//! image layers lazily from their Talaria artifacts when containerd's CRI plugin asks.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use talaria_artifact::oci::registry::credentials::{
    Credentials, DockerConfigFile, LearnedCredentials,
};
use talaria_artifact::oci::registry::{RegistryConfig, RetryPolicy};
use talaria_artifact::signature::TrustedKeys;
use talaria_node::holder::HolderClient;
use talaria_node::metrics::Metrics;
use talaria_node::remote::cluster::{self, ClusterSource};
use talaria_node::remote::{MaterializeOptions, RemoteLayers, RemoteOptions, detach_stale_mounts};
use talaria_node::snapshot::Snapshotter;
use talaria_node::snapshot::service::serve_unix;
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;

#[derive(Parser, Debug)]
#[command(version, about = "Talaria node agent: a containerd proxy snapshotter")]
struct Args {
    /// Directory for snapshots, metadata and the span cache.
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
    /// Unpack every layer normally; never mount layers lazily.
    #[arg(long, env = "TALARIA_NODE_NO_REMOTE")]
    no_remote: bool,
    /// Size cap of the on-disk span cache (under --root), in MiB.
    #[arg(long, env = "TALARIA_NODE_CACHE_MIB", default_value_t = 10 * 1024)]
    cache_mib: u64,
    /// Longest a read of a lazily mounted file waits for the registry before failing (EIO).
    #[arg(long, env = "TALARIA_NODE_READ_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    read_timeout: Duration,
    /// Longest a Prepare spends finding the artifact and index before falling back.
    #[arg(long, env = "TALARIA_NODE_RESOLVE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    resolve_timeout: Duration,
    /// Do not fetch the rest of mounted layers in the background.
    #[arg(long, env = "TALARIA_NODE_NO_PREFETCH")]
    no_prefetch: bool,
    /// Concurrent ranged requests per registry host (reads first, then startup prefetch,
    /// then background fetch).
    #[arg(long, env = "TALARIA_NODE_REGISTRY_MAX_REQUESTS", default_value_t = 8)]
    registry_max_requests: usize,
    /// Startup files up to this size (KiB) are copied to local disk once prefetched.
    #[arg(
        long,
        env = "TALARIA_NODE_MATERIALIZE_MAX_FILE_KIB",
        default_value_t = 256
    )]
    materialize_max_file_kib: u64,
    /// Disk for materialized startup files and startup packs (MiB, under --root; given
    /// back when the layer goes); 0 turns both off.
    #[arg(long, env = "TALARIA_NODE_MATERIALIZE_MIB", default_value_t = 1024)]
    materialize_mib: u64,
    /// Most memory (MiB) the indexes of lazily mounted layers may hold together (each
    /// mounted layer keeps its table of contents in memory); a layer whose index does not
    /// fit is unpacked normally (fallback reason `index_memory`).
    #[arg(long, env = "TALARIA_NODE_INDEX_MEMORY_MIB", default_value_t = 384)]
    index_memory_mib: u64,
    /// Most materialized startup files kept.
    #[arg(
        long,
        env = "TALARIA_NODE_MATERIALIZE_MAX_FILES",
        default_value_t = 20000
    )]
    materialize_max_files: usize,
    /// File reads of lazily mounted layers within this long after a container starts are
    /// recorded: written as StartupRecords for the controller's recorded plans (a policy's
    /// `recording.windowSeconds`, cut to this), and served at /startup-trace on loopback;
    /// 0 turns recording off.
    #[arg(long, env = "TALARIA_NODE_RECORD_STARTUP_WINDOW", default_value = "60s", value_parser = parse_duration)]
    record_startup_window: Duration,
    /// Docker config.json with registry credentials.
    #[arg(long, env = "TALARIA_NODE_DOCKER_CONFIG")]
    docker_config: Option<PathBuf>,
    /// Registry hosts (host[:port]) spoken to over plain HTTP (repeatable).
    #[arg(
        long = "insecure-registry",
        env = "TALARIA_NODE_INSECURE_REGISTRIES",
        value_delimiter = ','
    )]
    insecure_registries: Vec<String>,
    /// Kubeconfig of the cluster whose policy-approved AcceleratedImages name artifacts.
    #[arg(long, env = "TALARIA_NODE_KUBECONFIG", conflicts_with = "in_cluster")]
    kubeconfig: Option<PathBuf>,
    /// Watch AcceleratedImages with the pod's service account.
    #[arg(long, env = "TALARIA_NODE_IN_CLUSTER")]
    in_cluster: bool,
    /// Also use artifacts found among the image's registry referrers when the cluster pins
    /// none. UNVERIFIED: whoever can push a referrer to the image's repository then decides
    /// what this node serves for it (docs/trust.md). For tests, benchmarks and registries
    /// only you can write to; off by default.
    #[arg(long, env = "TALARIA_NODE_UNVERIFIED_REFERRERS")]
    unverified_referrers: bool,
    /// Public keys (PEM files, each may hold several) whose cosign-compatible signatures
    /// make an artifact among the image's referrers usable when the cluster pins none
    /// (`talaria build --sign-key`, docs/trust.md). Repeatable.
    #[arg(
        long = "trusted-key",
        env = "TALARIA_NODE_TRUSTED_KEYS",
        value_delimiter = ',',
        value_name = "FILE"
    )]
    trusted_keys: Vec<PathBuf>,
    /// Serve CRI's image service here (kubelet's --image-service-endpoint), forwarding to
    /// --containerd-socket and keeping the credentials of pulls for lazy reads.
    #[arg(long, env = "TALARIA_NODE_IMAGE_SERVICE_SOCKET")]
    image_service_socket: Option<PathBuf>,
    /// containerd's CRI socket, where the image-service proxy forwards.
    #[arg(
        long,
        env = "TALARIA_NODE_CONTAINERD_SOCKET",
        default_value = "/run/containerd/containerd.sock"
    )]
    containerd_socket: PathBuf,
    /// Do not start on an image's artifact when the image-service proxy sees its pull begin
    /// (the Prepares then resolve it, after containerd's own resolution).
    #[arg(long, env = "TALARIA_NODE_NO_PULL_WARMUP")]
    no_pull_warmup: bool,
    /// How long a pull warm-up's job runs with no layer of its image mounted before it is
    /// stopped.
    #[arg(long, env = "TALARIA_NODE_PULL_WARMUP_WAIT", default_value = "30s", value_parser = parse_duration)]
    pull_warmup_wait: Duration,
    /// How long a credential learned from a successful pull is kept without a newer
    /// successful pull refreshing it.
    #[arg(long, env = "TALARIA_NODE_PULL_CREDENTIAL_TTL", default_value = "60m", value_parser = parse_duration)]
    pull_credential_ttl: Duration,
    /// The fd holder's socket (`talaria-fuse-holder`): with it, lazily mounted layers survive
    /// this process (crash, restart, upgrade) and are taken over by the next one
    /// (docs/survive.md); without it, they end with this process.
    #[arg(long, env = "TALARIA_NODE_FUSE_HOLDER_SOCKET")]
    fuse_holder_socket: Option<PathBuf>,
    /// How long to wait for the fd holder at start before going on without it.
    #[arg(long, env = "TALARIA_NODE_FUSE_HOLDER_WAIT", default_value = "60s", value_parser = parse_duration)]
    fuse_holder_wait: Duration,
    /// The state version written to the fd holder (tests of version skew only).
    #[arg(long, hide = true, default_value_t = talaria_node::remote::takeover::HANDOVER_VERSION)]
    handover_state_version: u32,
    /// Address for /metrics, /healthz and /readyz (e.g. 127.0.0.1:9810); off when absent.
    #[arg(long, env = "TALARIA_NODE_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
}

/// `500ms`, `30s`, `2m`, or plain seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num.parse().map_err(|e| format!("{s:?}: {e}"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n.saturating_mul(60))),
        _ => Err(format!("{s:?}: unit must be ms, s or m")),
    }
}

/// An exclusive lock on `root/agent.lock`, waited for (a previous agent holds it until it
/// exits).
fn lock_root(root: &Path) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    use nix::fcntl::{Flock, FlockArg};
    std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    let path = root.join("agent.lock");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let mut waited = std::time::Instant::now();
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((f, nix::errno::Errno::EWOULDBLOCK)) => {
                file = f;
                if waited.elapsed() >= Duration::from_secs(10) {
                    info!(lock = %path.display(), "waiting for the previous agent to exit");
                    waited = std::time::Instant::now();
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            Err((_, e)) => return Err(e).with_context(|| format!("locking {}", path.display())),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&args.log).context("--log")?)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    talaria_artifact::oci::registry::install_crypto_provider();
    let metrics = Arc::new(Metrics::new());

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // Credentials of CRI pulls (memory only, bounded), asked before the docker config.
    let learned = Arc::new(LearnedCredentials::new(4096, args.pull_credential_ttl));
    // Bounded: 50,000 files, 1 Mi ranges (16 MiB) in all.
    let recorder = (!args.no_remote && !args.record_startup_window.is_zero()).then(|| {
        Arc::new(talaria_artifact::startup::TraceRecorder::new(
            args.record_startup_window,
            50_000,
        ))
    });
    // Early: readiness and liveness answer while a previous agent still runs (an upgrade's
    // surge) and this one waits for the root.
    if let Some(addr) = args.metrics_addr {
        let mut rx = stop_rx.clone();
        let m = metrics.clone();
        let rec = recorder.clone();
        tokio::spawn(async move {
            let stop = async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            if let Err(e) = talaria_node::metrics::serve(m, rec, addr, stop).await {
                tracing::error!(%addr, error = %e, "metrics endpoint failed");
            }
        });
    }
    let holder = match (&args.fuse_holder_socket, args.no_remote) {
        (Some(path), false) => {
            let (path, wait) = (path.clone(), args.fuse_holder_wait);
            match tokio::task::spawn_blocking(move || HolderClient::connect_within(&path, wait))
                .await
                .context("connecting to the fd holder")?
            {
                Ok(c) => Some(Arc::new(c)),
                Err(e) => {
                    metrics.handover(e.reason());
                    tracing::warn!(error = %e, "no fd holder: lazily mounted layers end with this agent");
                    None
                }
            }
        }
        _ => None,
    };
    let mut cluster_source: Option<Arc<ClusterSource>> = None;
    let remote = if args.no_remote {
        None
    } else {
        let mut credentials = Credentials::default().with_source(learned.clone());
        if let Some(path) = &args.docker_config {
            let file = DockerConfigFile::open(path)
                .with_context(|| format!("--docker-config {}", path.display()))?;
            credentials = credentials.with_source(Arc::new(file));
        }
        let registry = RegistryConfig {
            credentials,
            insecure_hosts: args.insecure_registries.clone(),
            // Reads have their own deadline; retries stay within it.
            retry: RetryPolicy {
                max_elapsed: args.read_timeout,
                ..RetryPolicy::default()
            },
            read_timeout: args.read_timeout,
            ..RegistryConfig::default()
        };
        let cluster = if args.kubeconfig.is_some() || args.in_cluster {
            let client = cluster::client(args.kubeconfig.as_deref())
                .await
                .context("connecting to the cluster")?;
            info!("watching AcceleratedImages for artifacts");
            Some(Arc::new(ClusterSource::start(client)))
        } else {
            None
        };
        cluster_source = cluster.clone();
        let mut trusted_keys: Option<TrustedKeys> = None;
        for p in &args.trusted_keys {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("reading trusted key {}", p.display()))?;
            let k = TrustedKeys::from_pem(&text)
                .with_context(|| format!("trusted key {}", p.display()))?;
            trusted_keys
                .get_or_insert_with(TrustedKeys::default)
                .extend(k);
        }
        if let Some(k) = &trusted_keys {
            info!(keys = k.len(), "artifacts signed by a trusted key are used");
        }
        // The learning loop needs the cluster (its policies, records and pods).
        let learner = cluster.as_ref().map(|c| {
            let l = Arc::new(talaria_node::remote::learn::Learner::new(
                c.clone(),
                recorder.clone(),
                metrics.clone(),
                cluster::node_platform(),
                args.record_startup_window,
            ));
            tokio::spawn(l.clone().watch_usage(Duration::from_secs(60)));
            l
        });
        let opts = RemoteOptions {
            recorder: recorder.clone(),
            learner,
            cache_dir: args.root.join("cache").join("spans"),
            cache_max_bytes: args.cache_mib.saturating_mul(1 << 20),
            read_timeout: args.read_timeout,
            resolve_timeout: args.resolve_timeout,
            registry,
            prefetch: !args.no_prefetch,
            sched: talaria_node::content::sched::SchedOptions {
                max_requests: args.registry_max_requests,
                ..Default::default()
            },
            materialize: (args.materialize_mib > 0 && args.materialize_max_files > 0).then(|| {
                MaterializeOptions {
                    dir: args.root.join("cache").join("materialized"),
                    max_bytes: args.materialize_mib.saturating_mul(1 << 20),
                    max_files: args.materialize_max_files,
                    max_file_bytes: args.materialize_max_file_kib.saturating_mul(1 << 10),
                }
            }),
            cluster,
            referrers: args.unverified_referrers,
            trusted_keys,
            warmup_wait: args.pull_warmup_wait,
            index_memory: args.index_memory_mib.saturating_mul(1 << 20),
            holder: holder.clone(),
            handover_version: args.handover_state_version,
        };
        Some(Arc::new(
            RemoteLayers::new(opts, metrics.clone()).context("setting up remote layers")?,
        ))
    };
    // The image-reference grammar is a regex compiled on first use (~50 ms in a release
    // build): here, not on the path of the first Prepare or proxied pull.
    let _ = talaria_artifact::oci::registry::ImageRef::parse("warm.invalid/up:1");
    // Mounts a previous agent left with the holder in a state this one cannot read: said at
    // once (metric, Event, not ready), so an upgrade keeps the previous agent serving them.
    if let (Some(h), Some(_)) = (holder.clone(), &remote) {
        let held = tokio::task::spawn_blocking(move || h.list())
            .await
            .context("listing the fd holder's mounts")?
            .context("listing the fd holder's mounts")?;
        let unserved = talaria_node::remote::takeover::unservable(&held);
        drop(held);
        metrics.unserved_mounts.set(unserved.len() as i64);
        for _ in &unserved {
            metrics.handover("refused_version");
        }
        if !unserved.is_empty()
            && let Some(c) = &cluster_source
        {
            let note = format!(
                "{} lazily mounted layers were handed over with a state version this agent does not know ({:?}; it knows up to {}); they are left to the agent that wrote them, and this agent is not ready until that one is gone",
                unserved.len(),
                unserved
                    .iter()
                    .map(|(_, v)| *v)
                    .collect::<std::collections::BTreeSet<_>>(),
                talaria_node::remote::takeover::HANDOVER_VERSION
            );
            c.report_node("HandoverRefused", "TakeOverMounts", note)
                .await;
        }
    }
    metrics
        .handover_checked
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let root = args.root.clone();
    let hook = remote.clone();
    // Opening and remounting touch the disk and the kernel: a blocking thread.
    let (sn, _root_lock) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        // One agent serves a root at a time: the next one waits here for the previous one
        // to exit.
        let lock = lock_root(&root)?;
        // The mounts the previous agent left with the holder: served from now on.
        let mut kept = HashSet::new();
        if let (Some(h), Some(r)) = (&holder, &hook) {
            let held = h.list().context("listing the fd holder's mounts")?;
            kept = r.take_over(held).kept;
        }
        // FUSE mounts of a previous process whose connections are not held are dead; detach
        // them before the snapshotter's cleanup walks those directories.
        let stale = detach_stale_mounts(&root, &kept);
        if stale > 0 {
            info!(stale, "detached mounts of a previous run");
        }
        let sn = Snapshotter::open(&root)
            .with_context(|| format!("opening snapshotter root {}", root.display()))?;
        let Some(hook) = hook else {
            return Ok((sn, lock));
        };
        let n = hook.restore(&sn).context("listing snapshots to remount")?;
        info!(remounted = n, "remote snapshots restored");
        Ok((sn.with_hook(hook), lock))
    })
    .await
    .context("opening the snapshotter")??;

    if let Some(socket) = args.image_service_socket.clone() {
        let mut proxy = talaria_node::cri::proxy::ImageServiceProxy::to_unix_socket(
            &args.containerd_socket,
            learned.clone(),
        );
        if let Some(r) = remote.clone().filter(|_| !args.no_pull_warmup) {
            proxy = proxy.with_pull_hook(Arc::new(move |image: &str| r.warm(image)));
        }
        let mut rx = stop_rx.clone();
        tokio::spawn(async move {
            let stop = async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            if let Err(e) = talaria_node::cri::proxy::serve_unix(proxy, &socket, stop).await {
                tracing::error!(error = %e, "CRI image service proxy failed");
            }
        });
    }
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: shutting down"),
            _ = int.recv() => info!("SIGINT: shutting down"),
        }
        let _ = stop_tx.send(true);
    };
    info!(root = %args.root.display(), socket = %args.socket.display(), remote = remote.is_some(), "serving");
    serve_unix(Arc::new(sn), &args.socket, shutdown)
        .await
        .with_context(|| format!("serving on {}", args.socket.display()))?;
    if let Some(r) = remote {
        r.unmount_all();
    }
    info!("stopped");
    Ok(())
}
