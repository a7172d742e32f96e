//! Remote (lazy) layers: the [`PrepareHook`] that mounts an image layer with FUSE from its
//! Talaria layer index instead of letting containerd download and unpack it.
//!
//! On a layer Prepare carrying containerd's remote-snapshot labels (target chain id, CRI
//! image ref, manifest digest, layer digest) the hook resolves the image's artifact from the
//! AcceleratedImages a policy approved (when watching a cluster, see [`crate::remote::cluster`]), else
//! through the registry's referrers (accelerated → default → none), loads the layer's index, creates
//! the active snapshot `key`, mounts the layer read-only at its `fs` dir, commits it under
//! the target name (labelled with it, as containerd's metadata layer looks it up) and answers
//! `Provided`. Anything that goes wrong is logged, counted by reason and answered `Unpack`:
//! containerd then pulls the layer as usual, so a pull never fails because of us.
//!
//! The index and where the blob lives are kept next to the snapshot (`remote.json`,
//! `layer.index`), so a restarted node remounts every remote snapshot without the registry.

pub mod cluster;
pub mod learn;
pub mod takeover;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use talaria_artifact::build::resolve_image;
use talaria_artifact::discover;
use talaria_artifact::format::{self, ArtifactError, ArtifactInfo};
use talaria_artifact::index::{EntryKind, LayerIndex};
use talaria_artifact::oci::registry::{ImageRef, RegistryClient, RegistryConfig, Repository};
use talaria_artifact::oci::store::{RegistryStore, Store};
use talaria_artifact::oci::{self, Platform};
use talaria_artifact::signature::{self, TrustedKeys};
use talaria_artifact::startup::TraceRecorder;
use tracing::{debug, error, info, warn};

use crate::content::cache::{CacheError, DiskSpanCache, TieredSpanCache};
use crate::content::materialize::Materializer;
use crate::content::prefetch::{
    FetchOptions, Fetcher, IndexAt, OverIndexBudget, Poisoned, SharedLayer, decode_index,
};
use crate::content::sched::{LinkScheduler, SchedOptions};
use crate::holder::HolderClient;
use crate::layerfs::{FsError, LayerFs, Served, Tree};
use crate::metrics::Metrics;
use crate::remote::cluster::{ClusterSource, node_platform};
use crate::snapshot::metadata::Kind;
use crate::snapshot::{
    CRI_IMAGE_REF_LABEL, CRI_LAYER_DIGEST_LABEL, CRI_MANIFEST_DIGEST_LABEL, HookError,
    LocatedLayer, PrepareHook, Snapshotter, TARGET_SNAPSHOT_REF_LABEL, Usage,
};

const RECORD_FILE: &str = "remote.json";
const INDEX_FILE: &str = "layer.index";
/// How long a resolved artifact (or its absence) is reused for the other layers of an image.
const RESOLVE_TTL: Duration = Duration::from_secs(30);
const RESOLVE_CACHE_MAX: usize = 256;
/// Recently read spans kept in memory in front of the disk cache.
const MEMORY_CACHE_BYTES: u64 = 64 << 20;
/// Quarantined index digests kept (each one a layer that failed verification).
const QUARANTINE_MAX: usize = 4096;

/// What `locate` found for a layer: its record, index (raw and decoded), the index's inode
/// tree when the image's job built it, and where the artifact came from.
struct Located {
    rec: RemoteRecord,
    raw: Bytes,
    index: Arc<LayerIndex>,
    tree: Option<Arc<Tree>>,
    source: ArtifactSource,
}

/// Settings of remote layers.
#[derive(Clone, Debug)]
pub struct RemoteOptions {
    /// Directory of the span cache.
    pub cache_dir: PathBuf,
    pub cache_max_bytes: u64,
    /// Longest a FUSE read waits for its spans before answering EIO.
    pub read_timeout: Duration,
    /// Longest artifact resolution and index loading may take in a Prepare.
    pub resolve_timeout: Duration,
    pub registry: RegistryConfig,
    /// Fetch each image's startup plan at its first Prepare, and the rest of each layer in
    /// the background after mounting it.
    pub prefetch: bool,
    /// The link scheduler's settings (concurrent requests per registry host).
    pub sched: SchedOptions,
    /// Local copies of small startup files (`None`: off).
    pub materialize: Option<MaterializeOptions>,
    /// Policy-approved AcceleratedImages, looked at before the referrers.
    pub cluster: Option<Arc<ClusterSource>>,
    /// Look for artifacts among the image's registry referrers and use the best one, signed
    /// or not (`--unverified-referrers`).
    pub referrers: bool,
    /// Use an artifact among the image's referrers when it carries a cosign-compatible
    /// signature by one of these keys (`--trusted-key`).
    pub trusted_keys: Option<TrustedKeys>,
    /// Records the file reads of container starts (served at `/startup-trace`).
    pub recorder: Option<Arc<TraceRecorder>>,
    /// Turns image starts into StartupRecords and Events (with the cluster source).
    pub learner: Option<Arc<learn::Learner>>,
    /// How long a job started by a pull warm-up runs without any layer of its image
    /// mounted before it is stopped (the pull went to another snapshotter, or failed).
    pub warmup_wait: Duration,
    /// Most memory the indexes of mounted layers may hold together; a layer whose index
    /// does not fit is unpacked normally.
    pub index_memory: u64,
    /// Where each mount's FUSE connection is kept while no agent runs (`None`: mounts end
    /// with this process).
    pub holder: Option<Arc<HolderClient>>,
    /// The handover state version written to the holder (tests write others).
    pub handover_version: u32,
}

