//! Prometheus metrics of the node agent and the HTTP endpoint serving them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// An error that names its metric label (a closed set of short snake_case words). The
/// errors live with the code that fails; metrics only ask for the label.
pub trait Reason {
    fn reason(&self) -> &'static str;
}

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

/// Bytes of one layer for one image, by how they came (`on_demand`, `startup`,
/// `background`: compressed bytes fetched; `cache`: uncompressed bytes reads used from
/// the span cache).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LayerLabels {
    pub image: String,
    pub layer: String,
    pub kind: String,
}

/// Which step of the startup or background prefetch failed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    pub stage: String,
}

/// What came of one step.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
}

/// Which FUSE request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub op: String,
}

/// The `kind` values of [`LayerLabels`].
pub const LAYER_KINDS: [&str; 4] = ["on_demand", "startup", "background", "cache"];

/// All node metrics. Cheap to share: every metric is an `Arc` inside.
pub struct Metrics {
    registry: Registry,
    /// Compressed bytes fetched from registries because a read needed them.
    pub bytes_on_demand: Counter,
    /// Compressed bytes fetched ahead of reads (startup prefetch and background fetch).
    pub bytes_prefetched: Counter,
    /// Compressed bytes fetched by the startup prefetch of images (also in `bytes_prefetched`).
    pub bytes_startup: Counter,
    /// Compressed bytes of startup packs (recorded plans) fetched.
    pub startup_pack_bytes: Counter,
    /// StartupRecords this node wrote or did not, by outcome (`written`, `empty`,
    /// `too_large`, `error`).
    pub startup_records: Family<OutcomeLabels, Counter>,
    /// 1 when containers started on this node (default runtime) since the last Prepare this
    /// snapshotter saw, for longer than a grace period: containerd is not using it.
    pub snapshotter_unused: Gauge,
    /// Per image and layer bytes (see [`LayerLabels`]); series are removed with the layer.
    pub layer_bytes: Family<LayerLabels, Counter>,
    /// Startup prefetches finished (whatever their outcome).
    pub startup_prefetches: Counter,
    /// Seconds from the start of an image's startup prefetch to its end.
    pub startup_seconds: Histogram,
    /// Ranged requests and spans fetched by startup prefetches.
    pub startup_requests: Counter,
    pub startup_spans: Counter,
    /// Failures of prefetch steps (never fatal: reads still fetch on demand).
    pub prefetch_errors: Family<StageLabels, Counter>,
    /// Pulls the CRI proxy saw start, by what the node did ahead of containerd: `artifact`
    /// (its job started), `none` (no artifact), `error`; `abandoned` counts the jobs stopped
    /// after no layer of their image was mounted in time.
    pub pull_warmups: Family<OutcomeLabels, Counter>,
    /// Seconds reads of remote layers waited for spans not in the cache.
    pub read_wait_seconds: Histogram,
    /// Reads that waited for the network while a startup prefetch of their image ran, and
    /// their total wait.
    pub startup_read_waits: Counter,
    pub startup_read_wait_seconds: Counter<f64, AtomicU64>,
    /// Uncompressed span bytes served from the span cache.
    pub bytes_from_cache: Counter,
    pub fallbacks: Family<FallbackLabels, Counter>,
    /// Layers mounted lazily, by where their artifact was found (`cluster`, `referrers`).
    pub mounted_by_source: Family<SourceLabels, Counter>,
    /// Seconds from Prepare to a mounted, committed remote layer.
    pub mount_seconds: Histogram,
    pub remote_mounts: Gauge,
    pub cache_bytes: Gauge,
    /// Bytes FUSE reads returned to the kernel (from spans or materialized files).
    pub fuse_read_bytes: Counter,
    /// Opens answered with kernel passthrough to a local copy (their reads skip FUSE).
    pub passthrough_opens: Counter,
    /// FUSE requests remote layers answered, by op (each one a round trip through this
    /// process: where a start's file-system time goes).
    pub fuse_requests: Family<OpLabels, Counter>,
    /// Startup files copied to local disk, and their bytes.
    pub materialized_files: Counter,
    pub materialized_bytes: Counter,
    /// FUSE reads answered with EIO (registry down, timeout, verification failure).
    pub read_errors: Counter,
    /// Layers whose every byte was checked against their index and the image's diff_id,
    /// and those that failed (poisoned), by reason.
    pub verified_layers: Counter,
    pub verification_failures: Family<FallbackLabels, Counter>,
    /// Mounts handed over from a previous agent through the fd holder, and holder errors,
    /// by outcome (docs/survive.md).
    pub handovers: Family<OutcomeLabels, Counter>,
    /// Mounts the holder keeps that this agent cannot serve (a state version it does not
    /// know): their previous agent must keep running. Not ready while above 0.
    pub unserved_mounts: Gauge,
    /// Set once the held mounts were checked: this agent can take them all over (readiness).
    pub handover_checked: std::sync::atomic::AtomicBool,
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
            bytes_startup: Counter::default(),
            startup_pack_bytes: Counter::default(),
            startup_records: Family::default(),
            snapshotter_unused: Gauge::default(),
            layer_bytes: Family::default(),
            startup_prefetches: Counter::default(),
            startup_seconds: Histogram::new([
                0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0,
            ]),
            startup_requests: Counter::default(),
            startup_spans: Counter::default(),
            prefetch_errors: Family::default(),
            pull_warmups: Family::default(),
            read_wait_seconds: Histogram::new([
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            startup_read_waits: Counter::default(),
            startup_read_wait_seconds: Counter::default(),
            fallbacks: Family::default(),
            mounted_by_source: Family::default(),
            mount_seconds: Histogram::new([
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            remote_mounts: Gauge::default(),
            cache_bytes: Gauge::default(),
            read_errors: Counter::default(),
            fuse_read_bytes: Counter::default(),
            passthrough_opens: Counter::default(),
            fuse_requests: Family::default(),
            materialized_files: Counter::default(),
            materialized_bytes: Counter::default(),
            verified_layers: Counter::default(),
            verification_failures: Family::default(),
            handovers: Family::default(),
            unserved_mounts: Gauge::default(),
            handover_checked: std::sync::atomic::AtomicBool::new(false),
            registry: Registry::default(),
        };
        registry.register(
            "fetched_on_demand_bytes",
            "Compressed layer bytes fetched for reads",
            m.bytes_on_demand.clone(),
        );
        registry.register(
            "prefetched_bytes",
            "Compressed layer bytes fetched ahead of reads (startup prefetch and background fetch)",
            m.bytes_prefetched.clone(),
        );
        registry.register(
            "startup_pack_bytes",
            "Compressed bytes of startup packs (recorded plans) fetched",
            m.startup_pack_bytes.clone(),
        );
        registry.register(
            "startup_records",
            "StartupRecords of image starts, by outcome (written, empty, too_large, error)",
            m.startup_records.clone(),
        );
        registry.register(
            "snapshotter_unused",
            "1 when containers started on this node since the last Prepare the snapshotter saw: containerd does not use it",
            m.snapshotter_unused.clone(),
        );
        registry.register(
            "from_cache_bytes",
            "Uncompressed bytes reads used from spans found in the span cache (memory or disk)",
            m.bytes_from_cache.clone(),
        );
        registry.register(
            "startup_prefetched_bytes",
            "Compressed layer bytes fetched by the startup prefetch of images",
            m.bytes_startup.clone(),
        );
        registry.register(
            "layer_bytes",
            "Bytes of a layer for an image: fetched on_demand, startup, background (compressed), or used from cache (uncompressed)",
            m.layer_bytes.clone(),
        );
        registry.register(
            "startup_prefetches",
            "Startup prefetches of images finished",
            m.startup_prefetches.clone(),
        );
        registry.register(
            "startup_prefetch_seconds",
            "Time from the start of an image's startup prefetch to its end",
            m.startup_seconds.clone(),
        );
        registry.register(
            "startup_prefetch_requests",
            "Ranged requests made by startup prefetches",
            m.startup_requests.clone(),
        );
        registry.register(
            "startup_prefetch_spans",
            "Spans fetched by startup prefetches",
            m.startup_spans.clone(),
        );
        registry.register(
            "prefetch_errors",
            "Failed steps of startup or background prefetch, by stage",
            m.prefetch_errors.clone(),
        );
        registry.register(
            "pull_warmups",
            "Pulls seen by the CRI proxy, by what the node started ahead of containerd",
            m.pull_warmups.clone(),
        );
        registry.register(
            "startup_read_waits",
            "Reads that waited for the network while a startup prefetch of their image ran",
            m.startup_read_waits.clone(),
        );
        registry.register(
            "startup_read_wait_seconds",
            "Total time reads waited for the network while a startup prefetch of their image ran",
            m.startup_read_wait_seconds.clone(),
        );
        registry.register(
            "read_wait_seconds",
            "Time reads of remote layers waited for spans not in the cache",
            m.read_wait_seconds.clone(),
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
            "fuse_read_bytes",
            "Bytes reads of remote layers returned (from spans or materialized files)",
            m.fuse_read_bytes.clone(),
        );
        registry.register(
            "passthrough_opens",
            "Opens of remote-layer files whose reads the kernel serves from a local copy",
            m.passthrough_opens.clone(),
        );
        registry.register(
            "fuse_requests",
            "FUSE requests answered for remote layers, by op",
            m.fuse_requests.clone(),
        );
        registry.register(
            "materialized_files",
            "Startup files copied to local disk so their reads skip the span path",
            m.materialized_files.clone(),
        );
        registry.register(
            "materialized_bytes",
            "Bytes of startup files copied to local disk",
            m.materialized_bytes.clone(),
        );
        registry.register(
            "read_errors",
            "Reads of remote layers answered with EIO",
            m.read_errors.clone(),
        );
        registry.register(
            "verified_layers",
            "Fully fetched layers that matched their index and the image's diff_id",
            m.verified_layers.clone(),
        );
        registry.register(
            "verification_failures",
            "Fully fetched layers that did not match their index or the image (poisoned), by reason",
            m.verification_failures.clone(),
        );
        registry.register(
            "handovers",
            "Mounts taken over from a previous agent through the fd holder, and holder errors, by outcome",
            m.handovers.clone(),
        );
        registry.register(
            "unserved_mounts",
            "Mounts held for a next agent that this agent cannot serve (unknown state version)",
            m.unserved_mounts.clone(),
        );
        Metrics { registry, ..m }
    }

    pub fn handover(&self, outcome: &str) {
        self.handovers
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_string(),
            })
            .inc();
    }

