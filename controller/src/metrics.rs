//! Prometheus metrics (`/metrics`).

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

pub struct Metrics {
    registry: Registry,
    reconciles: Family<Labels, Counter>,
    reconcile_errors: Family<Labels, Counter>,
    builds: Family<Labels, Counter>,
    build_failures: Family<Labels, Counter>,
    build_duration: Histogram,
    bytes_indexed: Counter,
    queue_depth: Gauge,
    builds_running: Gauge,
    registry_requests: Family<Labels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("talaria_controller");
        let reconciles = Family::<Labels, Counter>::default();
        let reconcile_errors = Family::<Labels, Counter>::default();
        let builds = Family::<Labels, Counter>::default();
        let build_failures = Family::<Labels, Counter>::default();
        let build_duration = Histogram::new(exponential_buckets(0.05, 2.0, 16));
        let bytes_indexed = Counter::default();
        let queue_depth = Gauge::default();
        let builds_running = Gauge::default();
        let registry_requests = Family::<Labels, Counter>::default();
        registry.register("reconciles", "Reconciles by kind", reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Failed reconciles by kind and reason",
            reconcile_errors.clone(),
        );
        registry.register(
            "builds",
            "Artifact builds by result (built, adopted, failed)",
            builds.clone(),
        );
        registry.register(
            "build_failures",
            "Failed artifact builds by reason (also counted in builds, result failed)",
            build_failures.clone(),
        );
        registry.register(
            "build_duration_seconds",
            "Duration of artifact builds",
            build_duration.clone(),
        );
        registry.register(
            "bytes_indexed",
            "Uncompressed layer bytes indexed",
            bytes_indexed.clone(),
        );
        registry.register(
            "build_queue_depth",
            "Builds waiting for a concurrency slot",
            queue_depth.clone(),
        );
        registry.register(
            "builds_running",
            "Builds in progress",
            builds_running.clone(),
        );
        registry.register(
            "registry_requests",
            "Registry requests made by the controller (resolution) by operation and status",
            registry_requests.clone(),
        );
        Metrics {
            registry,
            reconciles,
            reconcile_errors,
            builds,
            build_failures,
            build_duration,
            bytes_indexed,
            queue_depth,
            builds_running,
            registry_requests,
        }
    }

    pub fn reconcile(&self, kind: &str) {
        self.reconciles
            .get_or_create(&vec![("kind", kind.to_string())])
            .inc();
    }

    /// A failed reconcile; `reason` is the error's `reason()`.
    pub fn reconcile_error(&self, kind: &str, reason: &str) {
        self.reconcile_errors
            .get_or_create(&vec![
                ("kind", kind.to_string()),
                ("reason", reason.to_string()),
            ])
            .inc();
    }

    pub fn build_finished(&self, result: &str, seconds: f64, bytes: u64) {
        self.builds
            .get_or_create(&vec![("result", result.to_string())])
            .inc();
        self.build_duration.observe(seconds);
        self.bytes_indexed.inc_by(bytes);
    }

    /// Why a build failed (the builder error's `reason()`); `build_finished` counts it too.
    pub fn build_failed(&self, reason: &str) {
        self.build_failures
            .get_or_create(&vec![("reason", reason.to_string())])
            .inc();
    }

    pub fn registry_request(&self, op: &str, status: &str) {
        self.registry_requests
            .get_or_create(&vec![
                ("op", op.to_string()),
                ("status", status.to_string()),
            ])
            .inc();
    }

    pub fn queue_depth(&self) -> &Gauge {
        &self.queue_depth
    }

    pub fn builds_running(&self) -> &Gauge {
        &self.builds_running
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters() {
        let m = Metrics::new();
        m.reconcile("policy");
        m.build_finished("built", 1.5, 1000);
        m.registry_request("manifest", "ok");
        m.reconcile_error("AcceleratedImage", "queue_closed");
        m.build_failed("timeout");
        let text = m.render();
        assert!(
            text.contains("talaria_controller_reconciles_total{kind=\"policy\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("talaria_controller_bytes_indexed_total 1000"),
            "{text}"
        );
        assert!(
            text.contains("talaria_controller_build_duration_seconds_count 1"),
            "{text}"
        );
        assert!(
            text.contains("talaria_controller_reconcile_errors_total{kind=\"AcceleratedImage\",reason=\"queue_closed\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("talaria_controller_build_failures_total{reason=\"timeout\"} 1"),
            "{text}"
        );
    }
}
