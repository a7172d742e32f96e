//! talaria-controller: AccelerationPolicy → AcceleratedImage → artifacts.
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use talaria_artifact::oci::registry::RegistryConfig;
use talaria_artifact::signature::SigningKey;
use talaria_controller::context::{ArtifactRepositories, SecretNamespaces};
use talaria_controller::metrics::Metrics;
use talaria_controller::{BuildSettings, Settings};
use tokio::sync::watch;
use tracing::{error, info, warn};

/// Watches AccelerationPolicies, pods and AcceleratedImages; builds Talaria artifacts into
/// OCI registries. Runs in-cluster (service account) or with the current kubeconfig.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "TALARIA_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    http_addr: SocketAddr,
    /// Builds running at once.
    #[arg(long, env = "TALARIA_MAX_BUILDS", default_value_t = 4)]
    max_builds: usize,
    /// Builds running at once against one registry.
    #[arg(long, env = "TALARIA_MAX_BUILDS_PER_REGISTRY", default_value_t = 2)]
    max_builds_per_registry: usize,
    /// Layers indexed at once within a build.
    #[arg(long, env = "TALARIA_LAYER_PARALLELISM", default_value_t = 2)]
    layer_parallelism: usize,
    /// First retry delay of a failed build (seconds); doubles per failure.
    #[arg(long, env = "TALARIA_BACKOFF_BASE_SECONDS", default_value_t = 10)]
    backoff_base_seconds: u64,
    /// Longest retry delay (seconds).
    #[arg(long, env = "TALARIA_BACKOFF_MAX_SECONDS", default_value_t = 600)]
    backoff_max_seconds: u64,
    /// Failed attempts after which an image stays Failed.
    #[arg(long, env = "TALARIA_MAX_ATTEMPTS", default_value_t = 8)]
    max_attempts: u32,
    /// A build running longer is abandoned (seconds).
    #[arg(long, env = "TALARIA_BUILD_TIMEOUT_SECONDS", default_value_t = 1800)]
    build_timeout_seconds: u64,
    /// Policies are re-reconciled (tags re-resolved) this often (seconds).
    #[arg(long, env = "TALARIA_RESYNC_SECONDS", default_value_t = 300)]
    resync_seconds: u64,
    /// Registry hosts (host[:port]) spoken to over plain HTTP (loopback always is).
    #[arg(
        long = "insecure-registry",
        env = "TALARIA_INSECURE_REGISTRIES",
        value_delimiter = ','
    )]
    insecure_registries: Vec<String>,
    /// Use leader election (a Lease) so that only one replica builds.
    #[arg(long, env = "TALARIA_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// Namespace of the leader election Lease.
    #[arg(
        long,
        env = "TALARIA_LEASE_NAMESPACE",
        default_value = "talaria-system"
    )]
    lease_namespace: String,
    /// Namespaces, besides the Lease's (the controller's own), whose secrets a policy may
    /// name in `registryCredentials`; `*` allows any.
    #[arg(long, env = "TALARIA_SECRET_NAMESPACES", value_delimiter = ',')]
    secret_namespaces: Vec<String>,
    /// Sign every artifact built with this ECDSA P-256 private key (PKCS#8 PEM; chart:
    /// controller.signingKey.secretName), cosign-compatibly (docs/trust.md).
    #[arg(long, env = "TALARIA_SIGNING_KEY", value_name = "FILE")]
    signing_key: Option<std::path::PathBuf>,
    /// Repositories (`registry/path`, and everything below) a policy's artifactRepository
    /// may name; empty: any. A build for another is failed.
    #[arg(long, env = "TALARIA_ARTIFACT_REPOSITORIES", value_delimiter = ',')]
    artifact_repositories: Vec<String>,
    /// Name of the leader election Lease.
    #[arg(long, env = "TALARIA_LEASE_NAME", default_value = "talaria-controller")]
    lease_name: String,
    /// This replica's identity (defaults to the pod name from $POD_NAME or the host name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Log format: json or text.
    #[arg(long, env = "TALARIA_LOG_FORMAT", default_value = "json")]
    log_format: String,
}

fn init_logs(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt().with_env_filter(filter);
    if format == "text" {
        b.init();
    } else {
        b.json()
            .with_current_span(true)
            .with_span_list(false)
            .init();
    }
}