    /// Ready: the held mounts are taken over, and none is left unserved.
    pub fn ready(&self) -> bool {
        self.handover_checked
            .load(std::sync::atomic::Ordering::Relaxed)
            && self.unserved_mounts.get() == 0
    }

    pub fn fallback(&self, reason: &str) {
        self.fallbacks
            .get_or_create(&FallbackLabels {
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn pull_warmup(&self, outcome: &str) {
        self.pull_warmups
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_string(),
            })
            .inc();
    }

    /// Counts `e` under its reason: taking a typed error rather than a string keeps the
    /// label set closed.
    pub fn prefetch_error(&self, e: &impl Reason) {
        self.prefetch_errors
            .get_or_create(&StageLabels {
                stage: e.reason().to_string(),
            })
            .inc();
    }

    /// Adds `bytes` to the `kind` series of `image`'s `layer`.
    pub fn layer_bytes(&self, image: &str, layer: &str, kind: &str, bytes: u64) {
        self.layer_bytes
            .get_or_create(&LayerLabels {
                image: image.to_string(),
                layer: layer.to_string(),
                kind: kind.to_string(),
            })
            .inc_by(bytes);
    }

    /// Removes the series of `image`'s `layer` (it is no longer mounted).
    pub fn forget_layer(&self, image: &str, layer: &str) {
        for kind in LAYER_KINDS {
            self.layer_bytes.remove(&LayerLabels {
                image: image.to_string(),
                layer: layer.to_string(),
                kind: kind.to_string(),
            });
        }
    }

    pub fn startup_record(&self, outcome: &str) {
        self.startup_records
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_string(),
            })
            .inc();
    }

    /// Bytes of `kind` charged to `image` over `layers` so far.
    pub fn image_bytes(&self, image: &str, layers: &[String], kind: &str) -> u64 {
        layers
            .iter()
            .filter_map(|l| {
                self.layer_bytes
                    .get(&LayerLabels {
                        image: image.to_string(),
                        layer: l.clone(),
                        kind: kind.to_string(),
                    })
                    .map(|c| c.get())
            })
            .sum()
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

/// Serves `/metrics`, `/healthz`, `/readyz` and (with a recorder) `/startup-trace` on `addr` until
/// `shutdown` resolves. `/startup-trace` names the files containers on this node read, so
/// it answers only callers on the loopback interface: inside the pod's network namespace,
/// which is what `kubectl port-forward` reaches (authorized by the apiserver as
/// `pods/portforward`). Other pods get 403.
fn router(
    metrics: Arc<Metrics>,
    recorder: Option<Arc<talaria_artifact::startup::TraceRecorder>>,
) -> axum::Router {
    use axum::routing::get;
    let ready = metrics.clone();
    axum::Router::new()
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
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get({
                let m = ready;
                move || {
                    let m = m.clone();
                    async move {
                        if m.ready() {
                            (axum::http::StatusCode::OK, "ok\n".to_string())
                        } else {
                            (
                                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                                format!(
                                    "checking the mounts the fd holder keeps, or {} of them are in a state this agent cannot read (left to the agent that wrote them)\n",
                                    m.unserved_mounts.get()
                                ),
                            )
                        }
                    }
                }
            }),
        )
        .route(
            "/startup-trace",
            get(
                move |axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<SocketAddr>| {
                    let r = recorder.clone();
                    async move {
                        use axum::response::IntoResponse;
                        if !peer.ip().is_loopback() {
                            return (
                                axum::http::StatusCode::FORBIDDEN,
                                "/startup-trace answers only on loopback (kubectl port-forward)\n",
                            )
                                .into_response();
                        }
                        match r {
                            // The recorder is bounded, so is this answer.
                            Some(r) => axum::Json(r.snapshot()).into_response(),
                            None => (
                                axum::http::StatusCode::NOT_FOUND,
                                "startup recording is off (--record-startup-window 0)\n",
                            )
                                .into_response(),
                        }
                    }
                },
            ),
        )
}

