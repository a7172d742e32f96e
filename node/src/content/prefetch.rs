//! Fetching ahead of reads: one shared reader per layer on the node, the startup prefetch
//! of an image, and the background fetch of the rest.
//!
//! - [`Fetcher::layer`] hands out the node's one [`SharedLayer`] per layer (keyed by layer
//!   digest and span size), shared by every mount of it, by every image that has it and by
//!   the prefetchers, so a read of a span being prefetched waits for that fetch (the
//!   reader's span locks) instead of fetching it again.
//! - At the first layer Prepare of an image, [`Fetcher::job`] starts its [`ImageJob`]: the
//!   plan blob, the image manifest and all layer index blobs in parallel (the later layer
//!   Prepares of the image take their index from the job), then the plan's spans across all
//!   layers in plan order, adjacent spans merged into one ranged request up to
//!   [`MAX_REQUEST_BYTES`], as many requests at once as the link scheduler allows.
//! - Each layer's background fetch runs at the lowest class, paused while images start.
//!
//! Nothing here fails a Prepare or a read: errors are logged and counted, and reads still
//! fetch what they need on demand.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use talaria_artifact::format::{self, ArtifactInfo};
use talaria_artifact::index::reader::{
    LayerReader, PrefetchStats, ReadError, ReadObserver, SpanCache,
};
use talaria_artifact::index::verify::LayerVerifier;
use talaria_artifact::index::{DecodeError, EntryKind, LayerIndex, SpanError};
use talaria_artifact::oci::registry::{RegistryClient, RegistryError, Repository};
use talaria_artifact::oci::store::{RegistryStore, Store, StoreError};
use talaria_artifact::oci::{self, FormatError, ImageManifest, Manifest};
use talaria_artifact::source::{BoxFuture, RangeSource, SourceError};
use talaria_artifact::startup::pack::{PackError, PackRecord, PackTable};
use talaria_artifact::startup::plan::{PlanEntry, StartupPlan};
use talaria_artifact::startup::{ConfigError, ImageConfig};
use tokio::sync::{Notify, OnceCell};
use tracing::{debug, error, info, warn};

use crate::content::cache::TieredSpanCache;
use crate::content::materialize::{MaterializeError, Materializer};
use crate::content::reach::Reachability;
use crate::content::sched::{self, Class, FETCH, FetchContext, LinkScheduler, SchedError};
use crate::layerfs::tree::Tree;
use crate::metrics::{FallbackLabels, Metrics, Reason};
use talaria_artifact::startup::generic::{GenericBudget, generic_plan};

/// Largest compressed size of one merged startup request.
pub const MAX_REQUEST_BYTES: u64 = 4 << 20;
/// Largest compressed size of one background request.
const BACKGROUND_REQUEST_BYTES: u64 = 4 << 20;
/// Image jobs kept (their index blobs serve the image's later Prepares).
const MAX_JOBS: usize = 32;
/// A finished job is reused by Prepares of its image within this time.
const JOB_KEEP: Duration = Duration::from_secs(60);
/// How long after a startup prefetch its trace counts reads that waited during it.
const TRACE_GRACE: Duration = Duration::from_millis(500);
/// Longest a whole startup prefetch may take.
const STARTUP_MAX: Duration = Duration::from_secs(600);
/// Image configs read for a generic plan are small.
const MAX_CONFIG_BYTES: u64 = 4 << 20;
/// Budget of a generic plan (images with only a default artifact): uncompressed span
/// bytes and files.
const GENERIC_MAX_BYTES: u64 = 128 << 20;
const GENERIC_MAX_FILES: usize = 4096;