/// Resolves on SIGTERM or Ctrl-C.
async fn termination() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_logs(&args.log_format);
    talaria_controller::install_crypto_provider();
    let client = kube::Client::try_default()
        .await
        .context("connecting to Kubernetes (in-cluster or kubeconfig)")?;
    let identity = args
        .identity
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "talaria-controller".into());
    let metrics = Arc::new(Metrics::new());
    let ready = Arc::new(AtomicBool::new(false));
    let (stop_tx, stop_rx) = watch::channel(false);

    let server = tokio::spawn(talaria_controller::server::serve(
        args.http_addr,
        metrics.clone(),
        ready.clone(),
        {
            let mut rx = stop_rx.clone();
            async move {
                let _ = rx.wait_for(|v| *v).await;
            }
        },
    ));

    let signing_key = match &args.signing_key {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("reading the signing key {}", p.display()))?;
            Some(Arc::new(SigningKey::from_pem(&text).with_context(
                || format!("the signing key {}", p.display()),
            )?))
        }
        None => None,
    };
    let settings = Settings {
        signing_key,
        artifact_repositories: ArtifactRepositories::from_list(&args.artifact_repositories),
        build: BuildSettings {
            max_concurrent: args.max_builds,
            max_per_registry: args.max_builds_per_registry,
            backoff_base: Duration::from_secs(args.backoff_base_seconds),
            backoff_max: Duration::from_secs(args.backoff_max_seconds),
            max_attempts: args.max_attempts,
            timeout: Duration::from_secs(args.build_timeout_seconds),
        },
        layer_parallelism: args.layer_parallelism,
        resync: Duration::from_secs(args.resync_seconds),
        registry: RegistryConfig {
            insecure_hosts: args.insecure_registries.clone(),
            ..Default::default()
        },
        instance: identity.clone(),
        secret_namespaces: if args.secret_namespaces.iter().any(|n| n == "*") {
            SecretNamespaces::Any
        } else {
            SecretNamespaces::Only(
                std::iter::once(args.lease_namespace.clone())
                    .chain(args.secret_namespaces.iter().cloned())
                    .collect(),
            )
        },
        ..Default::default()
    };

    // Leadership: standby replicas are ready (they serve probes) but do not reconcile.
    let mut leader_rx = None;
    let mut lease_task = None;
    if args.leader_elect {
        let manager =
            kube_lease_manager::LeaseManagerBuilder::new(client.clone(), &args.lease_name)
                .with_namespace(&args.lease_namespace)
                .with_identity(&identity)
                .with_create_mode(kube_lease_manager::LeaseCreateMode::AutoCreate)
                .build()
                .await
                .context("setting up leader election")?;
        let (rx, task) = manager.watch().await;
        leader_rx = Some(rx);
        lease_task = Some(task);
    }
    ready.store(true, Ordering::Relaxed);

    let run = async {
        if let Some(rx) = leader_rx.as_mut() {
            info!(%identity, "waiting for leadership");
            rx.wait_for(|l| *l)
                .await
                .context("leader election stopped")?;
            info!(%identity, "leading");
        }
        let ctrl = talaria_controller::run(
            client.clone(),
            settings,
            metrics.clone(),
            None,
            None,
            stop_rx.clone(),
        );
        tokio::pin!(ctrl);
        let lost = async {
            match leader_rx.as_mut() {
                Some(rx) => {
                    let _ = rx.wait_for(|l| !*l).await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            r = &mut ctrl => r.map_err(anyhow::Error::from),
            _ = lost => {
                // Another replica may build now: stop at once rather than race it.
                error!("leadership lost; stopping");
                let _ = stop_tx.send(true);
                let _ = ctrl.await;
                anyhow::bail!("leadership lost")
            }
            _ = termination() => {
                info!("shutting down");
                let _ = stop_tx.send(true);
                ctrl.await.map_err(anyhow::Error::from)
            }
        }
    };
    let result = run.await;
    let _ = stop_tx.send(true);
    drop(leader_rx);
    if let Some(t) = lease_task {
        // Dropping the receiver ends the lease task, which releases the lease.
        match tokio::time::timeout(Duration::from_secs(5), t).await {
            Ok(Ok(Ok(m))) => {
                if let Err(e) = m.release().await {
                    warn!(error = %e, "releasing the lease");
                }
            }
            _ => warn!("lease task did not finish cleanly"),
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    result
}