/// Serves [`router`] on `addr` until `shutdown` resolves.
pub async fn serve(
    metrics: Arc<Metrics>,
    recorder: Option<Arc<talaria_artifact::startup::TraceRecorder>>,
    addr: SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(metrics, recorder);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "serving /metrics and /healthz");
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::extract::ConnectInfo;
    use tower::ServiceExt;

    async fn get_from(peer: &str, path: &str) -> (u16, String) {
        let recorder = Arc::new(talaria_artifact::startup::TraceRecorder::new(
            std::time::Duration::from_secs(60),
            16,
        ));
        let app = router(Arc::new(Metrics::new()), Some(recorder));
        let mut req = axum::http::Request::get(path)
            .body(axum::body::Body::empty())
            .expect("request");
        // As `into_make_service_with_connect_info` hands it to the handlers.
        req.extensions_mut()
            .insert(ConnectInfo(peer.parse::<SocketAddr>().expect("addr")));
        let resp = app.oneshot(req).await.expect("response");
        let status = resp.status().as_u16();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .expect("body");
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn startup_trace_answers_only_loopback_callers() {
        // Another pod (any address off the loopback interface) is refused.
        let (status, _) = get_from("10.1.2.3:40000", "/startup-trace").await;
        assert_eq!(status, 403);
        let (status, _) = get_from("[fd00::1]:40000", "/startup-trace").await;
        assert_eq!(status, 403);
        // kubectl port-forward arrives on loopback inside the pod.
        let (status, body) = get_from("127.0.0.1:40000", "/startup-trace").await;
        assert_eq!(status, 200, "{body}");
        assert!(body.starts_with('{'), "{body}");
        // Metrics stay open to the scraper.
        let (status, _) = get_from("10.1.2.3:40000", "/metrics").await;
        assert_eq!(status, 200);
    }
}