/// Why a step of a startup prefetch or background fetch failed. Never fatal: reads still
/// fetch on demand. [`PrefetchError::reason`] is the `stage` label of
/// `talaria_node_prefetch_errors_total`.
#[derive(Debug, thiserror::Error)]
pub enum PrefetchError {
    /// The artifact lists no index for the layer.
    #[error("artifact {artifact} does not index {layer}")]
    NotIndexed { artifact: String, layer: String },
    #[error("index blob {digest}: {source}")]
    IndexRead {
        digest: String,
        #[source]
        source: StoreError,
    },
    #[error("index {digest}: {source}")]
    IndexInvalid {
        digest: String,
        #[source]
        source: DecodeError,
    },
    /// The index blob is of another layer than the one it was listed for.
    #[error("index {digest} indexes {indexed} but the layer is {layer}")]
    IndexMismatch {
        digest: String,
        indexed: String,
        layer: String,
    },
    #[error("image manifest {digest}: {source}")]
    ManifestRead {
        digest: String,
        #[source]
        source: StoreError,
    },
    #[error("image manifest {digest}: {source}")]
    ManifestInvalid {
        digest: String,
        #[source]
        source: FormatError,
    },
    #[error("{digest} is an index")]
    ManifestIsIndex { digest: String },
    #[error("plan blob {digest}: {source}")]
    PlanRead {
        digest: String,
        #[source]
        source: StoreError,
    },
    #[error("plan blob {digest}: {source}")]
    PlanInvalid {
        digest: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("image config {digest}: {source}")]
    ConfigRead {
        digest: String,
        #[source]
        source: StoreError,
    },
    #[error("image config {digest}: {source}")]
    ConfigInvalid {
        digest: String,
        #[source]
        source: ConfigError,
    },
    #[error("generic plan task: {0}")]
    GenericPlanTask(#[source] tokio::task::JoinError),
    /// A startup span request got no permit from the link scheduler.
    #[error("{0}")]
    SpanPermit(#[source] SchedError),
    #[error("{0}")]
    SpanRead(#[source] ReadError),
    #[error("timed out after {0:?}")]
    SpanTimeout(Duration),
    #[error("{0}")]
    BackgroundPermit(#[source] SchedError),
    #[error("{0}")]
    BackgroundRead(#[source] ReadError),
    #[error("timed out after {0:?}")]
    BackgroundTimeout(Duration),
    /// The pack table breaks what readers rely on.
    #[error("{0}")]
    PackTable(#[source] PackError),
    /// The materializer cannot take the pack's files (so their reads need not wait).
    #[error("{0}")]
    PackReserve(#[source] MaterializeError),
    #[error("{0}")]
    PackPermit(#[source] SchedError),
    #[error("{0}")]
    PackRead(#[source] SourceError),
    /// The body of a pack request broke off.
    #[error("{0}")]
    PackBody(#[source] RegistryError),
    #[error("timed out after {0:?}")]
    PackTimeout(Duration),
    /// A chunk failed its digest or would not decompress.
    #[error("{0}")]
    PackChunk(#[source] PackError),
    #[error("record past the chunk")]
    PackRecordPastChunk,
    /// Writing a packed file's local copy failed.
    #[error("{0}")]
    PackWrite(#[source] MaterializeError),
    #[error("unpack task: {0}")]
    PackTask(#[source] tokio::task::JoinError),
    /// The run's request ended before this chunk, with no error to tell.
    #[error("not fetched")]
    PackNotFetched,
    /// Writing a startup file's local copy failed.
    #[error("{0}")]
    MaterializeWrite(#[source] MaterializeError),
    #[error("materializing task: {0}")]
    MaterializeTask(#[source] tokio::task::JoinError),
    #[error("startup prefetch timed out after {0:?}")]
    StartupTimeout(Duration),
    /// The image config has no usable `rootfs.diff_ids` for a layer.
    #[error("image config {digest}: {message}")]
    DiffIds { digest: String, message: String },
    /// One failure handed to several waiters: an index load shared by a job and Prepares,
    /// a pack request shared by its chunks.
    #[error(transparent)]
    Shared(Arc<PrefetchError>),
}

impl Reason for PrefetchError {
    /// The metric label: the step that failed. The values predate this type and are kept
    /// so that dashboards and alerts keep working.
    fn reason(&self) -> &'static str {
        use PrefetchError::*;
        // No wildcard: a new variant has to pick its label.
        match self {
            NotIndexed { .. } | IndexRead { .. } | IndexInvalid { .. } | IndexMismatch { .. } => {
                "index"
            }
            ManifestRead { .. } | ManifestInvalid { .. } | ManifestIsIndex { .. } => "manifest",
            PlanRead { .. } | PlanInvalid { .. } => "plan",
            ConfigRead { .. } | ConfigInvalid { .. } | GenericPlanTask(_) | DiffIds { .. } => {
                "config"
            }
            SpanPermit(_) | SpanRead(_) | SpanTimeout(_) => "fetch",
            BackgroundPermit(_) | BackgroundRead(_) | BackgroundTimeout(_) => "background",
            PackTable(_) | PackReserve(_) | PackPermit(_) | PackRead(_) | PackBody(_)
            | PackTimeout(_) | PackChunk(_) | PackRecordPastChunk | PackWrite(_) | PackTask(_)
            | PackNotFetched => "pack",
            MaterializeWrite(_) | MaterializeTask(_) => "materialize",
            StartupTimeout(_) => "timeout",
            Shared(e) => e.reason(),
        }
    }
}

/// A layer's index blob as fetched, its decoded index, and that index's inode tree once
/// asked for.
#[derive(Clone)]
pub struct LoadedIndex {
    pub raw: Bytes,
    pub index: Arc<LayerIndex>,
    /// Built once, on a blocking thread, by the first [`LoadedIndex::tree`]; `None` when the
    /// index makes no tree (the mount then builds it again and says why).
    tree: Arc<OnceCell<Option<Arc<Tree>>>>,
}

impl LoadedIndex {
    fn new(raw: Bytes, index: LayerIndex) -> LoadedIndex {
        LoadedIndex {
            raw,
            index: Arc::new(index),
            tree: Arc::default(),
        }
    }

    /// The inode tree of the index, built by the first caller (others wait for it).
    pub async fn tree(&self) -> Option<Arc<Tree>> {
        let ix = self.index.clone();
        self.tree
            .get_or_init(|| async move {
                tokio::task::spawn_blocking(move || Tree::build(&ix).ok().map(Arc::new))
                    .await
                    .ok()
                    .flatten()
            })
            .await
            .clone()
    }
}

/// Series of the per-image, per-layer byte metrics one shared layer created; removed when
/// the layer goes away, so their number stays bounded by the layers mounted.
struct LayerSeries {
    layer: String,
    /// The image the layer was first mounted or prefetched for: reads (which do not say
    /// which image they are for) are charged to it.
    owner: Arc<str>,
    metrics: Arc<Metrics>,
    images: Mutex<Option<HashSet<Arc<str>>>>,
}

impl LayerSeries {
    fn add(&self, image: Option<&Arc<str>>, kind: &str, bytes: u64) {
        let image = image.unwrap_or(&self.owner);
        let Ok(mut images) = self.images.lock() else {
            return;
        };
        // Closed: the layer is gone, and its series with it.
        let Some(set) = images.as_mut() else {
            return;
        };
        if !set.contains(image) {
            set.insert(image.clone());
        }
        self.metrics.layer_bytes(image, &self.layer, kind, bytes);
    }

    fn close(&self) {
        let images = self.images.lock().ok().and_then(|mut i| i.take());
        for image in images.into_iter().flatten() {
            self.metrics.forget_layer(&image, &self.layer);
        }
    }
}

/// Ranged reads of a layer blob: granted by the link scheduler (unless the caller holds a
/// permit), bounded in time, counted by who asked, and refused at once while the blob was
/// just found unreachable.
struct MeteredSource {
    inner: Arc<dyn RangeSource>,
    timeout: Duration,
    reach: Arc<Reachability>,
    sched: Arc<LinkScheduler>,
    host: String,
    metrics: Arc<Metrics>,
    series: Arc<LayerSeries>,
}

impl RangeSource for MeteredSource {
    fn read_range(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Bytes, SourceError>> {
        Box::pin(async move {
            if let Some(age) = self.reach.down_since() {
                return Err(SourceError::Remote(format!(
                    "registry unreachable (a fetch failed {age:.1?} ago; not tried again within {:?})",
                    self.reach.hold()
                )));
            }
            let ctx = sched::current();
            let _permit = if ctx.permit_held {
                None
            } else {
                Some(
                    self.sched
                        .acquire(&self.host, ctx.class)
                        .await
                        .map_err(|e| SourceError::Remote(e.to_string()))?,
                )
            };
            let res = tokio::time::timeout(self.timeout, self.inner.read_range(offset, len))
                .await
                .unwrap_or(Err(SourceError::Timeout(self.timeout)));
            match res {
                Ok(data) => {
                    self.reach.succeeded();
                    let n = data.len() as u64;
                    match ctx.class {
                        Class::OnDemand => {
                            self.metrics.bytes_on_demand.inc_by(n);
                        }
                        // `prefetched` counts both kinds of fetch ahead of reads.
                        Class::Startup => {
                            self.metrics.bytes_startup.inc_by(n);
                            self.metrics.bytes_prefetched.inc_by(n);
                        }
                        Class::Background => {
                            self.metrics.bytes_prefetched.inc_by(n);
                        }
                    }
                    self.series.add(ctx.image.as_ref(), ctx.class.label(), n);
                    Ok(data)
                }
                Err(e) => {
                    self.reach.failed(&e);
                    Err(e)
                }
            }
        })
    }
}

/// What reads of a shared layer report: cache use and waits (also to the startup jobs
/// running for images with this layer).
struct LayerObserver {
    layer: String,
    series: Arc<LayerSeries>,
    fetcher: Weak<Fetcher>,
}

impl ReadObserver for LayerObserver {
    fn waited(&self, waited: Duration) {
        if sched::current().class != Class::OnDemand {
            return;
        }
        let Some(f) = self.fetcher.upgrade() else {
            return;
        };
        f.metrics.read_wait_seconds.observe(waited.as_secs_f64());
        let mut during_startup = false;
        for job in f.jobs_since(Instant::now().checked_sub(waited)) {
            if job.layers.contains_key(&self.layer) {
                during_startup = true;
                job.waits.fetch_add(1, Ordering::Relaxed);
                job.wait_micros
                    .fetch_add(waited.as_micros() as u64, Ordering::Relaxed);
            }
        }
        if during_startup {
            f.metrics.startup_read_waits.inc();
            f.metrics
                .startup_read_wait_seconds
                .inc_by(waited.as_secs_f64());
        }
    }

    fn cached_bytes(&self, bytes: u64) {
        // Reads only: the node's own reads (materialization) are not what a container used.
        let ctx = sched::current();
        if ctx.class != Class::OnDemand {
            return;
        }
        if let Some(f) = self.fetcher.upgrade() {
            f.metrics.bytes_from_cache.inc_by(bytes);
        }
        self.series.add(ctx.image.as_ref(), "cache", bytes);
    }
}

/// The node's reader of one layer through one index, shared by the mounts and
/// prefetchers that read the layer through that index.
pub struct SharedLayer {
    pub reader: Arc<LayerReader>,
    pub reach: Arc<Reachability>,
    pub host: String,
    pub layer: String,
    /// Digest of the index blob the layer is read through: what readers and local copies
    /// are keyed by (another artifact's index of the same layer never meets them).
    pub index_digest: String,
    stop: Arc<AtomicBool>,
    series: Arc<LayerSeries>,
    materializer: Option<Arc<Materializer>>,
    /// What this reader's index (and the tree built from it) is charged against the
    /// node's index memory budget, given back on drop.
    charge: (Arc<AtomicU64>, u64),
}

impl Drop for SharedLayer {
    fn drop(&mut self) {
        self.charge.0.fetch_sub(self.charge.1, Ordering::Relaxed);
        // Nothing mounts or prefetches the layer any more: its background fetch ends, its
        // metric series and its materialized files go.
        self.stop.store(true, Ordering::Relaxed);
        self.series.close();
        if let Some(m) = &self.materializer {
            m.remove_layer(&self.index_digest);
        }
    }
}

/// Settings of the fetcher.
#[derive(Clone, Debug)]
pub struct FetchOptions {
    /// Longest one ranged request may take.
    pub read_timeout: Duration,
    /// Fetch the plan's spans at an image's first Prepare.
    pub startup: bool,
    /// Fetch the rest of each layer in the background.
    pub background: bool,
    /// Most memory the indexes of mounted layers (and their trees) may hold together.
    pub index_memory: u64,
}

/// A layer's index does not fit in what is left of the node's index memory budget.
#[derive(Debug, thiserror::Error)]
#[error("the index needs ~{need} bytes in memory; {held} of the node's {budget} are held")]
pub struct OverIndexBudget {
    pub need: u64,
    pub held: u64,
    pub budget: u64,
}

/// Where a layer is read through: the layer, the digest of the index blob its artifact
/// gives it, and the image manifest that asked (its config vouches for the layer's diff_id).
#[derive(Clone, Debug)]
pub struct IndexAt {
    pub layer: String,
    pub index_digest: String,
    pub manifest: String,
}

/// A layer found not to match its index.
#[derive(Clone, Debug)]
pub struct Poisoned {
    pub at: IndexAt,
    /// `talaria_artifact::index::verify::VerifyError::reason`, or `span` (a span failed its check).
    pub reason: &'static str,
    pub message: String,
}

/// Called once per poisoned layer.
pub type PoisonedHook = Box<dyn Fn(Poisoned) + Send + Sync>;

/// Shared layers, image jobs, and what they need.
pub struct Fetcher {
    rt: tokio::runtime::Handle,
    client: RegistryClient,
    cache: Arc<TieredSpanCache>,
    sched: Arc<LinkScheduler>,
    metrics: Arc<Metrics>,
    opts: FetchOptions,
    layers: Mutex<HashMap<String, Weak<SharedLayer>>>,
    jobs: Mutex<HashMap<String, Arc<ImageJob>>>,
    materializer: Option<Arc<Materializer>>,
    /// Memory charged by the live readers' indexes ([`FetchOptions::index_memory`]).
    resident: Arc<AtomicU64>,
    poisoned: std::sync::OnceLock<PoisonedHook>,
    me: Weak<Fetcher>,
}

impl Fetcher {
    pub fn new(
        rt: tokio::runtime::Handle,
        client: RegistryClient,
        cache: Arc<TieredSpanCache>,
        sched: Arc<LinkScheduler>,
        metrics: Arc<Metrics>,
        opts: FetchOptions,
        materializer: Option<Arc<Materializer>>,
    ) -> Arc<Fetcher> {
        Arc::new_cyclic(|me| Fetcher {
            rt,
            client,
            cache,
            sched,
            metrics,
            opts,
            layers: Mutex::new(HashMap::new()),
            jobs: Mutex::new(HashMap::new()),
            materializer,
            resident: Arc::default(),
            poisoned: std::sync::OnceLock::new(),
            me: me.clone(),
        })
    }

    /// Tells `hook` of every layer verification poisons (set once; later calls are ignored).
    pub fn on_poisoned(&self, hook: PoisonedHook) {
        let _ = self.poisoned.set(hook);
    }

    pub fn sched(&self) -> &Arc<LinkScheduler> {
        &self.sched
    }

    /// Where small startup files are copied, when enabled.
    pub fn materializer(&self) -> Option<&Arc<Materializer>> {
        self.materializer.as_ref()
    }

    /// The node's reader of `layer` (blob in `repo`) through the index `at` names, created
    /// with `index` if none is alive and the index fits in the node's index memory budget.
    /// `image` is charged for reads until another image takes the layer over.
    pub fn layer(
        &self,
        at: &IndexAt,
        repo: &Repository,
        art_repo: &Repository,
        index: Arc<LayerIndex>,
        image: &str,
    ) -> Result<Arc<SharedLayer>, OverIndexBudget> {
        // Keyed by the index, not the layer: what one artifact says about a layer (its
        // table of contents, spans, local copies) never serves a mount through another.
        let mut layers = match self.layers.lock() {
            Ok(l) => l,
            Err(e) => e.into_inner(),
        };
        if let Some(l) = layers.get(&at.index_digest).and_then(Weak::upgrade) {
            return Ok(l);
        }
        layers.retain(|_, w| w.strong_count() > 0);
        // The index and the inode tree built from it, about as large again.
        let need = index.memory_bytes().saturating_mul(2);
        let budget = self.opts.index_memory;
        self.resident
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                held.checked_add(need).filter(|&t| t <= budget)
            })
            .map_err(|held| OverIndexBudget { need, held, budget })?;
        let charge = (self.resident.clone(), need);
        let shared = Arc::new(self.new_layer(at, repo, art_repo, index, image, charge));
        layers.insert(at.index_digest.clone(), Arc::downgrade(&shared));
        drop(layers);
        if self.opts.background {
            self.spawn_background(&shared, at, repo);
        }
        Ok(shared)
    }

    fn new_layer(
        &self,
        at: &IndexAt,
        repo: &Repository,
        art_repo: &Repository,
        index: Arc<LayerIndex>,
        image: &str,
        charge: (Arc<AtomicU64>, u64),
    ) -> SharedLayer {
        let layer = at.layer.as_str();
        let series = Arc::new(LayerSeries {
            layer: layer.to_string(),
            owner: Arc::from(image),
            metrics: self.metrics.clone(),
            images: Mutex::new(Some(HashSet::new())),
        });
        // Shared by reads and prefetchers: either finding the registry gone makes the
        // others' uncached reads fail at once.
        let reach = Arc::new(Reachability::new(layer, self.opts.read_timeout));
        let metered = |inner: Arc<dyn RangeSource>, host: &str| -> Arc<dyn RangeSource> {
            Arc::new(MeteredSource {
                inner,
                timeout: self.opts.read_timeout,
                reach: reach.clone(),
                sched: self.sched.clone(),
                host: host.to_string(),
                metrics: self.metrics.clone(),
                series: series.clone(),
            })
        };
        let source = metered(
            Arc::new(self.client.range_source(repo, layer, index.compressed_size)),
            &repo.registry,
        );
        // A version 2 index's windows: read from the artifact's blob as spans need them.
        let windows = index.windows.map(|w| {
            metered(
                Arc::new(
                    self.client
                        .range_source(art_repo, &w.digest_string(), w.size),
                ),
                &art_repo.registry,
            )
        });
        let cache: Arc<dyn SpanCache> = self.cache.clone();
        let mut reader =
            LayerReader::new(index, source, cache).with_observer(Arc::new(LayerObserver {
                layer: layer.to_string(),
                series: series.clone(),
                fetcher: self.me.clone(),
            }));
        if let Some(w) = windows {
            reader = reader.with_windows(w);
        }
        SharedLayer {
            reader: Arc::new(reader),
            reach,
            host: repo.registry.clone(),
            layer: layer.to_string(),
            index_digest: at.index_digest.clone(),
            stop: Arc::new(AtomicBool::new(false)),
            series,
            materializer: self.materializer.clone(),
            charge,
        }
    }

    /// Fetches the layer's spans not cached, a few at a time at the lowest class, until it
    /// is complete, it fails once, or the layer goes away; then verifies the complete layer.
    fn spawn_background(&self, shared: &Arc<SharedLayer>, at: &IndexAt, repo: &Repository) {
        let reader = shared.reader.clone();
        let reach = shared.reach.clone();
        let stop = shared.stop.clone();
        let host = shared.host.clone();
        let layer = shared.layer.clone();
        let sched = self.sched.clone();
        let metrics = self.metrics.clone();
        let timeout = self.opts.read_timeout;
        let (me, at, repo) = (self.me.clone(), at.clone(), repo.clone());
        self.rt.spawn(async move {
            let index = reader.index().clone();
            let runs = merge_runs(
                (0..index.spans.len()).map(|i| (i, i)).collect(),
                &index,
                BACKGROUND_REQUEST_BYTES,
            );
            let ctx = FetchContext {
                class: Class::Background,
                permit_held: true,
                image: None,
            };
            for (first, last, _) in runs {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let res = match sched.acquire(&host, Class::Background).await {
                    Err(e) => Err(PrefetchError::BackgroundPermit(e)),
                    Ok(_permit) => {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        let fetch = FETCH.scope(ctx.clone(), reader.prefetch_spans(first, last));
                        match tokio::time::timeout(timeout, fetch).await {
                            Ok(r) => r.map(drop).map_err(PrefetchError::BackgroundRead),
                            Err(_) => Err(PrefetchError::BackgroundTimeout(timeout)),
                        }
                    }
                };
                // Bounded: one failure ends this layer's background fetch; reads still
                // fetch on demand. Bytes that fail the pinned index's span check mean the
                // registry's layer and the index disagree: the layer is poisoned.
                if let Err(e) = res {
                    metrics.prefetch_error(&e);
                    warn!(layer, error = %e, "background fetch stopped");
                    if let PrefetchError::BackgroundRead(ReadError::Span {
                        source: s @ (SpanError::DigestMismatch { .. } | SpanError::Corrupt(_)),
                        ..
                    }) = &e
                        && let Some(f) = me.upgrade()
                    {
                        f.poison(&reach, &at, "span", &s.to_string());
                    }
                    return;
                }
            }
            debug!(layer, "background fetch complete");
            if let Some(f) = me.upgrade() {
                f.verify(&reader, &reach, &at, &repo, &stop).await;
            }
        });
    }

    /// Checks a complete layer against its index and the image's diff_id
    /// ([`talaria_artifact::index::verify`]), reading it back through its reader (the
    /// background fetch just brought every span); a mismatch poisons the layer. Inconclusive
    /// when a read fails or the layer goes away: nothing is decided then.
    ///
    /// It hashes and parses the whole layer, so it stays out of starts' way: one layer at a
    /// time node-wide, only while no image is starting (the scheduler's quiet period), and
    /// not before [`VERIFY_DELAY`] after the fetch (the start that mounted the layer is
    /// usually over by then). A start that begins meanwhile pauses it between spans.
    async fn verify(
        &self,
        reader: &Arc<LayerReader>,
        reach: &Arc<Reachability>,
        at: &IndexAt,
        repo: &Repository,
        stop: &AtomicBool,
    ) {
        tokio::time::sleep(VERIFY_DELAY).await;
        // Never closed: acquiring cannot fail.
        let _turn = VERIFICATIONS.acquire().await;
        let index = reader.index().clone();
        let image_diff_id = match self.image_diff_id(repo, at).await {
            Ok(d) => Some(d),
            Err(e) => {
                debug!(layer = at.layer, error = %e, "verifying without the image's diff_id");
                None
            }
        };
        let ctx = FetchContext {
            class: Class::Background,
            permit_held: false,
            image: None,
        };
        let mut verifier = LayerVerifier::new();
        for span in &index.spans {
            self.sched.wait_quiet().await;
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let read = FETCH.scope(
                ctx.clone(),
                reader.read_at(span.uncompressed_offset, span.uncompressed_size),
            );
            let data = match tokio::time::timeout(self.opts.read_timeout, read).await {
                Ok(Ok(d)) => d,
                Ok(Err(e)) => {
                    debug!(layer = at.layer, error = %e, "verification stopped: a read failed");
                    return;
                }
                Err(_) => {
                    debug!(layer = at.layer, "verification stopped: a read timed out");
                    return;
                }
            };
            // Hashing and parsing a span (up to 128 MiB) is CPU work: off the async workers.
            let fed = tokio::task::spawn_blocking(move || {
                let r = verifier.feed(&data);
                (verifier, r)
            })
            .await;
            match fed {
                Ok((v, Ok(()))) => verifier = v,
                Ok((_, Err(e))) => return self.poison(reach, at, e.reason(), &e.to_string()),
                Err(e) => {
                    debug!(layer = at.layer, error = %e, "verification task failed");
                    return;
                }
            }
        }
        let done =
            tokio::task::spawn_blocking(move || verifier.finish(&index, image_diff_id.as_deref()))
                .await;
        match done {
            Ok(Ok(())) => {
                self.metrics.verified_layers.inc();
                debug!(layer = at.layer, index = at.index_digest, "layer verified");
            }
            Ok(Err(e)) => self.poison(reach, at, e.reason(), &e.to_string()),
            Err(e) => debug!(layer = at.layer, error = %e, "verification task failed"),
        }
    }

    /// The diff_id the image's config gives `at.layer`: fetched by the digests the image
    /// manifest (pinned by containerd's pull) names.
    async fn image_diff_id(
        &self,
        repo: &Repository,
        at: &IndexAt,
    ) -> Result<String, PrefetchError> {
        let store = RegistryStore::new(self.client.clone(), repo.clone());
        let manifest = image_manifest(&store, &at.manifest).await?;
        let config = &manifest.config.digest;
        let raw = store
            .get_blob(config, MAX_CONFIG_BYTES)
            .await
            .map_err(|source| PrefetchError::ConfigRead {
                digest: config.clone(),
                source,
            })?;
        let diff_ids = oci::config_diff_ids(&raw).map_err(|e| PrefetchError::DiffIds {
            digest: config.clone(),
            message: e.to_string(),
        })?;
        manifest
            .layers
            .iter()
            .position(|l| l.digest == at.layer)
            .and_then(|i| diff_ids.get(i).cloned())
            .ok_or_else(|| PrefetchError::DiffIds {
                digest: config.clone(),
                message: format!("no diff_id for layer {}", at.layer),
            })
    }

    /// The layer does not match its index (or the image): nothing of it is served from now
    /// on, its local copies go, and the node is told (quarantine, metric, Event).
    fn poison(&self, reach: &Reachability, at: &IndexAt, reason: &'static str, message: &str) {
        reach.poison();
        if let Some(m) = &self.materializer {
            m.remove_layer(&at.index_digest);
        }
        self.metrics
            .verification_failures
            .get_or_create(&FallbackLabels {
                reason: reason.to_string(),
            })
            .inc();
        error!(
            layer = at.layer,
            index = at.index_digest,
            manifest = at.manifest,
            reason,
            error = message,
            "layer does not match its index: poisoned, its artifact quarantined"
        );
        if let Some(hook) = self.poisoned.get() {
            hook(Poisoned {
                at: at.clone(),
                reason,
                message: message.to_string(),
            });
        }
    }

    /// Jobs whose startup prefetch ran at some time since `since` (all running ones when
    /// `None`): a read whose wait began then waited during it.
    fn jobs_since(&self, since: Option<Instant>) -> Vec<Arc<ImageJob>> {
        self.jobs
            .lock()
            .map(|j| {
                j.values()
                    .filter(|j| {
                        j.running.load(Ordering::Relaxed)
                            || j.ended
                                .lock()
                                .ok()
                                .and_then(|e| *e)
                                .is_some_and(|e| since.is_some_and(|s| e > s))
                    })
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The job of image `manifest`, started now if it has none (or only an old finished
    /// one); `None` when too many images are in flight to keep another.
    pub fn job(
        &self,
        manifest: &str,
        image: &str,
        image_repo: &Repository,
        art: &ArtifactInfo,
        art_repo: &Repository,
    ) -> Option<Arc<ImageJob>> {
        let mut jobs = self.jobs.lock().ok()?;
        if let Some(j) = jobs.get(manifest)
            && (j.running.load(Ordering::Relaxed) || j.created.elapsed() < JOB_KEEP)
            && j.artifact == art.descriptor.digest
        {
            return Some(j.clone());
        }
        jobs.remove(manifest);
        if jobs.len() >= MAX_JOBS {
            let oldest = jobs
                .iter()
                .filter(|(_, j)| !j.running.load(Ordering::Relaxed))
                .min_by_key(|(_, j)| j.created)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => {
                    jobs.remove(&k);
                }
                None => return None,
            }
        }
        let job = Arc::new(ImageJob {
            manifest: manifest.to_string(),
            image: Arc::from(image),
            artifact: art.descriptor.digest.clone(),
            layers: art
                .layers
                .iter()
                .map(|l| (l.layer_digest.clone(), OnceCell::new()))
                .collect(),
            created: Instant::now(),
            running: AtomicBool::new(self.opts.startup),
            ended: Mutex::new(None),
            cancelled: AtomicBool::new(false),
            cancel: Notify::new(),
            mounts: Mutex::new(HashSet::new()),
            held: Mutex::new(Vec::new()),
            waits: AtomicU64::new(0),
            wait_micros: AtomicU64::new(0),
            report: Mutex::new(None),
        });
        jobs.insert(manifest.to_string(), job.clone());
        drop(jobs);
        if self.opts.startup
            && let Some(me) = self.me.upgrade()
        {
            let (j, image_repo, art, art_repo) = (
                job.clone(),
                image_repo.clone(),
                art.clone(),
                art_repo.clone(),
            );
            let starting = self.sched.starting();
            self.rt.spawn(async move {
                let t0 = Instant::now();
                let work = me.run_startup(&j, &image_repo, &art, &art_repo);
                let res = tokio::select! {
                    r = tokio::time::timeout(STARTUP_MAX, work) => r.ok(),
                    _ = j.cancelled() => {
                        info!(image = %j.image, "startup prefetch cancelled: the image's layers were removed");
                        None
                    }
                };
                if let Ok(mut e) = j.ended.lock() {
                    *e = Some(Instant::now());
                }
                j.running.store(false, Ordering::Relaxed);
                drop(starting);
                let elapsed = t0.elapsed();
                me.finish(&j, elapsed, &res);
                // Reads waiting on the last requests are told of their wait just after
                // those end: the trace waits a moment to count them.
                tokio::time::sleep(TRACE_GRACE).await;
                me.trace(&j, elapsed, res);
            });
        }
        Some(job)
    }

    fn finish(&self, j: &ImageJob, elapsed: Duration, res: &Option<StartupStats>) {
        let m = &self.metrics;
        if let Some(st) = res {
            m.startup_pack_bytes.inc_by(st.pack_bytes);
            if let Ok(mut r) = j.report.lock() {
                *r = Some(StartupReport {
                    plan: st.plan,
                    pack_bytes: st.pack_bytes,
                    startup_bytes: st.bytes,
                });
            }
        }
        m.startup_requests
            .inc_by(res.as_ref().map_or(0, |st| st.requests));
        m.startup_spans
            .inc_by(res.as_ref().map_or(0, |st| st.spans));
        m.startup_seconds.observe(elapsed.as_secs_f64());
        // Last: tests and benchmarks wait on this one.
        m.startup_prefetches.inc();
        if res.is_none() && !j.cancelled.load(Ordering::Relaxed) {
            m.prefetch_error(&PrefetchError::StartupTimeout(STARTUP_MAX));
            warn!(image = %j.image, ?elapsed, "startup prefetch timed out");
        }
    }

    /// The info line of an image's startup prefetch: what it fetched, and how many reads
    /// of the image's layers waited for the network meanwhile.
    fn trace(&self, j: &ImageJob, elapsed: Duration, res: Option<StartupStats>) {
        let Some(st) = res else {
            return;
        };
        info!(
            image = %j.image,
            plan = st.plan,
            bytes = st.bytes,
            requests = st.requests,
            spans = st.spans,
            spans_skipped = st.skipped,
            errors = st.errors,
            materialized = st.materialized,
            materialized_bytes = st.materialized_bytes,
            pack_bytes = st.pack_bytes,
            pack_chunks = st.pack_chunks,
            ms = elapsed.as_millis() as u64,
            read_waits = j.waits.load(Ordering::Relaxed),
            read_wait_ms = j.wait_micros.load(Ordering::Relaxed) / 1000,
            "startup prefetch done"
        );
    }

    /// Fetches indexes, plan and the plan's spans; returns what it did.
    async fn run_startup(
        &self,
        j: &Arc<ImageJob>,
        image_repo: &Repository,
        art: &ArtifactInfo,
        art_repo: &Repository,
    ) -> StartupStats {
        let mut st = StartupStats::default();
        let art_store = RegistryStore::new(self.client.clone(), art_repo.clone());
        let image_store = RegistryStore::new(self.client.clone(), image_repo.clone());
        // Mounts wait for the indexes, the start only for the pack: past its first chunk, the
        // pack waits for the indexes rather than queue ahead of them on the link.
        let (indexes_done, indexes_in) = tokio::sync::watch::channel(false);
        let indexes = async {
            let r = futures::future::join_all(art.layers.iter().map(|l| {
                let store = &art_store;
                async move {
                    let r = j
                        .index(&l.layer_digest, || {
                            load_index(store, &l.index, &l.layer_digest)
                        })
                        .await;
                    (l.layer_digest.clone(), r)
                }
            }))
            .await;
            let _ = indexes_done.send(true);
            r
        };
        let plan = async {
            let plan = match &art.plan {
                Some(d) => art_store
                    .get_blob(&d.digest, format::MAX_INDEX_BLOB)
                    .await
                    .map_err(|source| PrefetchError::PlanRead {
                        digest: d.digest.clone(),
                        source,
                    })
                    .and_then(|raw| {
                        serde_json::from_slice::<StartupPlan>(&raw)
                            .map(Some)
                            .map_err(|source| PrefetchError::PlanInvalid {
                                digest: d.digest.clone(),
                                source,
                            })
                    }),
                None => Ok(None),
            };
            // The pack starts as soon as its table is in: its first chunk alongside the
            // indexes, the rest once they are in (see `indexes_in`).
            let pack = match (&plan, &self.materializer) {
                // A pack may only fill files of this image's own (indexed) layers: a record
                // naming another layer could write into a layer other images share.
                (Ok(Some(StartupPlan { pack: Some(t), .. })), Some(_))
                    if !t.layers.iter().all(|l| art.index_for(l).is_some()) =>
                {
                    let e = PrefetchError::PackTable(PackError::Table(
                        "the pack names a layer the artifact does not index".into(),
                    ));
                    self.metrics.prefetch_error(&e);
                    warn!(image = %j.image, error = %e, "startup pack refused; fetching the plan's spans");
                    None
                }
                (Ok(Some(StartupPlan { pack: Some(t), .. })), Some(m)) => {
                    // Local copies are kept under the index each layer is read through.
                    let keys: Arc<[String]> = t
                        .layers
                        .iter()
                        .filter_map(|l| art.index_for(l).map(|d| d.digest.clone()))
                        .collect();
                    Some(self.fetch_pack(j, t, &keys, m, art_repo, indexes_in).await)
                }
                _ => None,
            };
            (plan, pack)
        };
        let manifest = image_manifest(&image_store, &j.manifest);
        let (indexes, (plan, pack), manifest) = tokio::join!(indexes, plan, manifest);
        let packed = match pack {
            Some(p) => {
                st.pack_bytes = p.bytes;
                st.pack_chunks = p.chunks;
                st.errors += p.errors;
                p.files
            }
            None => HashSet::new(),
        };
        let mut by_layer: HashMap<String, Arc<LayerIndex>> = HashMap::new();
        for (layer, r) in indexes {
            match r {
                Ok(l) => {
                    by_layer.insert(layer, l.index);
                }
                Err(e) => {
                    st.errors += 1;
                    self.metrics.prefetch_error(&e);
                    warn!(image = %j.image, layer, error = %e, "startup prefetch: index not loaded");
                }
            }
        }
        let manifest = match manifest {
            Ok(m) => m,
            Err(e) => {
                st.errors += 1;
                self.metrics.prefetch_error(&e);
                warn!(image = %j.image, error = %e, "startup prefetch: no image manifest; nothing prefetched");
                return st;
            }
        };
        // Readers by manifest position, kept alive while the job is kept.
        let shared: Vec<Option<Arc<SharedLayer>>> = manifest
            .layers
            .iter()
            .map(|d| {
                let ix = by_layer.get(&d.digest)?;
                let at = IndexAt {
                    layer: d.digest.clone(),
                    index_digest: art.index_for(&d.digest)?.digest.clone(),
                    manifest: j.manifest.clone(),
                };
                match self.layer(&at, image_repo, art_repo, ix.clone(), &j.image) {
                    Ok(l) => Some(l),
                    Err(e) => {
                        warn!(image = %j.image, layer = at.layer, error = %e, "not prefetched: over the index memory budget");
                        None
                    }
                }
            })
            .collect();
        if let Ok(mut h) = j.held.lock() {
            *h = shared.iter().flatten().cloned().collect();
        }
        let (entries, budget) = match plan {
            Ok(Some(p)) => {
                st.plan = "accelerated";
                // What the pack brings is not fetched again as spans.
                let entries = p
                    .entries
                    .into_iter()
                    .filter(|e| {
                        let digest = manifest.layers.get(e.layer as usize).map(|d| &d.digest);
                        !digest.is_some_and(|d| {
                            packed.contains(&(d.clone(), e.path.trim_start_matches('/').into()))
                        })
                    })
                    .collect();
                (entries, p.prefetch_budget)
            }
            Ok(None) => match self.generic_entries(&image_store, &manifest, &shared).await {
                Ok(Some((e, budget))) => {
                    st.plan = "generic";
                    (e, budget)
                }
                Ok(None) => {
                    st.plan = "none";
                    return st;
                }
                Err(e) => {
                    st.errors += 1;
                    self.metrics.prefetch_error(&e);
                    warn!(image = %j.image, error = %e, "startup prefetch: no generic plan");
                    return st;
                }
            },
            Err(e) => {
                st.errors += 1;
                self.metrics.prefetch_error(&e);
                warn!(image = %j.image, error = %e, "startup prefetch: plan not loaded");
                return st;
            }
        };
        let indexes: Vec<Option<&LayerIndex>> = shared
            .iter()
            .map(|s| s.as_ref().map(|s| s.reader.index().as_ref()))
            .collect();
        let requests = plan_requests(&entries, &indexes, budget, MAX_REQUEST_BYTES);
        let ctx = FetchContext {
            class: Class::Startup,
            permit_held: true,
            image: Some(j.image.clone()),
        };
        let timeout = self.opts.read_timeout;
        let results = futures::stream::iter(requests)
            .map(|r| {
                let layer = shared.get(r.layer).and_then(Option::as_ref).cloned();
                let ctx = ctx.clone();
                async move {
                    let layer = layer?;
                    // The permit before the span locks: a queued prefetch holds no span.
                    let permit = self.sched.acquire(&layer.host, Class::Startup).await;
                    let res = match permit {
                        Ok(_p) => {
                            let fetch =
                                FETCH.scope(ctx, layer.reader.prefetch_spans(r.first, r.last));
                            match tokio::time::timeout(timeout, fetch).await {
                                Ok(r) => r.map_err(PrefetchError::SpanRead),
                                Err(_) => Err(PrefetchError::SpanTimeout(timeout)),
                            }
                        }
                        Err(e) => Err(PrefetchError::SpanPermit(e)),
                    };
                    Some((layer.layer.clone(), res))
                }
            })
            // Half the cap: the link stays shared by a few streams, so a read's fetch (first
            // in line for a permit) is not one of many slow streams behind queued prefetch.
            .buffer_unordered((self.sched.max_requests() / 2).max(1))
            .collect::<Vec<_>>()
            .await;
        for (layer, r) in results.into_iter().flatten() {
            match r {
                Ok(p) => st.add(&p),
                Err(e) => {
                    st.errors += 1;
                    self.metrics.prefetch_error(&e);
                    debug!(image = %j.image, layer, error = %e, "startup prefetch request failed");
                }
            }
        }
        if let Some(m) = &self.materializer {
            let (files, bytes) = self.materialize(m, &entries, &shared, ctx).await;
            st.materialized = files;
            st.materialized_bytes = bytes;
        }
        st
    }

    /// Fetches a startup pack ([`talaria_artifact::startup::pack`]) into the materializer:
    /// its ranges are announced first (reads of them wait for the pack from then on), then
    /// its chunks come in order, a few requests at once at the startup class, each verified
    /// and written. Whatever did not come is abandoned at the end, so no read waits on it.
    async fn fetch_pack(
        &self,
        j: &ImageJob,
        table: &PackTable,
        keys: &Arc<[String]>,
        m: &Arc<Materializer>,
        art_repo: &Repository,
        indexes_in: tokio::sync::watch::Receiver<bool>,
    ) -> PackStats {
        let mut stats = PackStats::default();
        if let Err(e) = table.check().map_err(PrefetchError::PackTable) {
            stats.errors += 1;
            self.metrics.prefetch_error(&e);
            warn!(image = %j.image, error = %e, "startup pack refused; fetching the plan's spans");
            return stats;
        }
        if keys.len() != table.layers.len() {
            // The caller found every layer indexed: not reached.
            return stats;
        }
        let digest_of = |r: &PackRecord| table.layers[r.layer as usize].as_str();
        let mut expected = HashSet::new();
        for r in table.chunks.iter().flat_map(|c| &c.records) {
            match m.expect(
                &keys[r.layer as usize],
                &r.path,
                r.file_size,
                r.offset,
                r.len,
            ) {
                Ok(true) => {
                    stats
                        .files
                        .insert((digest_of(r).to_string(), r.path.clone()));
                    expected.insert((r.layer, r.path.clone()));
                }
                Ok(false) => {}
                Err(e) => {
                    let e = PrefetchError::PackReserve(e);
                    stats.errors += 1;
                    self.metrics.prefetch_error(&e);
                    warn!(image = %j.image, error = %e, "startup pack: cannot keep its files");
                    break;
                }
            }
        }
        let source = self
            .client
            .range_source(art_repo, &table.digest, table.size);
        let host = art_repo.registry.clone();
        // Futures made up front (no closure over the stream): they borrow `self` and the
        // table, and the stream stays `Send` for the spawned job.
        let fetches: Vec<_> = pack_runs(table)
            .into_iter()
            .enumerate()
            .map(|(k, (first, last))| {
                let mut gate = (k > 0).then(|| indexes_in.clone());
                let run = self.fetch_pack_run(j, table, keys, first, last, m, &source, &host);
                async move {
                    // The first chunk keeps the link busy meanwhile. A dropped sender (the
                    // index loads are over either way) opens the gate too.
                    if let Some(g) = &mut gate {
                        let _ = g.wait_for(|done| *done).await;
                    }
                    run.await
                }
            })
            .collect();
        let results = futures::stream::iter(fetches)
            .buffer_unordered((self.sched.max_requests() / 2).max(1))
            .collect::<Vec<_>>()
            .await;
        let mut first_error = None;
        for r in results.into_iter().flatten() {
            match r {
                Ok(n) => {
                    stats.bytes += n;
                    stats.chunks += 1;
                }
                Err(e) => {
                    stats.errors += 1;
                    self.metrics.prefetch_error(&e);
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            warn!(image = %j.image, failed = stats.errors, first_error = %e, "startup pack: some chunks failed; their reads go through spans");
        }
        // Nothing more is coming: reads of what did not arrive go through spans at once.
        for (l, path) in &expected {
            m.abandon(&keys[*l as usize], path);
        }
        stats
    }

    /// Fetches chunks `first..=last` of a pack (adjacent in the blob) in one request and
    /// verifies and writes each as soon as its bytes are in, so that decompressing overlaps
    /// the transfer. If the body breaks, what is left comes in one more request (retried).
    /// A failed chunk's files are abandoned. One result a chunk: its compressed bytes, or
    /// why it failed.
    #[allow(clippy::too_many_arguments)]
    async fn fetch_pack_run(
        &self,
        j: &ImageJob,
        table: &PackTable,
        keys: &Arc<[String]>,
        first: usize,
        last: usize,
        m: &Arc<Materializer>,
        source: &talaria_artifact::oci::registry::RegistryBlobSource,
        host: &str,
    ) -> Vec<Result<u64, PrefetchError>> {
        let chunks = &table.chunks[first..=last];
        let start = chunks[0].offset;
        let end = start + chunks.iter().map(|c| c.length).sum::<u64>();
        let deadline = tokio::time::Instant::now() + self.opts.read_timeout;
        let timed_out = || PrefetchError::PackTimeout(self.opts.read_timeout);
        let fetched = |n: usize| {
            self.metrics.bytes_startup.inc_by(n as u64);
            self.metrics.bytes_prefetched.inc_by(n as u64);
        };
        let mut unpacking = Vec::with_capacity(chunks.len());
        let mut failure = None;
        // Chunks are laid end to end: each is cut off the front of what has arrived.
        let take = |buf: &mut bytes::BytesMut, unpacking: &mut Vec<_>| {
            while let Some(c) = chunks.get(unpacking.len())
                && buf.len() as u64 >= c.length
            {
                let member = buf.split_to(c.length as usize).freeze();
                unpacking.push(spawn_unpack(
                    table,
                    keys,
                    first + unpacking.len(),
                    member,
                    m,
                ));
            }
        };
        match self.sched.acquire(host, Class::Startup).await {
            Err(e) => failure = Some(PrefetchError::PackPermit(e)),
            Ok(_permit) => {
                let mut buf = bytes::BytesMut::new();
                let opened =
                    tokio::time::timeout_at(deadline, source.stream_range(start, end - start));
                match opened.await {
                    Ok(Ok(mut body)) => loop {
                        match tokio::time::timeout_at(deadline, body.next_piece()).await {
                            Ok(Ok(Some(piece))) => {
                                fetched(piece.len());
                                buf.extend_from_slice(&piece);
                                take(&mut buf, &mut unpacking);
                            }
                            Ok(Ok(None)) => break,
                            Ok(Err(e)) => {
                                failure = Some(PrefetchError::PackBody(e));
                                break;
                            }
                            Err(_) => {
                                failure = Some(timed_out());
                                break;
                            }
                        }
                    },
                    Ok(Err(e)) => failure = Some(PrefetchError::PackRead(e)),
                    Err(_) => failure = Some(timed_out()),
                }
                if unpacking.len() < chunks.len() && tokio::time::Instant::now() < deadline {
                    if let Some(e) = &failure {
                        debug!(image = %j.image, error = %e, "startup pack: reading the rest again");
                    }
                    let from = chunks[unpacking.len()].offset;
                    let rest =
                        tokio::time::timeout_at(deadline, source.read_range(from, end - from));
                    match rest.await {
                        Ok(Ok(rest)) => {
                            fetched(rest.len());
                            take(&mut bytes::BytesMut::from(rest), &mut unpacking);
                        }
                        Ok(Err(e)) => failure = Some(PrefetchError::PackRead(e)),
                        Err(_) => failure = Some(timed_out()),
                    }
                }
            }
        }
        // Every chunk that did not come fails with the request's error.
        let failure = failure.map(Arc::new);
        let mut out = Vec::with_capacity(chunks.len());
        let mut unpacking = unpacking.into_iter();
        for (k, c) in chunks.iter().enumerate() {
            let i = first + k;
            let res = match unpacking.next() {
                Some(task) => match task.await {
                    Ok(r) => r.map(|()| c.length),
                    Err(e) => Err(PrefetchError::PackTask(e)),
                },
                None => Err(failure
                    .clone()
                    .map_or(PrefetchError::PackNotFetched, PrefetchError::Shared)),
            };
            if let Err(e) = &res {
                debug!(image = %j.image, chunk = i, error = %e, "startup pack chunk failed");
                for r in &c.records {
                    m.abandon(&keys[r.layer as usize], &r.path);
                }
            }
            out.push(res);
        }
        out
    }

    /// Copies the plan's small files whose spans are in to local disk (see
    /// [`crate::content::materialize`]), in plan order until a budget is reached. Returns the files
    /// and bytes copied.
    async fn materialize(
        &self,
        m: &Arc<Materializer>,
        entries: &[PlanEntry],
        shared: &[Option<Arc<SharedLayer>>],
        ctx: FetchContext,
    ) -> (u64, u64) {
        let (mut files, mut bytes) = (0u64, 0u64);
        let mut seen = HashSet::new();
        for e in entries {
            let Some(Some(layer)) = shared.get(e.layer as usize) else {
                continue;
            };
            let ix = layer.reader.index();
            let Some(entry) = ix.find(&e.path) else {
                continue;
            };
            if entry.kind != EntryKind::File || entry.size == 0 || !m.wants(entry.size) {
                continue;
            }
            if !seen.insert((e.layer, entry.path.clone())) {
                continue;
            }
            // Only files the prefetch brought in: nothing is fetched for this.
            let first = ix.span_for(entry.offset);
            let last = ix.span_for(entry.offset.saturating_add(entry.size - 1));
            let all_in = (first..=last).all(|i| {
                ix.spans
                    .get(i)
                    .is_some_and(|s| self.cache.contains(&s.digest))
            });
            if !all_in {
                continue;
            }
            let data = match FETCH
                .scope(ctx.clone(), layer.reader.read_file(entry, 0, entry.size))
                .await
            {
                Ok(d) => d,
                Err(e) => {
                    debug!(path = %entry.path, error = %e, "not materialized: read failed");
                    continue;
                }
            };
            let (m2, digest, path) = (m.clone(), layer.index_digest.clone(), entry.path.clone());
            let len = data.len() as u64;
            // Small files, but disk writes: off the async workers.
            match tokio::task::spawn_blocking(move || m2.put(&digest, &path, &data)).await {
                Ok(Ok(true)) => {
                    files += 1;
                    bytes += len;
                    self.metrics.materialized_files.inc();
                    self.metrics.materialized_bytes.inc_by(len);
                }
                // Over a budget: later files may be smaller, but the budget is nearly spent.
                Ok(Ok(false)) => break,
                Ok(Err(e)) => {
                    let e = PrefetchError::MaterializeWrite(e);
                    self.metrics.prefetch_error(&e);
                    warn!(path = %entry.path, error = %e, "materializing stopped");
                    break;
                }
                Err(e) => {
                    let e = PrefetchError::MaterializeTask(e);
                    self.metrics.prefetch_error(&e);
                    warn!(error = %e, "materializing task failed");
                    break;
                }
            }
        }
        (files, bytes)
    }

    /// A generic plan for an image with only a default artifact, from its config (see
    /// [`crate::generic`]); `Ok(None)` means nothing to prefetch.
    async fn generic_entries(
        &self,
        image_store: &RegistryStore,
        manifest: &ImageManifest,
        shared: &[Option<Arc<SharedLayer>>],
    ) -> Result<Option<(Vec<PlanEntry>, u64)>, PrefetchError> {
        if shared.iter().all(Option::is_none) {
            return Ok(None);
        }
        let digest = &manifest.config.digest;
        let raw = image_store
            .get_blob(digest, MAX_CONFIG_BYTES)
            .await
            .map_err(|source| PrefetchError::ConfigRead {
                digest: digest.clone(),
                source,
            })?;
        let config =
            ImageConfig::from_json(&raw).map_err(|source| PrefetchError::ConfigInvalid {
                digest: digest.clone(),
                source,
            })?;
        let layers: Vec<Option<Arc<LayerIndex>>> = shared
            .iter()
            .map(|s| s.as_ref().map(|s| s.reader.index().clone()))
            .collect();
        let budget = GenericBudget {
            max_bytes: GENERIC_MAX_BYTES,
            max_files: GENERIC_MAX_FILES,
        };
        // Walks the merged tree of every layer: CPU work, off the async workers.
        let entries = tokio::task::spawn_blocking(move || generic_plan(&config, &layers, &budget))
            .await
            .map_err(PrefetchError::GenericPlanTask)?;
        Ok(Some((entries, GENERIC_MAX_BYTES)))
    }

    /// Stops `job` and lets its layers go if it is still the job of its image and no layer
    /// of the image was mounted. Returns whether it did.
    pub fn abandon_unmounted(&self, job: &Arc<ImageJob>) -> bool {
        let Ok(mut jobs) = self.jobs.lock() else {
            return false;
        };
        let current = jobs.get(&job.manifest).is_some_and(|j| Arc::ptr_eq(j, job));
        let unmounted = job.mounts.lock().map(|m| m.is_empty()).unwrap_or(false);
        if !current || !unmounted {
            return false;
        }
        jobs.remove(&job.manifest);
        drop(jobs);
        job.release();
        true
    }

    /// The job of image `manifest`, if one is kept.
    pub fn existing_job(&self, manifest: &str) -> Option<Arc<ImageJob>> {
        self.jobs.lock().ok()?.get(manifest).cloned()
    }

    /// Forgets snapshot `id` for image `manifest`; when no mount of the image is left its
    /// job is cancelled and let go, with the readers it held.
    pub fn unmounted(&self, manifest: &str, id: u64) {
        let Ok(mut jobs) = self.jobs.lock() else {
            return;
        };
        let Some(j) = jobs.get(manifest).cloned() else {
            return;
        };
        let empty = j
            .mounts
            .lock()
            // Only mounts of this job count (a newer job of the image has its own).
            .map(|mut m| m.remove(&id) && m.is_empty())
            .unwrap_or(false);
        if empty {
            jobs.remove(manifest);
            drop(jobs);
            j.release();
        }
    }
}

/// Image manifest `digest` of `store` (an index is not one).
async fn image_manifest(
    store: &RegistryStore,
    digest: &str,
) -> Result<ImageManifest, PrefetchError> {
    let raw = store
        .get_manifest(digest)
        .await
        .map_err(|source| PrefetchError::ManifestRead {
            digest: digest.to_string(),
            source,
        })?;
    match raw.parse() {
        Ok(Manifest::Image(m)) => Ok(m),
        Ok(Manifest::Index(_)) => Err(PrefetchError::ManifestIsIndex {
            digest: digest.to_string(),
        }),
        Err(source) => Err(PrefetchError::ManifestInvalid {
            digest: digest.to_string(),
            source,
        }),
    }
}

/// How long after its background fetch a layer is verified at the earliest.
const VERIFY_DELAY: Duration = Duration::from_secs(5);
/// Layers verified at once, node-wide (CPU: hashing and parsing whole layers).
static VERIFICATIONS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);

/// Index blobs from this size on are decoded at most [`LARGE_DECODES`] at a time node-wide,
/// on a blocking thread: decoding one can take up to its table-of-contents cap and entries
/// (docs/trust.md), so an image of many such layers must not decode them all at once.
const LARGE_INDEX_BLOB: usize = 4 << 20;
static LARGE_DECODES: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);

/// Decodes a layer index blob, bounded as [`LARGE_INDEX_BLOB`] says.
pub async fn decode_index(raw: &Bytes) -> Result<LayerIndex, DecodeError> {
    if raw.len() < LARGE_INDEX_BLOB {
        return LayerIndex::decode(raw);
    }
    // Never closed: acquiring cannot fail.
    let _turn = LARGE_DECODES.acquire().await;
    let raw = raw.clone();
    tokio::task::spawn_blocking(move || LayerIndex::decode(&raw))
        .await
        .unwrap_or_else(|e| Err(DecodeError::Invalid(format!("decoding task: {e}"))))
}

/// Loads, decodes and checks a layer's index blob.
async fn load_index(
    store: &RegistryStore,
    desc: &talaria_artifact::oci::Descriptor,
    layer: &str,
) -> Result<LoadedIndex, PrefetchError> {
    let raw = store
        .get_blob(&desc.digest, format::MAX_INDEX_BLOB)
        .await
        .map_err(|source| PrefetchError::IndexRead {
            digest: desc.digest.clone(),
            source,
        })?;
    let index = decode_index(&raw)
        .await
        .map_err(|source| PrefetchError::IndexInvalid {
            digest: desc.digest.clone(),
            source,
        })?;
    if index.compressed_digest_string() != layer {
        return Err(PrefetchError::IndexMismatch {
            digest: desc.digest.clone(),
            indexed: index.compressed_digest_string(),
            layer: layer.to_string(),
        });
    }
    Ok(LoadedIndex::new(raw, index))
}

/// Compressed bytes one pack request asks for at most: a few large requests fill a fast
/// link where one per ~1 MiB chunk spent its time on round trips.
const PACK_REQUEST_BYTES: u64 = 4 << 20;

/// Verifies and decompresses chunk `i` of a pack, then writes its records: all on a blocking
/// thread (disk writes), into a buffer each blocking thread keeps. Starts at once.
fn spawn_unpack(
    table: &PackTable,
    keys: &Arc<[String]>,
    i: usize,
    member: Bytes,
    m: &Arc<Materializer>,
) -> tokio::task::JoinHandle<Result<(), PrefetchError>> {
    thread_local! {
        // A fresh megabyte a chunk is a fresh mapping, faulted in page by page: with the
        // request bodies, ~20 ms of CPU a postgres start.
        static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let c = table.chunks[i].clone();
    let compression = table.compression;
    let keys = keys.clone();
    let m = m.clone();
    tokio::task::spawn_blocking(move || {
        BUF.with_borrow_mut(|data| {
            c.unpack_into(compression, i, &member, data)
                .map_err(PrefetchError::PackChunk)?;
            let mut at = 0usize;
            for r in &c.records {
                // `check` bounds every record's layer by the table's layers.
                let layer = keys
                    .get(r.layer as usize)
                    .ok_or(PrefetchError::PackRecordPastChunk)?;
                let len = r.len as usize;
                let part = at
                    .checked_add(len)
                    .and_then(|end| data.get(at..end))
                    .ok_or(PrefetchError::PackRecordPastChunk)?;
                m.fill(layer, &r.path, r.offset, part)
                    .map_err(PrefetchError::PackWrite)?;
                at += len;
            }
            Ok(())
        })
    })
}

/// Runs of adjacent pack chunks, each fetched with one request: the first chunk alone (the
/// first reads wait for it), then runs of up to [`PACK_REQUEST_BYTES`].
fn pack_runs(table: &PackTable) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    let mut bytes = 0u64;
    for (i, c) in table.chunks.iter().enumerate() {
        match runs.last_mut() {
            Some((_, last))
                if i > 1
                    && *last + 1 == i
                    && table.chunks[*last].offset + table.chunks[*last].length == c.offset
                    && bytes + c.length <= PACK_REQUEST_BYTES =>
            {
                *last = i;
                bytes += c.length;
            }
            _ => {
                runs.push((i, i));
                bytes = c.length;
            }
        }
    }
    runs
}

/// What a startup pack fetch did.
#[derive(Default)]
struct PackStats {
    /// Compressed bytes fetched, chunks written, chunks failed.
    bytes: u64,
    chunks: u64,
    errors: u64,
    /// (layer digest, path) of the files announced.
    files: HashSet<(String, String)>,
}

#[derive(Default)]
struct StartupStats {
    plan: &'static str,
    pack_bytes: u64,
    pack_chunks: u64,
    materialized: u64,
    materialized_bytes: u64,
    bytes: u64,
    requests: u64,
    spans: u64,
    skipped: u64,
    errors: u64,
}

impl StartupStats {
    fn add(&mut self, p: &PrefetchStats) {
        self.bytes += p.compressed_bytes;
        self.requests += p.requests;
        self.spans += p.spans_fetched;
        self.skipped += p.spans_skipped;
    }
}

/// The image-level work started at an image's first layer Prepare.
pub struct ImageJob {
    manifest: String,
    image: Arc<str>,
    artifact: String,
    /// Index blobs of the artifact's layers, loaded once (by the job or a Prepare).
    /// A failure is shared by everyone who asked.
    layers: HashMap<String, OnceCell<Result<LoadedIndex, Arc<PrefetchError>>>>,
    created: Instant,
    running: AtomicBool,
    /// When the startup prefetch ended.
    ended: Mutex<Option<Instant>>,
    cancelled: AtomicBool,
    cancel: Notify,
    /// Snapshots mounted for the image.
    mounts: Mutex<HashSet<u64>>,
    /// The readers of the image's layers, held while the job is kept: a layer prefetched
    /// before its Prepare keeps its reader (and its metric series) until it is mounted.
    held: Mutex<Vec<Arc<SharedLayer>>>,
    /// Reads of the image's layers that waited for the network while the job ran.
    waits: AtomicU64,
    wait_micros: AtomicU64,
    /// What the startup prefetch did, once it ended.
    report: Mutex<Option<StartupReport>>,
}

/// What an image's startup prefetch fetched (for the events on its pods).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StartupReport {
    /// Which plan it followed (`recorded`, `predicted`, ...).
    pub plan: &'static str,
    /// Compressed bytes of the startup pack, and of the plan's spans.
    pub pack_bytes: u64,
    pub startup_bytes: u64,
}

impl ImageJob {
    /// The startup prefetch's report, once it ended.
    pub fn report(&self) -> Option<StartupReport> {
        self.report.lock().ok()?.clone()
    }

    pub fn image(&self) -> &str {
        &self.image
    }
    /// The index of `layer`, loaded by `load` unless the job (or another Prepare) already
    /// has or is loading it.
    pub async fn index<F, Fut>(&self, layer: &str, load: F) -> Result<LoadedIndex, PrefetchError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<LoadedIndex, PrefetchError>>,
    {
        match self.layers.get(layer) {
            Some(cell) => cell
                .get_or_init(|| async { load().await.map_err(Arc::new) })
                .await
                .clone()
                .map_err(PrefetchError::Shared),
            None => load().await,
        }
    }

    /// Loads `layer`'s index from the artifact repository, through the job's cell.
    pub async fn load(
        &self,
        client: &RegistryClient,
        art: &ArtifactInfo,
        art_repo: &Repository,
        layer: &str,
    ) -> Result<LoadedIndex, PrefetchError> {
        let desc = art
            .index_for(layer)
            .ok_or_else(|| PrefetchError::NotIndexed {
                artifact: art.descriptor.digest.clone(),
                layer: layer.to_string(),
            })?;
        let store = RegistryStore::new(client.clone(), art_repo.clone());
        self.index(layer, || load_index(&store, desc, layer)).await
    }

    /// Starts building the tree of the layer above `layer` (`art` lists them bottom first)
    /// once its index is in: containerd prepares layers one after another, so it is ready
    /// when that Prepare comes, where building it then would hold up the pull (~1-2 µs an
    /// entry).
    pub fn build_next_tree(
        self: &Arc<Self>,
        client: &RegistryClient,
        art: &ArtifactInfo,
        art_repo: &Repository,
        layer: &str,
    ) {
        let Some(next) = art
            .layers
            .iter()
            .position(|l| l.layer_digest == layer)
            .and_then(|i| art.layers.get(i + 1))
            .map(|l| l.layer_digest.clone())
        else {
            return;
        };
        let (job, client, art, art_repo) =
            (self.clone(), client.clone(), art.clone(), art_repo.clone());
        tokio::spawn(async move {
            if let Ok(l) = job.load(&client, &art, &art_repo, &next).await {
                l.tree().await;
            }
        });
    }

    /// Records snapshot `id` as mounted for this image.
    pub fn mounted(&self, id: u64) {
        if let Ok(mut m) = self.mounts.lock() {
            m.insert(id);
        }
    }

    fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
        self.cancel.notify_waiters();
    }

    /// Cancels the job and drops the readers it held. Called outside the jobs lock: the
    /// last reader of a layer ends its series.
    fn release(&self) {
        self.cancel();
        let held = self.held.lock().map(|mut h| std::mem::take(&mut *h));
        drop(held);
    }

    async fn cancelled(&self) {
        loop {
            let n = self.cancel.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            if self.cancelled.load(Ordering::Relaxed) {
                return;
            }
            n.await;
        }
    }
}

/// One ranged request of a startup prefetch: spans `first..=last` of manifest layer `layer`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpanRequest {
    pub layer: usize,
    pub first: usize,
    pub last: usize,
}

/// Turns plan entries into ranged requests: entries by priority (stable, so plan order
/// within a priority), each entry's spans counted once against `budget` (uncompressed
/// bytes; 0 = no cap; an entry whose new spans would pass it is left out, smaller later
/// ones may still fit), then per layer adjacent spans merged up to `max_request`
/// compressed bytes, requests ordered by their earliest span in plan order.
pub fn plan_requests(
    entries: &[PlanEntry],
    layers: &[Option<&LayerIndex>],
    budget: u64,
    max_request: u64,
) -> Vec<SpanRequest> {
    let mut order: Vec<&PlanEntry> = entries.iter().collect();
    order.sort_by_key(|e| e.priority);
    // (layer, span) → rank of its first appearance.
    let mut rank: BTreeMap<(usize, usize), usize> = BTreeMap::new();
    let mut spent = 0u64;
    for e in order {
        let l = e.layer as usize;
        let Some(Some(ix)) = layers.get(l) else {
            continue;
        };
        let mut new: Vec<usize> = Vec::new();
        let mut cost = 0u64;
        for &s in &e.spans {
            let s = s as usize;
            let Some(span) = ix.spans.get(s) else {
                continue;
            };
            if rank.contains_key(&(l, s)) || new.contains(&s) {
                continue;
            }
            new.push(s);
            cost = cost.saturating_add(span.uncompressed_size);
        }
        if budget > 0 && spent.saturating_add(cost) > budget {
            continue;
        }
        spent += cost;
        for s in new {
            let next = rank.len();
            rank.insert((l, s), next);
        }
    }
    // Per layer, spans ascending (BTreeMap order) → runs.
    let mut per_layer: BTreeMap<usize, Vec<(usize, usize)>> = BTreeMap::new();
    for (&(l, s), &r) in &rank {
        per_layer.entry(l).or_default().push((s, r));
    }
    let mut out: Vec<(usize, SpanRequest)> = Vec::new();
    for (l, spans) in per_layer {
        let Some(Some(ix)) = layers.get(l) else {
            continue;
        };
        for (first, last, r) in merge_runs(spans, ix, max_request) {
            out.push((
                r,
                SpanRequest {
                    layer: l,
                    first,
                    last,
                },
            ));
        }
    }
    out.sort_by_key(|(r, _)| *r);
    out.into_iter().map(|(_, r)| r).collect()
}

/// Merges ascending `(span, rank)` pairs into runs of adjacent spans of at most
/// `max_request` compressed bytes (a single larger span is a run of its own); each run
/// with its smallest rank.
fn merge_runs(
    spans: Vec<(usize, usize)>,
    ix: &LayerIndex,
    max_request: u64,
) -> Vec<(usize, usize, usize)> {
    let mut runs: Vec<(usize, usize, usize)> = Vec::new();
    for (s, r) in spans {
        if let Some((first, last, rank)) = runs.last_mut()
            && *last + 1 == s
            && ix
                .compressed_range(s)
                .1
                .saturating_sub(ix.compressed_range(*first).0)
                <= max_request
        {
            *last = s;
            *rank = (*rank).min(r);
            continue;
        }
        runs.push((s, s, r));
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;
    use talaria_artifact::index::{Compression, Span};

    #[tokio::test]
    async fn errors_keep_their_metric_labels() {
        let d = || "sha256:d".to_string();
        let store = || StoreError::Other {
            what: "blob".into(),
            message: "gone".into(),
        };
        let sched = || SchedError::Closed("r.example".into());
        let read = || ReadError::NoWindows(d());
        let write = || MaterializeError::Io {
            what: "write",
            path: "/x".into(),
            source: std::io::Error::other("disk full"),
        };
        let join = || {
            let h = tokio::spawn(std::future::pending::<()>());
            h.abort();
            h
        };
        let t = Duration::from_secs(1);
        use PrefetchError::*;
        let cases = [
            (
                NotIndexed {
                    artifact: d(),
                    layer: d(),
                },
                "index",
            ),
            (
                IndexRead {
                    digest: d(),
                    source: store(),
                },
                "index",
            ),
            (
                IndexInvalid {
                    digest: d(),
                    source: DecodeError::BadMagic,
                },
                "index",
            ),
            (
                IndexMismatch {
                    digest: d(),
                    indexed: d(),
                    layer: d(),
                },
                "index",
            ),
            (
                ManifestRead {
                    digest: d(),
                    source: store(),
                },
                "manifest",
            ),
            (
                ManifestInvalid {
                    digest: d(),
                    source: FormatError::BadDigest(d()),
                },
                "manifest",
            ),
            (ManifestIsIndex { digest: d() }, "manifest"),
            (
                PlanRead {
                    digest: d(),
                    source: store(),
                },
                "plan",
            ),
            (
                PlanInvalid {
                    digest: d(),
                    source: serde_json::from_slice::<StartupPlan>(b"{").unwrap_err(),
                },
                "plan",
            ),
            (
                ConfigRead {
                    digest: d(),
                    source: store(),
                },
                "config",
            ),
            (
                ConfigInvalid {
                    digest: d(),
                    source: ImageConfig::from_json(b"{").unwrap_err(),
                },
                "config",
            ),
            (GenericPlanTask(join().await.unwrap_err()), "config"),
            (SpanPermit(sched()), "fetch"),
            (SpanRead(read()), "fetch"),
            (SpanTimeout(t), "fetch"),
            (BackgroundPermit(sched()), "background"),
            (BackgroundRead(read()), "background"),
            (BackgroundTimeout(t), "background"),
            (PackTable(PackError::Table("bad".into())), "pack"),
            (PackReserve(write()), "pack"),
            (PackPermit(sched()), "pack"),
            (PackRead(SourceError::Timeout(t)), "pack"),
            (
                PackBody(RegistryError::Transport {
                    op: "GET".into(),
                    url: "https://r.example/v2".into(),
                    message: "reset".into(),
                }),
                "pack",
            ),
            (PackTimeout(t), "pack"),
            (
                PackChunk(PackError::Chunk {
                    chunk: 0,
                    message: "digest".into(),
                }),
                "pack",
            ),
            (PackRecordPastChunk, "pack"),
            (PackWrite(write()), "pack"),
            (PackTask(join().await.unwrap_err()), "pack"),
            (PackNotFetched, "pack"),
            (MaterializeWrite(write()), "materialize"),
            (MaterializeTask(join().await.unwrap_err()), "materialize"),
            (StartupTimeout(t), "timeout"),
            (Shared(Arc::new(PackTimeout(t))), "pack"),
        ];
        for (e, want) in &cases {
            assert_eq!(e.reason(), *want, "{e:?}");
        }
        // The labels dashboards and alerts already know, and no others.
        let labels: HashSet<&str> = cases.iter().map(|(e, _)| e.reason()).collect();
        let known = [
            "index",
            "manifest",
            "plan",
            "config",
            "fetch",
            "background",
            "pack",
            "materialize",
            "timeout",
        ];
        assert_eq!(labels, HashSet::from(known));
        // Messages read as the strings they replaced.
        assert_eq!(SpanTimeout(t).to_string(), "timed out after 1s");
        assert_eq!(Shared(Arc::new(PackNotFetched)).to_string(), "not fetched");
        assert_eq!(
            IndexMismatch {
                digest: "sha256:i".into(),
                indexed: "sha256:a".into(),
                layer: "sha256:b".into(),
            }
            .to_string(),
            "index sha256:i indexes sha256:a but the layer is sha256:b"
        );
    }

    #[test]
    fn pack_runs_start_small_then_fill_requests() {
        let chunk = |offset: u64, length: u64| talaria_artifact::startup::pack::PackChunk {
            offset,
            length,
            sha256: String::new(),
            uncompressed: 0,
            records: Vec::new(),
        };
        let mb = 1 << 20;
        // Ten 1 MiB chunks end to end, then one after a gap.
        let mut chunks: Vec<_> = (0..10).map(|i| chunk(i * mb, mb)).collect();
        chunks.push(chunk(20 * mb, mb));
        let table = PackTable {
            chunks,
            ..PackTable::default()
        };
        assert_eq!(
            pack_runs(&table),
            [(0, 0), (1, 4), (5, 8), (9, 9), (10, 10)],
            "the first alone; runs of at most 4 MiB; nothing across a gap"
        );
        assert!(pack_runs(&PackTable::default()).is_empty());
    }

    /// An index of `n` spans of 100 compressed bytes each (a real index of a tiny layer
    /// with its spans replaced).
    fn index(n: usize) -> LayerIndex {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_size(3);
        h.set_mode(0o644);
        b.append_data(&mut h, "f", &b"abc"[..]).expect("tar");
        let blob = b.into_inner().expect("tar");
        let mut ix = talaria_artifact::index::indexer::index_layer(
            blob.as_slice(),
            Compression::None,
            &talaria_artifact::index::indexer::IndexOptions { span_size: 1024 },
        )
        .expect("index")
        .index;
        ix.compressed_size = 100 * n as u64;
        ix.uncompressed_size = 1000 * n as u64;
        ix.spans = (0..n as u64)
            .map(|i| Span {
                uncompressed_offset: 1000 * i,
                uncompressed_size: 1000,
                compressed_offset: 100 * i,
                compressed_end: 100 * (i + 1),
                bits: 0,
                window_len: 0,
                window: Bytes::new(),
                window_at: None,
                digest: [0; 32],
            })
            .collect();
        ix
    }

    fn entry(layer: u32, spans: &[u32], priority: u32) -> PlanEntry {
        PlanEntry {
            layer,
            path: format!("f{layer}-{spans:?}"),
            spans: spans.to_vec(),
            priority,
            bytes: 0,
            reason: String::new(),
        }
    }

    fn req(layer: usize, first: usize, last: usize) -> SpanRequest {
        SpanRequest { layer, first, last }
    }

    #[test]
    fn merges_adjacent_spans_in_plan_order_across_layers() {
        let (a, b) = (index(20), index(20));
        let layers = [Some(&a), None, Some(&b)];
        let entries = [
            entry(2, &[5, 6], 0),
            entry(0, &[1, 2, 3], 0),
            entry(0, &[4, 9], 1),
            entry(2, &[7], 0),
            // Not indexed, out of range, repeated: ignored.
            entry(1, &[0], 0),
            entry(0, &[99], 0),
            entry(0, &[2], 0),
        ];
        // Cap of 300 compressed bytes: at most 3 spans of 100 per request.
        let got = plan_requests(&entries, &layers, 0, 300);
        assert_eq!(
            got,
            [req(2, 5, 7), req(0, 1, 3), req(0, 4, 4), req(0, 9, 9)]
        );
        // A larger cap merges 1..=4 of layer 0 (4 has a lower priority, the run is ranked
        // by its earliest span).
        let got = plan_requests(&entries, &layers, 0, 8 << 20);
        assert_eq!(got, [req(2, 5, 7), req(0, 1, 4), req(0, 9, 9)]);
    }

    #[test]
    fn keeps_to_the_budget() {
        let a = index(20);
        let layers = [Some(&a)];
        let entries = [
            entry(0, &[0, 1], 0),
            // Would pass the budget of 3 spans: left out; the next one still fits.
            entry(0, &[10, 11], 1),
            entry(0, &[15], 2),
            entry(0, &[16], 3),
        ];
        let got = plan_requests(&entries, &layers, 3000, 8 << 20);
        assert_eq!(got, [req(0, 0, 1), req(0, 15, 15)]);
    }
}