/// Bounds of startup-local materialization.
#[derive(Clone, Debug)]
pub struct MaterializeOptions {
    /// Directory of the copies (emptied at start).
    pub dir: PathBuf,
    pub max_bytes: u64,
    pub max_files: usize,
    /// Largest file copied.
    pub max_file_bytes: u64,
}

/// Where an image's artifact was found; the `source` label of the metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArtifactSource {
    Cluster,
    /// Among the referrers, signed by a trusted key.
    Signed,
    /// Among the referrers, unverified.
    Referrers,
}

impl ArtifactSource {
    pub fn label(self) -> &'static str {
        match self {
            ArtifactSource::Cluster => "cluster",
            ArtifactSource::Signed => "signed",
            ArtifactSource::Referrers => "referrers",
        }
    }
}

/// A resolved artifact and the repository holding it (and its index blobs).
#[derive(Clone, Debug)]
struct FoundArtifact {
    info: ArtifactInfo,
    repo: Repository,
    source: ArtifactSource,
}

/// Why a layer was not mounted remotely; `reason()` is the metric label.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("label {0} is missing")]
    MissingLabel(&'static str),
    #[error("label {label}={value:?}: {message}")]
    BadLabel {
        label: &'static str,
        value: String,
        message: String,
    },
    #[error("no Talaria artifact for image {0}")]
    NoArtifact(String),
    #[error("artifact {artifact} does not index layer {layer}")]
    NotIndexed { artifact: String, layer: String },
    #[error("resolving the artifact of {image}: {source}")]
    Resolve {
        image: String,
        #[source]
        source: Box<ArtifactError>,
    },
    #[error("index {index}: {message}")]
    Index { index: String, message: String },
    #[error("artifact {artifact} of an AcceleratedImage: {message}")]
    ClusterArtifact { artifact: String, message: String },
    #[error("{0} timed out after {1:?}")]
    Timeout(&'static str, Duration),
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error("snapshot {key}: {source}")]
    Snapshot {
        key: String,
        #[source]
        source: HookError,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("index {0} is quarantined: a layer read through it did not match it")]
    Quarantined(String),
    #[error(transparent)]
    IndexMemory(#[from] OverIndexBudget),
}

impl RemoteError {
    pub fn reason(&self) -> &'static str {
        match self {
            RemoteError::MissingLabel(_) => "no_labels",
            RemoteError::BadLabel { .. } => "bad_labels",
            RemoteError::NoArtifact(_) => "no_artifact",
            RemoteError::NotIndexed { .. } => "layer_not_indexed",
            RemoteError::Resolve { .. } => "resolve_error",
            RemoteError::Index { .. } => "index_error",
            RemoteError::ClusterArtifact { .. } => "cluster_artifact_error",
            RemoteError::Timeout(..) => "timeout",
            RemoteError::Fs(FsError::Tree { .. }) => "unsupported_layer",
            RemoteError::Fs(FsError::Mount { .. }) => "mount_error",
            RemoteError::Snapshot { .. } => "snapshot_error",
            RemoteError::Io { .. } | RemoteError::Cache(_) => "io_error",
            RemoteError::Quarantined(_) => "quarantined",
            RemoteError::IndexMemory(_) => "index_memory",
        }
    }
}

/// What is kept next to a remote snapshot to mount it again.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct RemoteRecord {
    image_ref: String,
    registry: String,
    repository: String,
    manifest_digest: String,
    layer_digest: String,
    artifact: String,
    /// Where the artifact's blobs are (a version 2 index's windows are read from there);
    /// records written before this field hold version 1 indexes, which need nothing.
    #[serde(default)]
    artifact_registry: Option<String>,
    #[serde(default)]
    artifact_repository: Option<String>,
    /// Digest of the index blob kept next to the record (records written before this
    /// field: the digest of that file).
    #[serde(default)]
    index_digest: Option<String>,
}

impl RemoteRecord {
    /// The artifact's repository (the image's when not recorded).
    fn artifact_repo(&self) -> Repository {
        Repository {
            registry: self
                .artifact_registry
                .clone()
                .unwrap_or_else(|| self.registry.clone()),
            name: self
                .artifact_repository
                .clone()
                .unwrap_or_else(|| self.repository.clone()),
        }
    }
}

/// A mounted remote layer; dropping it detaches the mount.
struct Mounted {
    served: Served,
    /// The layer's shared reader: held while mounted (the reader, its cached state and
    /// its background fetch live as long as some mount or prefetch holds it).
    _layer: Arc<SharedLayer>,
    manifest: String,
}

