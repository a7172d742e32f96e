//! The learning loop, node side (docs/learning.md). When a node starts an image that a Ready
//! AcceleratedImage pins and whose plan still wants starts, the reads of the image's layers
//! within the policy's window become a StartupRecord (a compact trace, size-capped) that the
//! controller merges into the recorded plan. Whatever the plan, the pods that started the
//! image get an Event saying what served them; a pod whose image fell back gets one saying
//! why. And a node whose containerd starts containers without ever asking this snapshotter
//! says so (`talaria_node_snapshotter_unused`).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use sha2::{Digest, Sha256};
use talaria_api::{PlanSource, StartupRecordSpec};
use talaria_artifact::oci::registry::ImageRef;
use talaria_artifact::startup::{StartupTrace, TraceRecorder};
use tracing::{debug, info, warn};

use crate::content::prefetch::{Fetcher, StartupReport};
use crate::metrics::Metrics;
use crate::remote::cluster::ClusterSource;

/// Images watched at once (one task each); past it a start is neither recorded nor reported.
const MAX_ACTIVE: usize = 256;
/// How long after an image's first Prepare its pods hear what served them, when its start
/// is not recorded (a recorded one waits for the recording window).
const REPORT_DELAY: Duration = Duration::from_secs(15);
/// One fallback Event per image this often, at most (a pull prepares every layer).
const FALLBACK_EVENT_EVERY: Duration = Duration::from_secs(600);
const MAX_FALLBACK_KEYS: usize = 1024;
/// A start still reading new files this recently at the end of its window is followed on
/// (up to the node's window): a slow start must not be cut to the files it reached in time.
const QUIET: Duration = Duration::from_secs(3);

/// Containers started this long after the last Prepare, with none since, mean that containerd
/// is not using this snapshotter.
const UNUSED_GRACE: Duration = Duration::from_secs(120);

/// An image start the learner follows.
#[derive(Clone, Debug)]
pub struct ImageStart {
    pub manifest: String,
    /// As containerd names it (the CRI image-ref label).
    pub image_ref: String,
    /// The image's layers (the artifact's indexed ones).
    pub layers: Vec<String>,
    pub artifact: String,
    /// Where the artifact came from (`cluster`, `signed`, `referrers`).
    pub source: &'static str,
}

pub struct Learner {
    cluster: Arc<ClusterSource>,
    recorder: Option<Arc<TraceRecorder>>,
    metrics: Arc<Metrics>,
    platform: String,
    node: String,
    /// The recorder's own window: a policy's longer window is cut to it.
    max_window: Duration,
    active: Mutex<HashSet<String>>,
    fallbacks: Mutex<HashMap<String, Instant>>,
    started: Instant,
    last_prepare: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for Learner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Learner")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl Learner {
    pub fn new(
        cluster: Arc<ClusterSource>,
        recorder: Option<Arc<TraceRecorder>>,
        metrics: Arc<Metrics>,
        platform: String,
        max_window: Duration,
    ) -> Learner {
        Learner {
            cluster,
            recorder,
            metrics,
            platform,
            node: std::env::var("NODE_NAME").unwrap_or_default(),
            max_window,
            active: Mutex::new(HashSet::new()),
            fallbacks: Mutex::new(HashMap::new()),
            started: Instant::now(),
            last_prepare: Mutex::new(None),
        }
    }

    /// containerd prepared a snapshot (any: a layer or a container's).
    pub fn prepared(&self) {
        if let Ok(mut l) = self.last_prepare.lock() {
            *l = Some(Instant::now());
        }
    }

    /// The first layer of an image was located: follow its start (once per image at a time).
    pub fn started(
        self: &Arc<Self>,
        rt: &tokio::runtime::Handle,
        start: ImageStart,
        fetcher: Arc<Fetcher>,
    ) {
        {
            let Ok(mut a) = self.active.lock() else {
                return;
            };
            if a.len() >= MAX_ACTIVE || !a.insert(start.manifest.clone()) {
                return;
            }
        }
        let me = self.clone();
        rt.spawn(async move {
            me.follow(&start, &fetcher).await;
            if let Ok(mut a) = me.active.lock() {
                a.remove(&start.manifest);
            }
        });
    }

