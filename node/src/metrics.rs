//! Prometheus metrics of the node agent and the HTTP endpoint serving them.

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Why a layer was unpacked normally instead of mounted lazily.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FallbackLabels {
    pub reason: String,
}

/// Where the artifact of a lazily mounted layer was found.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: String,
}

/// All node metrics. Cheap to share: every metric is an `Arc` inside.
pub struct Metrics {
    registry: Registry,
    /// Compressed bytes fetched from registries because a read needed them.
    pub bytes_on_demand: Counter,
    /// Compressed bytes fetched by background prefetch.
    pub bytes_prefetched: Counter,
    /// Uncompressed span bytes served from the span cache.
    pub bytes_from_cache: Counter,
    pub fallbacks: Family<FallbackLabels, Counter>,
    /// Layers mounted lazily, by where their artifact was found (`cluster`, `referrers`).
    pub mounted_by_source: Family<SourceLabels, Counter>,
    /// Seconds from Prepare to a mounted, committed remote layer.
    pub mount_seconds: Histogram,
    pub remote_mounts: Gauge,
    pub cache_bytes: Gauge,
    /// FUSE reads answered with EIO (registry down, timeout, verification failure).
    pub read_errors: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("talaria_node");
        let m = Metrics {
            bytes_on_demand: Counter::default(),
            bytes_prefetched: Counter::default(),
            bytes_from_cache: Counter::default(),
            fallbacks: Family::default(),
            mounted_by_source: Family::default(),
            mount_seconds: Histogram::new([
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            remote_mounts: Gauge::default(),
            cache_bytes: Gauge::default(),
            read_errors: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "fetched_on_demand_bytes",
            "Compressed layer bytes fetched for reads",
            m.bytes_on_demand.clone(),
        );
        registry.register(
            "prefetched_bytes",
            "Compressed layer bytes fetched in the background",
            m.bytes_prefetched.clone(),
        );
        registry.register(
            "from_cache_bytes",
            "Uncompressed span bytes found in the span cache (memory or disk) by reads",
            m.bytes_from_cache.clone(),
        );
        registry.register(
            "fallbacks",
            "Layers unpacked normally instead of mounted lazily, by reason",
            m.fallbacks.clone(),
        );
        registry.register(
            "mounted_layers",
            "Layers mounted lazily, by where their artifact was found",
            m.mounted_by_source.clone(),
        );
        registry.register(
            "mount_seconds",
            "Time to resolve, mount and commit a remote layer",
            m.mount_seconds.clone(),
        );
        registry.register(
            "remote_mounts",
            "Remote layers currently mounted",
            m.remote_mounts.clone(),
        );
        registry.register(
            "span_cache_bytes",
            "Bytes held by the on-disk span cache",
            m.cache_bytes.clone(),
        );
        registry.register(
            "read_errors",
            "Reads of remote layers answered with EIO",
            m.read_errors.clone(),
        );
        Metrics { registry, ..m }
    }

    pub fn fallback(&self, reason: &str) {
        self.fallbacks
            .get_or_create(&FallbackLabels {
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn mounted_from(&self, source: &str) {
        self.mounted_by_source
            .get_or_create(&SourceLabels {
                source: source.to_string(),
            })
            .inc();
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "encoding metrics");
        }
        out
    }
}

/// Serves `/metrics` and `/healthz` on `addr` until `shutdown` resolves.
pub async fn serve(
    metrics: Arc<Metrics>,
    addr: SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::routing::get;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                async move {
                    (
                        [(
                            "content-type",
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        m.encode(),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "serving /metrics and /healthz");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