/// The remote-layer hook. Create it inside a tokio runtime (it keeps the runtime's handle
/// for FUSE reads); its `prepare` blocks, so call it from a blocking thread (the gRPC
/// service does).
pub struct RemoteLayers {
    rt: tokio::runtime::Handle,
    client: RegistryClient,
    cache: Arc<TieredSpanCache>,
    metrics: Arc<Metrics>,
    opts: RemoteOptions,
    mounts: Mutex<HashMap<u64, Mounted>>,
    resolved: Mutex<HashMap<String, (Instant, Option<FoundArtifact>)>>,
    /// One resolution per manifest at a time: a pull's warm-up and its first Prepare may
    /// overlap, and the second then takes the first's answer.
    resolving: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// `os/arch` of this node, to pick the AcceleratedImage of its platform.
    platform: String,
    /// Shared layer readers, image jobs (startup prefetch), background fetch.
    fetcher: Arc<Fetcher>,
    /// Index digests a layer failed verification against: never mounted again by this
    /// process (a restarted agent verifies again as it fetches).
    quarantine: Arc<Mutex<HashSet<String>>>,
    /// Held mounts of a state version this agent does not know: left alone (not remounted
    /// over), for the agent that wrote them.
    unserved: Mutex<HashSet<u64>>,
}

fn label<'a>(
    labels: &'a BTreeMap<String, String>,
    name: &'static str,
) -> Result<&'a str, RemoteError> {
    labels
        .get(name)
        .map(String::as_str)
        .filter(|v| !v.is_empty())
        .ok_or(RemoteError::MissingLabel(name))
}

impl RemoteLayers {
    pub fn new(opts: RemoteOptions, metrics: Arc<Metrics>) -> Result<RemoteLayers, RemoteError> {
        let rt = tokio::runtime::Handle::try_current().map_err(|e| RemoteError::Io {
            context: "remote layers need a tokio runtime".into(),
            source: std::io::Error::other(e),
        })?;
        let client = RegistryClient::new(opts.registry.clone()).map_err(|e| RemoteError::Io {
            context: "creating the registry client".into(),
            source: std::io::Error::other(e),
        })?;
        let disk = DiskSpanCache::open(&opts.cache_dir, opts.cache_max_bytes)?
            .with_size_gauge(metrics.cache_bytes.clone());
        // Cache hits are counted by the readers, in bytes the reads used.
        let cache = Arc::new(TieredSpanCache::new(MEMORY_CACHE_BYTES, Arc::new(disk)));
        let sched = Arc::new(LinkScheduler::new(opts.sched.clone()));
        let materializer = match &opts.materialize {
            Some(m) => Some(Arc::new(
                Materializer::open(&m.dir, m.max_bytes, m.max_files, m.max_file_bytes).map_err(
                    |e| RemoteError::Io {
                        context: format!("opening the materialized files in {}", m.dir.display()),
                        source: std::io::Error::other(e),
                    },
                )?,
            )),
            None => None,
        };
        let fetcher = Fetcher::new(
            rt.clone(),
            client.clone(),
            cache.clone(),
            sched,
            metrics.clone(),
            FetchOptions {
                read_timeout: opts.read_timeout,
                startup: opts.prefetch,
                background: opts.prefetch,
                index_memory: opts.index_memory,
            },
            materializer,
        );
        let quarantine: Arc<Mutex<HashSet<String>>> = Arc::default();
        let (q, cluster, handle) = (quarantine.clone(), opts.cluster.clone(), rt.clone());
        fetcher.on_poisoned(Box::new(move |p: Poisoned| {
            if let Ok(mut q) = q.lock()
                && q.len() < QUARANTINE_MAX
            {
                q.insert(p.at.index_digest.clone());
            }
            if let Some(c) = cluster.clone() {
                handle.spawn(async move { c.report_poisoned(&p).await });
            }
        }));
        Ok(RemoteLayers {
            rt,
            client,
            cache,
            metrics,
            opts,
            mounts: Mutex::new(HashMap::new()),
            resolved: Mutex::new(HashMap::new()),
            resolving: Mutex::new(HashMap::new()),
            platform: node_platform(),
            fetcher,
            quarantine,
            unserved: Mutex::new(HashSet::new()),
        })
    }

    /// A layer read through this index failed verification.
    fn is_quarantined(&self, index_digest: &str) -> bool {
        self.quarantine
            .lock()
            .map_or(true, |q| q.contains(index_digest))
    }

    /// A pull of `image_ref` is starting (the CRI proxy saw it, and containerd does not have
    /// the image): resolve the image's manifest and artifact and start the image's job now.
    /// containerd spends several round trips and ~0.1 s of its own before its first
    /// Prepare; by then the indexes and the startup pack are on their way, and the Prepares
    /// find the artifact resolved and the job running. Failures only lose the head start.
    pub fn warm(self: &Arc<Self>, image_ref: &str) {
        let me = self.clone();
        let image = image_ref.to_string();
        self.rt.spawn(async move {
            let t0 = Instant::now();
            let outcome = match me.warm_up(&image).await {
                Ok(Some(manifest)) => {
                    info!(
                        image,
                        manifest,
                        ms = t0.elapsed().as_millis() as u64,
                        "pull warmed: artifact resolved, job started"
                    );
                    "artifact"
                }
                Ok(None) => {
                    debug!(image, "pull warm-up: no artifact");
                    "none"
                }
                Err(e) => {
                    debug!(image, error = %e, "pull warm-up failed; the Prepares resolve as usual");
                    "error"
                }
            };
            me.metrics.pull_warmup(outcome);
        });
    }