    async fn follow(&self, start: &ImageStart, fetcher: &Fetcher) {
        let target = (start.source == "cluster")
            .then(|| {
                self.cluster
                    .recording_target(&start.manifest, &self.platform)
            })
            .flatten()
            .filter(|_| self.recorder.is_some() && !self.max_window.is_zero());
        let t0 = Instant::now();
        let wait = target
            .as_ref()
            .map_or(REPORT_DELAY, |t| t.window.min(self.max_window));
        tokio::time::sleep(wait).await;
        if let (Some(_), Some(rec)) = (&target, &self.recorder) {
            // Until the image's layers see no new file for a moment, within the node's window.
            while t0.elapsed() + QUIET < self.max_window {
                let newest = rec.newest_first_read(&start.layers);
                let quiet = newest.is_none_or(|ms| {
                    rec.now_ms().saturating_sub(ms)
                        >= u64::try_from(QUIET.as_millis()).unwrap_or(u64::MAX)
                });
                if quiet {
                    break;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        let pods: Vec<Pod> = self
            .cluster
            .pods_on_node()
            .await
            .into_iter()
            .filter(|p| !containers_running(p, &start.image_ref).is_empty())
            .collect();
        let pod_names = (!pods.is_empty()).then(|| {
            let mut v: Vec<String> = pods.iter().map(pod_name).collect();
            v.sort();
            v.dedup();
            let s = v.join(",");
            s.chars().take(1024).collect::<String>()
        });
        let mut recorded = None;
        if let (Some(t), Some(rec)) = (&target, &self.recorder) {
            let trace = rec.snapshot().of_layers(&start.layers);
            let command = pods
                .iter()
                .flat_map(|p| containers_running(p, &start.image_ref))
                .find_map(|c| command_hash(&c));
            recorded = match compact(&trace) {
                None if trace.files() == 0 => {
                    self.metrics.startup_record("empty");
                    debug!(image = %start.image_ref, "the start read nothing from lazily mounted layers: no record");
                    None
                }
                None => {
                    self.metrics.startup_record("too_large");
                    warn!(image = %start.image_ref, files = trace.files(), "startup trace too large for a record");
                    None
                }
                Some((data, kept)) => {
                    let spec = StartupRecordSpec {
                        accelerated_image: t.name.clone(),
                        digest: t.digest.clone(),
                        node: if self.node.is_empty() {
                            "unknown".into()
                        } else {
                            self.node.clone()
                        },
                        pod: pod_names.clone(),
                        command,
                        recorded_at: Time(k8s_openapi::jiff::Timestamp::now()),
                        files: u32::try_from(kept.files()).unwrap_or(u32::MAX),
                        bytes: kept.bytes(),
                        trace: data,
                    };
                    match self.cluster.create_record(t, spec).await {
                        Ok(name) => {
                            self.metrics.startup_record("written");
                            info!(image = %start.image_ref, record = %name, files = kept.files(), bytes = kept.bytes(), "startup recorded for the controller");
                            Some(name)
                        }
                        Err(e) => {
                            self.metrics.startup_record("error");
                            warn!(image = %start.image_ref, error = %e, "startup record not written");
                            None
                        }
                    }
                }
            };
        }
        if pods.is_empty() {
            return;
        }
        let report = fetcher
            .existing_job(&start.manifest)
            .and_then(|j| j.report())
            .unwrap_or_default();
        let plan = match (
            start.source,
            self.cluster.plan_source(&start.manifest, &self.platform),
        ) {
            ("cluster", Some(PlanSource::Recorded)) => "recorded",
            ("cluster", Some(PlanSource::None)) => "none",
            ("cluster", _) => "predicted",
            _ => report.plan,
        };
        let note = served_note(
            start,
            plan,
            &report,
            self.metrics
                .image_bytes(&start.image_ref, &start.layers, "on_demand"),
            recorded.as_deref(),
        );
        for p in &pods {
            self.cluster
                .report_pod(p, false, "ImageAccelerated", note.clone())
                .await;
        }
    }

    /// A layer of `image_ref` is unpacked normally because of `reason`: an Event on the pods
    /// that wait for it (once per image per [`FALLBACK_EVENT_EVERY`]).
    pub fn fell_back(
        self: &Arc<Self>,
        rt: &tokio::runtime::Handle,
        image_ref: &str,
        reason: &'static str,
        message: String,
    ) {
        {
            let Ok(mut f) = self.fallbacks.lock() else {
                return;
            };
            if f.get(image_ref)
                .is_some_and(|t| t.elapsed() < FALLBACK_EVENT_EVERY)
            {
                return;
            }
            if f.len() >= MAX_FALLBACK_KEYS {
                f.retain(|_, t| t.elapsed() < FALLBACK_EVENT_EVERY);
                if f.len() >= MAX_FALLBACK_KEYS {
                    return;
                }
            }
            f.insert(image_ref.to_string(), Instant::now());
        }
        let (me, image_ref) = (self.clone(), image_ref.to_string());
        rt.spawn(async move {
            let note = format!(
                "image {image_ref}: layers pulled normally, not served lazily by Talaria ({reason}): {message}"
            );
            for p in me.cluster.pods_on_node().await {
                if !containers_of(&p, &image_ref).is_empty() {
                    me.cluster.report_pod(&p, true, "ImageAccelerationFellBack", note.clone()).await;
                }
            }
        });
    }

    /// Sets `snapshotter_unused` from this node's pods, every `every`, forever.
    pub async fn watch_usage(self: Arc<Self>, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            let since = self
                .last_prepare
                .lock()
                .ok()
                .and_then(|l| *l)
                .unwrap_or(self.started);
            let ago = since.elapsed();
            if ago < UNUSED_GRACE {
                self.metrics.snapshotter_unused.set(0);
                continue;
            }
            let now = k8s_openapi::jiff::Timestamp::now();
            let pods = self.cluster.pods_on_node().await;
            let unused = pods
                .iter()
                .any(|p| started_since(p, now, ago.saturating_sub(UNUSED_GRACE)));
            self.metrics.snapshotter_unused.set(i64::from(unused));
            if unused {
                warn!(since_last_prepare = ?ago, "containers started on this node without a Prepare through Talaria's snapshotter: is containerd configured to use it?");
            }
        }
    }
}

/// The trace compacted under the record's cap: all of it, or its first files. `None` when
/// empty or when even its first few files do not fit.
fn compact(trace: &StartupTrace) -> Option<(String, StartupTrace)> {
    let mut n = trace.files();
    while n > 0 {
        let t = if n == trace.files() {
            trace.clone()
        } else {
            trace.first_files(n)
        };
        if let Some(c) = t.to_compact() {
            return Some((c, t));
        }
        n /= 2;
    }
    None
}

fn pod_name(p: &Pod) -> String {
    format!(
        "{}/{}",
        p.metadata.namespace.as_deref().unwrap_or_default(),
        p.metadata.name.as_deref().unwrap_or_default()
    )
}

/// Whether two references name the same image (Docker Hub's defaults applied).
fn same_image(a: &str, b: &str) -> bool {
    match (ImageRef::parse(a), ImageRef::parse(b)) {
        (Ok(a), Ok(b)) => {
            a.repository == b.repository
                && (a.tag == b.tag || a.digest.is_some() || b.digest.is_some())
                && (a.digest.is_none() || b.digest.is_none() || a.digest == b.digest)
        }
        _ => a == b,
    }
}

/// The pod's containers (all kinds) of `image`.
fn containers_of(p: &Pod, image: &str) -> Vec<Container> {
    let Some(spec) = &p.spec else {
        return Vec::new();
    };
    spec.init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
        .filter(|c| c.image.as_deref().is_some_and(|i| same_image(i, image)))
        .cloned()
        .collect()
}

/// The containers of `image` of a pod that is not finished.
fn containers_running(p: &Pod, image: &str) -> Vec<Container> {
    let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded") | Some("Failed")) {
        return Vec::new();
    }
    containers_of(p, image)
}

/// What a container runs when it is not the image's own entrypoint: a hash of its command and
/// args (records are merged per command).
fn command_hash(c: &Container) -> Option<String> {
    if c.command.is_none() && c.args.is_none() {
        return None;
    }
    let json = serde_json::to_vec(&(&c.command, &c.args)).unwrap_or_default();
    let h = Sha256::digest(&json);
    Some(format!("sha256:{}", hex::encode(&h[..8])))
}

/// Whether a container of `p` (default runtime class: Talaria's own pods run on the
/// bootstrap one) started within `window` before `now`.
fn started_since(p: &Pod, now: k8s_openapi::jiff::Timestamp, window: Duration) -> bool {
    if p.spec
        .as_ref()
        .is_some_and(|s| s.runtime_class_name.is_some())
    {
        return false;
    }
    p.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|c| c.state.as_ref()?.running.as_ref()?.started_at.as_ref())
        .any(|t| Duration::try_from(now.duration_since(t.0)).is_ok_and(|d| d < window))
}