    async fn warm_up(&self, image: &str) -> Result<Option<String>, String> {
        let parsed = ImageRef::parse(image).map_err(|e| e.to_string())?;
        let store = RegistryStore::new(self.client.clone(), parsed.repository.clone());
        let reference = parsed.reference();
        let platform = Platform::parse(&self.platform).unwrap_or_else(Platform::host);
        // The manifest containerd will unpack: the tag's, or this platform's of an index.
        let (raw, _) = resolve_image(&store, &reference, &platform)
            .await
            .map_err(|e| e.to_string())?;
        let manifest = raw.digest;
        let Some(found) = self
            .resolve(&parsed.repository, &manifest, image)
            .await
            .map_err(|e| e.to_string())?
        else {
            return Ok(None);
        };
        if self.opts.prefetch
            && let Some(job) = self.fetcher.job(
                &manifest,
                image,
                &parsed.repository,
                &found.info,
                &found.repo,
            )
        {
            // Bounded: without a Prepare the job would fetch the whole startup set and the
            // layers' background for an image this node never mounts.
            let (fetcher, metrics, wait) = (
                self.fetcher.clone(),
                self.metrics.clone(),
                self.opts.warmup_wait,
            );
            let image = image.to_string();
            self.rt.spawn(async move {
                tokio::time::sleep(wait).await;
                if fetcher.abandon_unmounted(&job) {
                    metrics.pull_warmup("abandoned");
                    info!(
                        image,
                        ?wait,
                        "pull warm-up: no layer of the image was mounted; its job is stopped"
                    );
                }
            });
        }
        Ok(Some(manifest))
    }

    /// The link scheduler (concurrent requests per registry, by priority).
    pub fn sched(&self) -> &Arc<LinkScheduler> {
        self.fetcher.sched()
    }

    pub fn cache(&self) -> &Arc<TieredSpanCache> {
        &self.cache
    }

    /// Remounts the remote snapshots a previous run left committed. Returns how many came
    /// back; the others are logged, counted (`restore_error`) and removed when nothing
    /// depends on them.
    pub fn restore(&self, sn: &Snapshotter) -> crate::Result<usize> {
        let mut n = 0;
        for info in sn.list()? {
            if info.kind != Kind::Committed {
                continue;
            }
            let id = sn.id_of(&info.name)?;
            let dir = sn.snapshot_dir(id);
            if !dir.join(RECORD_FILE).exists() || self.serves(id) || self.is_unserved(id) {
                continue;
            }
            match self.remount(id, &dir, &sn.fs_path(id)) {
                Ok(()) => n += 1,
                Err(e) => {
                    self.metrics.fallback("restore_error");
                    // An empty directory must not pass for the layer: without children the
                    // snapshot is removed, so containerd sees it missing (NotFound) and the
                    // image is unpacked again on its next pull; with children it stays,
                    // and reads of it fail loudly in the log.
                    match sn.remove(&info.name) {
                        Ok(()) => {
                            error!(snapshot = info.name, error = %e, "remote snapshot could not be remounted; removed it")
                        }
                        Err(re) => {
                            error!(snapshot = info.name, error = %e, remove_error = %re, "remote snapshot could not be remounted and is still in use")
                        }
                    }
                }
            }
        }
        Ok(n)
    }

    fn is_unserved(&self, id: u64) -> bool {
        self.unserved.lock().is_ok_and(|u| u.contains(&id))
    }

    fn remount(&self, id: u64, dir: &Path, fs_dir: &Path) -> Result<(), RemoteError> {
        let (rec, index) = load_record(dir)?;
        self.mount(id, fs_dir, index, None, &rec)
    }

    /// The filesystem of `index` as snapshot `id`, reading through the node's shared reader
    /// of the layer (which starts its background fetch when new). `tree`, built from
    /// `index`, is used if that reader reads `index` (else the reader's index makes one).
    fn layer_fs(
        &self,
        id: u64,
        index: Arc<LayerIndex>,
        tree: Option<Arc<Tree>>,
        rec: &RemoteRecord,
    ) -> Result<(LayerFs, Arc<SharedLayer>), RemoteError> {
        let repo = Repository {
            registry: rec.registry.clone(),
            name: rec.repository.clone(),
        };
        let at = IndexAt {
            layer: rec.layer_digest.clone(),
            index_digest: rec.index_digest.clone().unwrap_or_default(),
            manifest: rec.manifest_digest.clone(),
        };
        if self.is_quarantined(&at.index_digest) {
            return Err(RemoteError::Quarantined(at.index_digest));
        }
        let layer = self.fetcher.layer(
            &at,
            &repo,
            &rec.artifact_repo(),
            index.clone(),
            &rec.image_ref,
        )?;
        // A tree built ahead fits only if the shared reader reads that same index.
        let tree = match tree.filter(|_| Arc::ptr_eq(layer.reader.index(), &index)) {
            Some(t) => t,
            None => Arc::new(Tree::build(layer.reader.index())?),
        };
        let mut fs = LayerFs::with_tree(
            layer.reader.clone(),
            tree,
            layer.reach.clone(),
            self.rt.clone(),
            self.opts.read_timeout,
            self.metrics.clone(),
        )
        .with_read_bytes_counter(self.metrics.fuse_read_bytes.clone());
        if let Some(m) = self.fetcher.materializer() {
            fs = fs.with_materialized(m.clone(), at.index_digest.clone());
        }
        if let Some(r) = &self.opts.recorder {
            fs = fs.with_recorder(r.clone(), rec.layer_digest.clone());
        }
        if let Some(h) = &self.opts.holder {
            fs = fs.with_handover(h.clone(), id);
        }
        Ok((fs, layer))
    }

    /// Mounts `index` at `fs_dir` as snapshot `id` (see [`RemoteLayers::layer_fs`]) and hands
    /// a copy of its connection to the holder.
    fn mount(
        &self,
        id: u64,
        fs_dir: &Path,
        index: Arc<LayerIndex>,
        tree: Option<Arc<Tree>>,
        rec: &RemoteRecord,
    ) -> Result<(), RemoteError> {
        let (fs, layer) = self.layer_fs(id, index, tree, rec)?;
        let served = fs.mount(fs_dir)?;
        if let (Some(h), Some(fd)) = (&self.opts.holder, served.fd()) {
            let state = takeover::MountState {
                snapshot: id,
                fs_dir: fs_dir.to_path_buf(),
                index_digest: rec.index_digest.clone().unwrap_or_default(),
            };
            // Not fatal: the mount works, it just ends with this process.
            if let Err(e) = h.put(id, self.opts.handover_version, state.encode(), fd) {
                self.metrics.handover(e.reason());
                warn!(id, error = %e, "the fd holder did not take the mount; it ends with this agent");
            }
        }
        self.register(id, served, layer, &rec.manifest_digest);
        debug!(id, fs = %fs_dir.display(), layer = rec.layer_digest, "remote layer mounted");
        Ok(())
    }

    fn register(&self, id: u64, served: Served, layer: Arc<SharedLayer>, manifest: &str) {
        let old = self.mounts.lock().ok().and_then(|mut m| {
            m.insert(
                id,
                Mounted {
                    served,
                    _layer: layer,
                    manifest: manifest.to_string(),
                },
            )
        });
        if old.is_none() {
            self.metrics.remote_mounts.inc();
        }
    }

    /// Shutdown: with a holder, leaves every mount to the next agent (the holder keeps the
    /// connections); without one, unmounts everything.
    pub fn unmount_all(&self) {
        let all: Vec<Mounted> = match self.mounts.lock() {
            Ok(mut m) => m.drain().map(|(_, v)| v).collect(),
            Err(_) => return,
        };
        let leave = self.opts.holder.is_some();
        for m in all {
            self.metrics.remote_mounts.dec();
            if leave {
                m.served.leave();
            }
        }
    }

    /// The artifact for a manifest, reused briefly for the image's other layers: from an
    /// approved AcceleratedImage first, else from the image's referrers (when enabled).
    async fn resolve(
        &self,
        image_repo: &Repository,
        manifest: &str,
        image: &str,
    ) -> Result<Option<FoundArtifact>, RemoteError> {
        // The cluster's pin now (an in-memory lookup): a cached resolution that is not this
        // pin is stale, whether a recorded plan replaced it or the pin was revoked.
        let pinned = match &self.opts.cluster {
            Some(c) => c.lookup(manifest, &self.platform).await,
            None => None,
        };
        let current = |a: &Option<FoundArtifact>| match (&pinned, a) {
            (Some(p), Some(a)) => {
                a.source == ArtifactSource::Cluster && a.info.descriptor.digest == p.digest
            }
            (Some(_), None) => false,
            (None, Some(a)) => a.source != ArtifactSource::Cluster,
            (None, None) => true,
        };
        let cached = || {
            self.resolved.lock().ok().and_then(|m| {
                m.get(manifest)
                    .filter(|(at, a)| at.elapsed() < RESOLVE_TTL && current(a))
                    .map(|(_, a)| a.clone())
            })
        };
        if let Some(a) = cached() {
            return Ok(a);
        }
        let lock = match self.resolving.lock() {
            Ok(mut m) => m.entry(manifest.to_string()).or_default().clone(),
            Err(_) => Arc::default(),
        };
        let _turn = lock.lock().await;
        if let Some(a) = cached() {
            return Ok(a);
        }
        let res = self
            .resolve_now(image_repo, manifest, image, pinned.as_ref())
            .await;
        if let Ok(mut m) = self.resolving.lock() {
            m.remove(manifest);
        }
        res
    }

    /// Resolves the artifact of `manifest`: the cluster's `pinned` one first.
    async fn resolve_now(
        &self,
        image_repo: &Repository,
        manifest: &str,
        image: &str,
        pinned: Option<&talaria_api::ArtifactRef>,
    ) -> Result<Option<FoundArtifact>, RemoteError> {
        debug!(image, manifest, "resolving the artifact");
        let mut found = None;
        if let Some(r) = pinned {
            match self.load_cluster_artifact(r, manifest).await {
                Ok(res) => found = Some(res),
                // A broken object must not stop the image: the referrers may still have one.
                Err(e) => warn!(image, error = %e, "artifact of an AcceleratedImage unusable"),
            }
        }
        if found.is_none()
            && let Some(keys) = &self.opts.trusted_keys
        {
            found = self
                .signed_referrer(image_repo, manifest, image, keys)
                .await?;
        }
        if found.is_none() && self.opts.referrers {
            let store = RegistryStore::new(self.client.clone(), image_repo.clone());
            found = discover::resolve(&store, manifest)
                .await
                .map_err(|source| RemoteError::Resolve {
                    image: image.to_string(),
                    source: Box::new(source),
                })?
                .map(|info| FoundArtifact {
                    info,
                    repo: image_repo.clone(),
                    source: ArtifactSource::Referrers,
                });
        }
        match &found {
            Some(r) => info!(
                image,
                artifact = r.info.descriptor.digest,
                repository = %r.repo,
                source = r.source.label(),
                "artifact resolved"
            ),
            None => debug!(image, "no artifact found"),
        }
        if let Ok(mut m) = self.resolved.lock() {
            if m.len() >= RESOLVE_CACHE_MAX {
                m.clear();
            }
            m.insert(manifest.to_string(), (Instant::now(), found.clone()));
        }
        Ok(found)
    }