/// The note of the Event on a pod that Talaria served.
fn served_note(
    s: &ImageStart,
    plan: &str,
    r: &StartupReport,
    on_demand: u64,
    record: Option<&str>,
) -> String {
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    let mut note = format!(
        "image {}: {} layer(s) served lazily from artifact {} ({}), {} plan; startup pack {:.1} MiB, startup spans {:.1} MiB, on demand {:.1} MiB so far",
        s.image_ref,
        s.layers.len(),
        s.artifact,
        s.source,
        plan,
        mib(r.pack_bytes),
        mib(r.startup_bytes),
        mib(on_demand),
    );
    if let Some(rec) = record {
        note.push_str(&format!("; start recorded as StartupRecord {rec}"));
    }
    note
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_match_with_docker_hub_defaults() {
        assert!(same_image("busybox", "docker.io/library/busybox:latest"));
        assert!(same_image("reg:5000/a/b:1", "reg:5000/a/b:1"));
        assert!(!same_image("reg:5000/a/b:1", "reg:5000/a/b:2"));
        assert!(same_image(
            "reg:5000/a/b@sha256:0000000000000000000000000000000000000000000000000000000000000001",
            "reg:5000/a/b:1"
        ));
        assert!(!same_image("reg:5000/a/c:1", "reg:5000/a/b:1"));
    }

    #[test]
    fn only_a_command_other_than_the_images_is_hashed() {
        let mut c = Container {
            name: "c".into(),
            ..Default::default()
        };
        assert_eq!(command_hash(&c), None);
        c.args = Some(vec!["serve".into()]);
        let a = command_hash(&c).unwrap();
        c.args = Some(vec!["migrate".into()]);
        assert_ne!(command_hash(&c).unwrap(), a);
        assert!(a.starts_with("sha256:") && a.len() == 7 + 16);
    }

    #[test]
    fn a_trace_is_cut_to_fit_its_record() {
        use talaria_artifact::startup::ByteRange;
        use talaria_artifact::startup::trace::{LayerTrace, TRACE_VERSION, TracedFile};
        assert!(compact(&StartupTrace::default()).is_none());
        let t = StartupTrace {
            version: TRACE_VERSION,
            layers: vec![LayerTrace {
                digest: "sha256:l".into(),
                files: (0..3)
                    .map(|i| TracedFile {
                        path: format!("f{i}"),
                        first_ms: i,
                        ranges: vec![ByteRange { offset: 0, len: 1 }],
                    })
                    .collect(),
            }],
        };
        let (c, kept) = compact(&t).unwrap();
        assert_eq!(kept, t);
        assert_eq!(StartupTrace::from_compact(&c).unwrap(), t);
    }
}