    /// The best ranked artifact among the image's referrers that a trusted key signed.
    async fn signed_referrer(
        &self,
        image_repo: &Repository,
        manifest: &str,
        image: &str,
        keys: &TrustedKeys,
    ) -> Result<Option<FoundArtifact>, RemoteError> {
        let store = RegistryStore::new(self.client.clone(), image_repo.clone());
        let listed = discover::list_artifacts(&store, manifest)
            .await
            .map_err(|source| RemoteError::Resolve {
                image: image.to_string(),
                source: Box::new(source),
            })?;
        for info in format::rank(listed) {
            match signature::verify(&store, &info.descriptor.digest, keys).await {
                Ok(()) => {
                    return Ok(Some(FoundArtifact {
                        info,
                        repo: image_repo.clone(),
                        source: ArtifactSource::Signed,
                    }));
                }
                Err(e) => {
                    debug!(image, artifact = info.descriptor.digest, error = %e, "referrer not used")
                }
            }
        }
        Ok(None)
    }

    /// Loads the artifact manifest an AcceleratedImage names, checking it is about `manifest`.
    async fn load_cluster_artifact(
        &self,
        r: &talaria_api::ArtifactRef,
        manifest: &str,
    ) -> Result<FoundArtifact, RemoteError> {
        let err = |message: String| RemoteError::ClusterArtifact {
            artifact: format!("{}@{}", r.repository, r.digest),
            message,
        };
        let repo = ImageRef::parse(&r.repository)
            .map_err(|e| err(format!("repository: {e}")))?
            .repository;
        let store = RegistryStore::new(self.client.clone(), repo.clone());
        let raw = store
            .get_manifest(&r.digest)
            .await
            .map_err(|e| err(format!("fetching the manifest: {e}")))?;
        let info = format::parse_artifact(&raw).map_err(|e| err(e.to_string()))?;
        if info.subject.digest != manifest {
            return Err(err(format!(
                "its subject is {}, not the image {manifest}",
                info.subject.digest
            )));
        }
        Ok(FoundArtifact {
            info,
            repo,
            source: ArtifactSource::Cluster,
        })
    }

    /// Resolves and loads the index of the layer a Prepare is about.
    async fn locate(&self, labels: &BTreeMap<String, String>) -> Result<Located, RemoteError> {
        let image_ref = label(labels, CRI_IMAGE_REF_LABEL)?;
        let manifest = label(labels, CRI_MANIFEST_DIGEST_LABEL)?;
        let layer = label(labels, CRI_LAYER_DIGEST_LABEL)?;
        let parsed = ImageRef::parse(image_ref).map_err(|e| RemoteError::BadLabel {
            label: CRI_IMAGE_REF_LABEL,
            value: image_ref.to_string(),
            message: e.to_string(),
        })?;
        let found = self
            .resolve(&parsed.repository, manifest, image_ref)
            .await?
            .ok_or_else(|| RemoteError::NoArtifact(image_ref.to_string()))?;
        let art = &found.info;
        self.fetcher.sched().note_prepare();
        // Index blobs live with the artifact, which may be in another repository.
        let store = RegistryStore::new(self.client.clone(), found.repo.clone());
        let desc = art
            .index_for(layer)
            .ok_or_else(|| RemoteError::NotIndexed {
                artifact: art.descriptor.digest.clone(),
                layer: layer.to_string(),
            })?;
        // The image's job (started by its first Prepare) loads every index at once; this
        // layer's is taken from it. Without a job, or if its load failed, fetched here.
        let job = self.opts.prefetch.then(|| {
            self.fetcher
                .job(manifest, image_ref, &parsed.repository, art, &found.repo)
        });
        if let Some(l) = &self.opts.learner {
            l.started(
                &self.rt,
                learn::ImageStart {
                    manifest: manifest.to_string(),
                    image_ref: image_ref.to_string(),
                    layers: art.layers.iter().map(|l| l.layer_digest.clone()).collect(),
                    artifact: art.descriptor.digest.clone(),
                    source: found.source.label(),
                },
                self.fetcher.clone(),
            );
        }
        let rec = RemoteRecord {
            image_ref: image_ref.to_string(),
            registry: parsed.repository.registry,
            repository: parsed.repository.name,
            manifest_digest: manifest.to_string(),
            layer_digest: layer.to_string(),
            artifact: art.descriptor.digest.clone(),
            artifact_registry: Some(found.repo.registry.clone()),
            artifact_repository: Some(found.repo.name.clone()),
            index_digest: Some(desc.digest.clone()),
        };
        if self.is_quarantined(&desc.digest) {
            return Err(RemoteError::Quarantined(desc.digest.clone()));
        }
        if let Some(Some(job)) = job {
            match job.load(&self.client, art, &found.repo, layer).await {
                Ok(l) => {
                    job.build_next_tree(&self.client, art, &found.repo, layer);
                    let tree = l.tree().await;
                    return Ok(Located {
                        rec,
                        raw: l.raw,
                        index: l.index,
                        tree,
                        source: found.source,
                    });
                }
                Err(e) => debug!(layer, error = %e, "index not loaded by the image's job"),
            }
        }
        let raw = store
            .get_blob(&desc.digest, format::MAX_INDEX_BLOB)
            .await
            .map_err(|e| RemoteError::Resolve {
                image: image_ref.to_string(),
                source: Box::new(e.into()),
            })?;
        let index = decode_index(&raw).await.map_err(|e| RemoteError::Index {
            index: desc.digest.clone(),
            message: e.to_string(),
        })?;
        if index.compressed_digest_string() != layer {
            return Err(RemoteError::Index {
                index: desc.digest.clone(),
                message: format!(
                    "indexes {} but the layer is {layer}",
                    index.compressed_digest_string()
                ),
            });
        }
        Ok(Located {
            rec,
            raw,
            index: Arc::new(index),
            tree: None,
            source: found.source,
        })
    }
}

/// A remote layer located for one Prepare: the snapshotter creates the snapshot, this mounts
/// the layer into it, and hears how it ended.
struct RemoteLayer<'a> {
    layers: &'a RemoteLayers,
    key: String,
    target: String,
    t0: Instant,
    /// Taken by the mount.
    located: Option<Located>,
    layer_digest: String,
    image_ref: String,
    artifact: String,
    source: ArtifactSource,
}

impl RemoteLayers {
    /// Resolves the artifact and loads the layer's index, within the resolve timeout.
    fn locate_blocking(&self, labels: &BTreeMap<String, String>) -> Result<Located, RemoteError> {
        let timeout = self.opts.resolve_timeout;
        self.rt
            .block_on(tokio::time::timeout(timeout, self.locate(labels)))
            .map_err(|_| RemoteError::Timeout("resolving the artifact", timeout))?
    }

    /// Counts and logs why a layer of `image` is unpacked normally.
    fn fell_back(&self, key: &str, image: Option<&str>, e: &RemoteError) {
        let reason = e.reason();
        self.metrics.fallback(reason);
        // Images no policy accelerates, and snapshots that are not image layers, are no news.
        if let (Some(l), Some(image)) = (&self.opts.learner, image)
            && !matches!(e, RemoteError::MissingLabel(_) | RemoteError::NoArtifact(_))
        {
            l.fell_back(&self.rt, image, reason, e.to_string());
        }
        match e {
            RemoteError::MissingLabel(_) | RemoteError::NoArtifact(_) => {
                info!(key, reason, error = %e, "unpacking the layer normally")
            }
            _ => warn!(key, reason, error = %e, "remote layer failed; unpacking it normally"),
        }
    }
}

impl LocatedLayer for RemoteLayer<'_> {
    fn mount(&mut self, id: u64, dir: &Path, fs_dir: &Path) -> Result<Usage, HookError> {
        let Some(Located {
            rec,
            raw,
            index,
            tree,
            ..
        }) = self.located.take()
        else {
            return Err(RemoteError::Index {
                index: self.layer_digest.clone(),
                message: "mounted twice".into(),
            }
            .into());
        };
        let write = |name: &str, data: &[u8]| {
            fs::write(dir.join(name), data).map_err(|source| RemoteError::Io {
                context: format!("writing {}", dir.join(name).display()),
                source,
            })
        };
        let json = serde_json::to_vec_pretty(&rec).unwrap_or_default();
        write(INDEX_FILE, &raw)?;
        write(RECORD_FILE, &json)?;
        // What the layer holds, as its unpacked copy would count it.
        let usage = Usage {
            size: i64::try_from(
                index
                    .entries
                    .iter()
                    .filter(|e| e.kind == EntryKind::File)
                    .map(|e| e.size)
                    .fold(0u64, u64::saturating_add),
            )
            .unwrap_or(i64::MAX),
            inodes: i64::try_from(index.entries.len()).unwrap_or(i64::MAX),
        };
        self.layers.mount(id, fs_dir, index, tree, &rec)?;
        if let Some(job) = self.layers.fetcher.existing_job(&rec.manifest_digest) {
            job.mounted(id);
        }
        Ok(usage)
    }

    fn finish(self: Box<Self>, outcome: Result<(), HookError>) {
        match outcome {
            Ok(()) => {
                let secs = self.t0.elapsed().as_secs_f64();
                self.layers.metrics.mount_seconds.observe(secs);
                self.layers.metrics.mounted_from(self.source.label());
                info!(
                    target = self.target,
                    layer = self.layer_digest,
                    artifact = self.artifact,
                    source = self.source.label(),
                    ms = (secs * 1000.0) as u64,
                    "remote layer mounted lazily"
                );
            }
            Err(e) => {
                let e = match e.downcast::<RemoteError>() {
                    Ok(e) => *e,
                    Err(source) => RemoteError::Snapshot {
                        key: self.key.clone(),
                        source,
                    },
                };
                self.layers.fell_back(&self.key, Some(&self.image_ref), &e);
            }
        }
    }
}

impl PrepareHook for RemoteLayers {
    fn locate<'a>(
        &'a self,
        key: &str,
        _parent: &str,
        labels: &BTreeMap<String, String>,
    ) -> Option<Box<dyn LocatedLayer + 'a>> {
        // A layer or a container's snapshot: either way a container is about to start.
        if let Some(r) = &self.opts.recorder {
            r.started();
        }
        if let Some(l) = &self.opts.learner {
            l.prepared();
        }
        // Not a layer unpack (a container's or a view's snapshot): nothing to provide.
        let target = labels
            .get(TARGET_SNAPSHOT_REF_LABEL)
            .filter(|t| !t.is_empty())?;
        let t0 = Instant::now();
        debug!(target, "remote layer: locating its artifact and index");
        match self.locate_blocking(labels) {
            Ok(located) => {
                debug!(
                    target,
                    ms = t0.elapsed().as_millis() as u64,
                    "remote layer: index in"
                );
                Some(Box::new(RemoteLayer {
                    layers: self,
                    key: key.to_string(),
                    target: target.clone(),
                    t0,
                    layer_digest: located.rec.layer_digest.clone(),
                    image_ref: located.rec.image_ref.clone(),
                    artifact: located.rec.artifact.clone(),
                    source: located.source,
                    located: Some(located),
                }))
            }
            Err(e) => {
                self.fell_back(key, labels.get(CRI_IMAGE_REF_LABEL).map(|s| s.as_str()), &e);
                None
            }
        }
    }

    fn removing(&self, id: u64, _fs_dir: &Path) {
        let (m, still_mounted) = match self.mounts.lock() {
            Ok(mut all) => {
                let m = all.remove(&id);
                let still = m
                    .as_ref()
                    .is_some_and(|m| all.values().any(|o| o._layer.layer == m._layer.layer));
                (m, still)
            }
            Err(_) => (None, true),
        };
        if let Some(m) = m {
            // The layer is gone from this node: so is what its starts read.
            if let Some(r) = &self.opts.recorder
                && !still_mounted
            {
                r.forget(&m._layer.layer);
            }
            self.metrics.remote_mounts.dec();
            self.fetcher.unmounted(&m.manifest, id);
            drop(m);
            if let Some(h) = &self.opts.holder
                && let Err(e) = h.drop_entry(id)
            {
                self.metrics.handover(e.reason());
                warn!(id, error = %e, "the fd holder did not drop a removed mount");
            }
        }
    }
}

/// The record and index kept in snapshot directory `dir`, the index checked against the
/// digest the record names.
fn load_record(dir: &Path) -> Result<(RemoteRecord, Arc<LayerIndex>), RemoteError> {
    let io = |what: &str| {
        let context = format!("{what} {}", dir.display());
        move |source| RemoteError::Io { context, source }
    };
    let rec: RemoteRecord = serde_json::from_slice(
        &fs::read(dir.join(RECORD_FILE)).map_err(io("reading the record in"))?,
    )
    .map_err(|e| RemoteError::Io {
        context: format!("parsing {}", dir.join(RECORD_FILE).display()),
        source: std::io::Error::other(e),
    })?;
    let raw = fs::read(dir.join(INDEX_FILE)).map_err(io("reading the index in"))?;
    let digest = oci::sha256_digest(&raw);
    let bad = |message: String| RemoteError::Index {
        index: dir.join(INDEX_FILE).display().to_string(),
        message,
    };
    if rec.index_digest.as_ref().is_some_and(|d| *d != digest) {
        return Err(bad(format!("is {digest}, not the recorded index")));
    }
    let index = LayerIndex::decode(&raw).map_err(|e| bad(e.to_string()))?;
    let rec = RemoteRecord {
        index_digest: Some(digest),
        ..rec
    };
    Ok((rec, Arc::new(index)))
}

/// Lazily detaches every mount below `root/snapshots` (FUSE mounts of a previous process
/// whose connection died with it) but those in `keep` (held for a next agent), before the
/// snapshotter touches those directories.
pub fn detach_stale_mounts(root: &Path, keep: &HashSet<PathBuf>) -> usize {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return 0;
    };
    let base = root.join("snapshots");
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .filter(|p| p.starts_with(&base) && p != &base && !keep.contains(p))
        .collect();
    // Deepest first, so nested mounts go before their parents.
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    let mut n = 0;
    for p in points {
        match nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH) {
            Ok(()) => {
                info!(mount = %p.display(), "detached a stale mount");
                n += 1;
            }
            Err(e) => warn!(mount = %p.display(), error = %e, "detaching a stale mount failed"),
        }
    }
    n
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && let Some(v) = b
                .get(i + 1..i + 4)
                .and_then(|o| std::str::from_utf8(o).ok())
                .and_then(|o| u8::from_str_radix(o, 8).ok())
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_unescape() {
        assert_eq!(unescape_mountinfo(r"/a\040b/c"), "/a b/c");
        assert_eq!(unescape_mountinfo(r"/plain"), "/plain");
        assert_eq!(unescape_mountinfo(r"/end\04"), r"/end\04");
    }
}
