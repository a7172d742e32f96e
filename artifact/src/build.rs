//! Building an artifact for an image, and reading an image's files through its artifact.
//!
//! [`build`] resolves the image (an index → the platform's manifest), streams each layer
//! once from the store through the indexer (layers in parallel, bounded; the async byte
//! stream reaches the synchronous indexer through a bounded channel, so memory stays a few
//! chunks per layer), pushes the index blobs, then the artifact manifest LAST (no partial
//! artifact is ever visible), then makes it a referrer of the image.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use tracing::{debug, info, warn};

use crate::discover;
use crate::format::{
    self, ArtifactError, ArtifactInfo, ArtifactSpec, IndexedLayer, Knobs, Profile,
    STARTUP_PLAN_MEDIA_TYPE,
};
use crate::index::indexer::{HotRegions, IndexOptions, index_layer_hot};
use crate::index::reader::{LayerReader, MemorySpanCache, SpanCache};
use crate::index::{Compression, EntryKind, INDEX_MEDIA_TYPE, LayerIndex, WINDOWS_MEDIA_TYPE};
use crate::oci::store::{ChunkStream, Store, StoreError};
use crate::oci::{self, Descriptor, ImageManifest, Manifest, Platform, RawManifest};
use crate::startup::pack::{PackTable, PackWriter, pack_ranges};
use crate::startup::plan::StartupPlan;
use crate::startup::{self, Analysis, ImageConfig, LayerFiles, PlanOptions, StartupTrace};
use crate::view::MergedView;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
    #[error("image {image}: no manifest for platform {platform} (index has: {available})")]
    NoPlatform {
        image: String,
        platform: String,
        available: String,
    },
    #[error("image {image}: {message}")]
    BadImage { image: String, message: String },
    #[error("layer {layer}: indexing failed: {message}")]
    Index { layer: String, message: String },
    #[error(
        "layer {layer}: the bytes read have digest {actual} ({size} bytes), not the layer's digest; refusing to index them"
    )]
    LayerDigestMismatch {
        layer: String,
        actual: String,
        size: u64,
    },
}

/// How to build.
#[derive(Clone, Debug)]
pub struct BuildOptions {
    pub platform: Platform,
    pub profile: Profile,
    pub knobs: Knobs,
    /// Layers indexed at once.
    pub parallelism: usize,
    /// Stamped as `org.opencontainers.image.created`; `None` keeps the artifact
    /// deterministic (concurrent builds converge on one digest).
    pub created: Option<String>,
    /// Plan the reads of a recorded start instead of the analyzer's prediction (profiles
    /// with a plan only). The artifact is built even when one exists for the key: it
    /// replaces the predicted plan, so stamp it `created` to make it the newest.
    pub recorded: Option<Arc<Recorded>>,
    /// Which artifacts already in the store this build may adopt whole or take index
    /// blobs from instead of indexing the layers itself.
    pub reuse: Reuse,
}

/// Which existing artifacts a build may adopt or take index blobs from. An artifact in a
/// registry is only as trustworthy as whoever can push referrers there: the acceleration
/// key is public, so anyone can push one "of the key" with an index that lies.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Reuse {
    /// Any artifact in the target store: a store only trusted writers reach (the user's
    /// own OCI layout or repository; the CLI's default).
    #[default]
    AnyInStore,
    /// Only these artifact manifest digests (ones this builder made and pinned itself),
    /// fetched by digest: the image's referrers are not even listed, and everything else is
    /// built from the image's own layers (the controller).
    Only(BTreeSet<String>),
}

/// A recorded start to build the plan (and finer spans) from.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub trace: StartupTrace,
    /// Span size where the start read (see [`HotRegions`]); 0 or ≥ the knob's span size
    /// keeps spans uniform. Needs an earlier artifact's index of the layer (the default
    /// one) for the files' offsets; layers without one keep uniform spans.
    pub hot_span_size: u64,
    /// Also write a startup pack of the bytes read ([`crate::startup::pack`]).
    pub pack: bool,
    /// Most bytes the recorded plan and its pack carry, in place of the knobs' prefetch
    /// budget (which bounds a predicted plan: a recorded one carries what the start read).
    pub budget: Option<u64>,
}

/// Span size in recorded startup regions: a read there fetches about this much (plus a
/// deflate block) more than it needs, at one 32 KiB window (compressed) per span in the
/// index. Startup bench at 200 Mbit/s, one run each: 128 KiB vs 256 KiB gave jvm 2.98 vs
/// 3.42 s, python 5.45 vs 6.11 s, postgres 1.38 vs 1.36 s.
pub const DEFAULT_HOT_SPAN_SIZE: u64 = 128 << 10;

/// [`Recorded::budget`] of the CLI and benchmarks, as a policy's `recording.maxBytes` default.
pub const DEFAULT_RECORDED_BUDGET: u64 = 1 << 30;

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            platform: Platform::host(),
            profile: Profile::StartupLocalV1,
            knobs: Knobs::default(),
            parallelism: 2,
            created: None,
            recorded: None,
            reuse: Reuse::AnyInStore,
        }
    }
}

/// What happened to one layer.
#[derive(Clone, Debug)]
pub struct LayerSummary {
    pub digest: String,
    pub compressed_size: u64,
    /// Uncompressed tar size (0 when skipped).
    pub uncompressed_size: u64,
    /// The index blob (`None` when skipped).
    pub index: Option<Descriptor>,
    /// The index's windows blob (`None` when skipped, or when its windows are inline).
    pub windows: Option<Descriptor>,
    pub entries: usize,
    pub spans: usize,
    /// Why the layer was not indexed (it is pulled normally).
    pub skipped: Option<String>,
    pub duration: Duration,
}

/// The result of a build.
#[derive(Clone, Debug)]
pub struct BuildSummary {
    /// The image manifest (the artifact's subject).
    pub image: Descriptor,
    pub artifact: Descriptor,
    pub key: String,
    /// True when an artifact for the key existed and was adopted (nothing built).
    pub adopted: bool,
    pub layers: Vec<LayerSummary>,
    pub plan: Option<Descriptor>,
    /// Files and uncompressed bytes the plan fetches first (0 when adopted: not read).
    pub plan_files: usize,
    pub plan_bytes: u64,
    pub duration: Duration,
}

/// Resolves an image reference to its (platform) image manifest.
pub async fn resolve_image(
    store: &dyn Store,
    reference: &str,
    platform: &Platform,
) -> Result<(RawManifest, ImageManifest), BuildError> {
    let image = format!("{}:{reference}", store.name());
    let raw = store.get_manifest(reference).await?;
    let parsed = raw.parse().map_err(StoreError::from)?;
    let (raw, parsed) = match parsed {
        Manifest::Image(m) => (raw, m),
        Manifest::Index(idx) => {
            let pick = idx.manifest_for(platform);
            let Some(d) = pick else {
                let available = idx
                    .manifests
                    .iter()
                    .filter_map(|d| d.platform.as_ref().map(|p| p.to_string()))
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(BuildError::NoPlatform {
                    image,
                    platform: platform.to_string(),
                    available,
                });
            };
            let raw = store.get_manifest(&d.digest).await?;
            match raw.parse().map_err(StoreError::from)? {
                Manifest::Image(m) => (raw, m),
                Manifest::Index(_) => {
                    return Err(BuildError::BadImage {
                        image,
                        message: format!("platform entry {} is an index", d.digest),
                    });
                }
            }
        }
    };
    Ok((raw, parsed))
}

/// Builds (or adopts) the artifact of an image. `artifact_store` is where the artifact goes
/// (the image's store when `None`).
pub async fn build(
    image_store: Arc<dyn Store>,
    reference: &str,
    artifact_store: Option<Arc<dyn Store>>,
    opts: &BuildOptions,
) -> Result<BuildSummary, BuildError> {
    let t0 = Instant::now();
    let target = artifact_store.unwrap_or_else(|| image_store.clone());
    let (raw, manifest) = resolve_image(image_store.as_ref(), reference, &opts.platform).await?;
    let subject = raw.descriptor();
    let key = format::acceleration_key(opts.profile, &opts.knobs);

    let replacing = opts.recorded.is_some() && opts.profile.has_plan();
    // One look at what exists: adopted whole when it has this key, else its index blobs
    // are reused (layer indexes do not depend on the profile: the default artifact, built
    // first by the controller, lends them, so the layers are not streamed again).
    let existing = match &opts.reuse {
        Reuse::AnyInStore => discover::list_artifacts(target.as_ref(), &subject.digest).await,
        Reuse::Only(digests) => {
            discover::load_artifacts(
                target.as_ref(),
                &subject.digest,
                digests.iter().map(String::as_str),
            )
            .await
        }
    };
    let existing = match existing {
        Ok(a) => a,
        // A replacing build adopts nothing; it only loses the reuse.
        Err(e) if replacing => {
            debug!(image = %subject.digest, error = %e, "no earlier artifacts to reuse indexes from");
            Vec::new()
        }
        Err(e) => return Err(e.into()),
    };
    if !replacing && let Some(found) = discover::pick_by_key(existing.clone(), &key) {
        info!(image = %subject.digest, artifact = %found.descriptor.digest, %key, "artifact exists; adopted");
        return Ok(adopted(subject, found, key, t0));
    }
    let reusable: Arc<HashMap<String, Descriptor>> = Arc::new(
        existing
            .into_iter()
            .flat_map(|a| a.layers)
            .map(|l| (l.layer_digest, l.index))
            .collect(),
    );
    let mut hot = match &opts.recorded {
        Some(rec) if replacing => {
            hot_regions(
                target.as_ref(),
                rec,
                &reusable,
                &opts.knobs,
                &manifest.layers,
            )
            .await
        }
        _ => HashMap::new(),
    };
    let layers = manifest.layers.clone();
    let results: Vec<Result<IndexedOne, BuildError>> = futures::stream::iter(layers)
        .map(|layer| {
            let image_store = image_store.clone();
            let target = target.clone();
            let knobs = opts.knobs.clone();
            let reusable = reusable.clone();
            let hot = hot.remove(&layer.digest);
            async move {
                if hot.is_none()
                    && let Some(found) =
                        reuse_index(target.as_ref(), &layer, &knobs, &reusable).await
                {
                    return Ok(found);
                }
                index_one(image_store, target, layer, &knobs, hot).await
            }
        })
        .buffered(opts.parallelism.max(1))
        .collect()
        .await;
    let mut summaries = Vec::with_capacity(results.len());
    let mut indexes = Vec::with_capacity(results.len());
    for r in results {
        let (s, i) = r?;
        summaries.push(s);
        indexes.push(i);
    }

    let mut indexed = Vec::new();
    let mut skipped = Vec::new();
    for s in &summaries {
        match &s.index {
            Some(d) => indexed.push(IndexedLayer {
                layer_digest: s.digest.clone(),
                index: d.clone(),
                windows: s.windows.clone(),
            }),
            None => skipped.push(s.digest.clone()),
        }
    }

    let mut pack = None;
    let (mut plan_files, mut plan_bytes) = (0, 0);
    let (plan, startup_paths) = if opts.profile.has_plan() {
        let (mut p, pack_blob) =
            startup_plan(image_store.as_ref(), &manifest, &indexes, opts).await;
        plan_files = p.entries.len();
        plan_bytes = p
            .entries
            .iter()
            .map(|e| e.bytes)
            .fold(0u64, u64::saturating_add);
        if let (Some(blob), Some(table)) = (pack_blob, p.pack.as_ref()) {
            let d = target
                .put_blob(table.compression.media_type(), blob)
                .await?;
            if d.digest == table.digest {
                pack = Some(d);
            } else {
                warn!(stored = %d.digest, table = %table.digest, "the stored pack is not the one written; plan without it");
                p.pack = None;
            }
        }
        let paths = p.paths.clone();
        let bytes = serde_json::to_vec(&p).map_err(|e| ArtifactError::Invalid {
            digest: "(plan)".into(),
            message: e.to_string(),
        })?;
        let d = target
            .put_blob(STARTUP_PLAN_MEDIA_TYPE, Bytes::from(bytes))
            .await?;
        (Some(d), paths)
    } else {
        (None, Vec::new())
    };

    let art = format::build_manifest(ArtifactSpec {
        subject: subject.clone(),
        profile: opts.profile,
        knobs: &opts.knobs,
        layers: indexed,
        skipped,
        plan: plan.clone(),
        startup_paths,
        plan_recorded: opts.recorded.is_some(),
        pack,
        created: opts.created.clone(),
    })?;
    // The config blob (`{}`) must exist before the manifest that names it.
    target
        .put_blob(oci::OCI_EMPTY, Bytes::from_static(oci::EMPTY_JSON))
        .await?;
    // Everything the manifest names is stored: now the manifest, then the referrer entry.
    let desc = target.put_manifest(&art, None).await?;
    let parsed = match art.parse().map_err(StoreError::from)? {
        Manifest::Image(m) => m,
        Manifest::Index(_) => unreachable_index(&art)?,
    };
    let referrer = oci::referrer_descriptor(&art, &parsed);
    target.add_referrer(&subject.digest, &referrer).await?;
    info!(image = %subject.digest, artifact = %desc.digest, %key, layers = summaries.len(), elapsed = ?t0.elapsed(), "artifact built");
    Ok(BuildSummary {
        image: subject,
        artifact: desc,
        key,
        adopted: false,
        layers: summaries,
        plan,
        plan_files,
        plan_bytes,
        duration: t0.elapsed(),
    })
}

/// Span cache for the startup analysis reads (headers, dynamic sections, small files).
const ANALYSIS_CACHE_BYTES: u64 = 64 << 20;
/// Largest image config read.
const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// The startup plan of an image: the analyzer predicts the files its start reads (through
/// the fresh indexes, reading only what it needs from the image store), the plan maps them
/// to spans within the prefetch budget. Never fails the build: an unreadable config gives
/// an empty (but well-formed) plan. A recorded plan may come with a pack (its table in the
/// plan, its blob returned to be stored).
async fn startup_plan(
    image_store: &dyn Store,
    manifest: &ImageManifest,
    indexes: &[Option<Arc<LayerIndex>>],
    opts: &BuildOptions,
) -> (StartupPlan, Option<Bytes>) {
    let empty = || StartupPlan {
        version: opts.profile.version(),
        profile: opts.profile.name().to_string(),
        prefetch_budget: opts.knobs.prefetch_budget,
        paths: Vec::new(),
        entries: Vec::new(),
        pack: None,
    };
    let config = match image_store
        .get_blob(&manifest.config.digest, MAX_CONFIG_BYTES)
        .await
        .map_err(|e| e.to_string())
        .and_then(|b| ImageConfig::from_json(&b).map_err(|e| e.to_string()))
    {
        Ok(c) => c,
        Err(e) => {
            warn!(config = %manifest.config.digest, error = %e, "image config unusable; empty startup plan");
            return (empty(), None);
        }
    };
    let refs: Vec<Option<&LayerIndex>> = indexes.iter().map(|i| i.as_deref()).collect();
    let plan_opts = PlanOptions {
        profile: opts.profile.name().to_string(),
        version: opts.profile.version(),
        budget: opts.knobs.prefetch_budget,
    };
    if let Some(rec) = &opts.recorded {
        let trace = &rec.trace;
        let digests: Vec<String> = manifest.layers.iter().map(|l| l.digest.clone()).collect();
        let analysis = startup::analysis_from_trace(trace, &digests, &refs);
        info!(
            recorded_files = trace.files(),
            files = analysis.files.len(),
            notes = analysis.notes.len(),
            "startup plan from a recorded trace"
        );
        let plan_opts = PlanOptions {
            budget: rec.budget.unwrap_or(plan_opts.budget),
            ..plan_opts
        };
        let mut plan = startup::build_plan(&analysis, &refs, &plan_opts);
        plan.prefetch_budget = plan_opts.budget;
        if !rec.pack {
            return (plan, None);
        }
        return match recorded_pack(image_store, manifest, indexes, &analysis, plan_opts.budget)
            .await
        {
            Ok(Some((table, blob))) => {
                info!(
                    files = analysis.files.len(),
                    bytes = table.bytes(),
                    compressed = table.size,
                    chunks = table.chunks.len(),
                    "startup pack of the recorded reads"
                );
                plan.pack = Some(table);
                (plan, Some(blob))
            }
            Ok(None) => (plan, None),
            Err(e) => {
                warn!(error = %e, "no startup pack; the recorded plan goes without it");
                (plan, None)
            }
        };
    }
    let view = MergedView::new(&refs);
    let cache: Arc<dyn SpanCache> = Arc::new(MemorySpanCache::new(ANALYSIS_CACHE_BYTES));
    let mut readers = Vec::with_capacity(indexes.len());
    for (i, idx) in indexes.iter().enumerate() {
        let reader = match (idx, manifest.layers.get(i)) {
            (Some(idx), Some(desc)) => match image_store.range_source(desc) {
                Ok(src) => Some(Arc::new(LayerReader::new(idx.clone(), src, cache.clone()))),
                Err(e) => {
                    warn!(layer = %desc.digest, error = %e, "no ranged reads; its files are not analyzed");
                    None
                }
            },
            _ => None,
        };
        readers.push(reader);
    }
    let files = LayerFiles { layers: readers };
    let analysis = startup::analyze(&config, &view, &files).await;
    info!(
        files = analysis.files.len(),
        notes = analysis.notes.len(),
        bytes_read = analysis.bytes_read,
        "startup analysis"
    );
    (startup::build_plan(&analysis, &refs, &plan_opts), None)
}

/// The pack of a recorded start: each traced file's ranges ([`pack_ranges`]), in first-read
/// order, within `budget` uncompressed bytes (files that do not fit are left out). Read in
/// layer and offset order, so each span is fetched once; held in memory until written
/// (bounded by the budget).
async fn recorded_pack(
    image_store: &dyn Store,
    manifest: &ImageManifest,
    indexes: &[Option<Arc<LayerIndex>>],
    analysis: &Analysis,
    budget: u64,
) -> Result<Option<(PackTable, Bytes)>, String> {
    let mut used = 0u64;
    let mut picks = Vec::new();
    for f in &analysis.files {
        let ranges = pack_ranges(f.size, &f.ranges);
        let bytes: u64 = ranges.iter().map(|r| r.len).sum();
        if used.saturating_add(bytes) > budget {
            continue;
        }
        used += bytes;
        picks.push((f, ranges));
    }
    if picks.is_empty() {
        return Ok(None);
    }
    let cache: Arc<dyn SpanCache> = Arc::new(MemorySpanCache::new(ANALYSIS_CACHE_BYTES));
    let mut readers: HashMap<usize, LayerReader> = HashMap::new();
    let mut order: Vec<usize> = (0..picks.len()).collect();
    order.sort_by_key(|&i| (picks[i].0.layer, picks[i].0.data_offset));
    let mut data: Vec<Vec<Bytes>> = vec![Vec::new(); picks.len()];
    for i in order {
        let (f, ranges) = &picks[i];
        let reader = match readers.entry(f.layer) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                let (Some(Some(ix)), Some(desc)) =
                    (indexes.get(f.layer), manifest.layers.get(f.layer))
                else {
                    return Err(format!("{}: layer {} has no index", f.path, f.layer));
                };
                let src = image_store
                    .range_source(desc)
                    .map_err(|e| format!("layer {}: {e}", desc.digest))?;
                v.insert(LayerReader::new(ix.clone(), src, cache.clone()))
            }
        };
        for r in ranges {
            let start = f
                .data_offset
                .checked_add(r.offset)
                .ok_or_else(|| format!("{}: offset overflows", f.path))?;
            let b = reader
                .read_at(start, r.len)
                .await
                .map_err(|e| format!("reading {} [{}, +{}): {e}", f.path, r.offset, r.len))?;
            data[i].push(b);
        }
    }
    let digests: Vec<String> = manifest.layers.iter().map(|l| l.digest.clone()).collect();
    let mut w = PackWriter::new(digests);
    for ((f, ranges), bytes) in picks.iter().zip(&data) {
        let layer = u32::try_from(f.layer).map_err(|_| "too many layers".to_string())?;
        let path = f.path.trim_start_matches('/');
        for (r, b) in ranges.iter().zip(bytes) {
            w.add(layer, path, f.size, r.offset, b)
                .map_err(|e| e.to_string())?;
        }
    }
    w.finish().map(Some).map_err(|e| e.to_string())
}

fn unreachable_index(art: &RawManifest) -> Result<ImageManifest, BuildError> {
    Err(BuildError::BadImage {
        image: art.digest.clone(),
        message: "built artifact parsed as an index".into(),
    })
}

fn adopted(subject: Descriptor, a: ArtifactInfo, key: String, t0: Instant) -> BuildSummary {
    BuildSummary {
        image: subject,
        layers: a
            .layers
            .iter()
            .map(|l| LayerSummary {
                digest: l.layer_digest.clone(),
                compressed_size: 0,
                uncompressed_size: 0,
                index: Some(l.index.clone()),
                windows: l.windows.clone(),
                entries: 0,
                spans: 0,
                skipped: None,
                duration: Duration::ZERO,
            })
            .collect(),
        artifact: a.descriptor,
        plan: a.plan,
        plan_files: 0,
        plan_bytes: 0,
        key,
        adopted: true,
        duration: t0.elapsed(),
    }
}

/// A layer's summary and, when indexed, its index (the startup analysis reads through it).
type IndexedOne = (LayerSummary, Option<Arc<LayerIndex>>);

/// Chunks in flight between the async stream and the indexer thread.
const CHANNEL_CHUNKS: usize = 8;

/// A synchronous `Read` over chunks sent from an async task.
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<Result<Bytes, String>>,
    cur: Bytes,
}

impl std::io::Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.cur = b,
                Some(Err(e)) => return Err(std::io::Error::other(e)),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        let _ = self.cur.split_to(n);
        Ok(n)
    }
}

/// An existing index blob of this layer with the wanted span size, if an earlier artifact
/// of the image has one (a blob that does not load or does not match is ignored).
async fn reuse_index(
    target: &dyn Store,
    layer: &Descriptor,
    knobs: &Knobs,
    reusable: &HashMap<String, Descriptor>,
) -> Option<IndexedOne> {
    let t0 = Instant::now();
    if layer.size < knobs.skip_threshold {
        return None;
    }
    let d = reusable.get(&layer.digest)?;
    let idx = match discover::load_index(target, d).await {
        Ok(i) => i,
        Err(e) => {
            debug!(layer = %layer.digest, index = %d.digest, error = %e, "existing index not reusable");
            return None;
        }
    };
    if idx.span_size != knobs.span_size || idx.compressed_digest_string() != layer.digest {
        return None;
    }
    // The plan and pack are read through the index here: with its windows inline.
    let windows = idx
        .windows
        .map(|w| Descriptor::new(WINDOWS_MEDIA_TYPE, w.digest_string(), w.size));
    let idx = match discover::inline_windows(target, idx).await {
        Ok(i) => i,
        Err(e) => {
            debug!(layer = %layer.digest, index = %d.digest, error = %e, "existing index's windows not reusable");
            return None;
        }
    };
    info!(layer = %layer.digest, index = %d.digest, "layer index reused from an existing artifact");
    let summary = LayerSummary {
        digest: layer.digest.clone(),
        compressed_size: layer.size,
        uncompressed_size: idx.uncompressed_size,
        index: Some(d.clone()),
        windows,
        entries: idx.entries.len(),
        spans: idx.spans.len(),
        skipped: None,
        duration: t0.elapsed(),
    };
    Some((summary, Some(Arc::new(idx))))
}

/// Per layer digest, the regions a recorded start read, in offsets of the layer's
/// uncompressed stream (from an earlier artifact's index of the layer, any span size).
async fn hot_regions(
    target: &dyn Store,
    rec: &Recorded,
    reusable: &HashMap<String, Descriptor>,
    knobs: &Knobs,
    layers: &[Descriptor],
) -> HashMap<String, HotRegions> {
    let mut out = HashMap::new();
    if rec.hot_span_size == 0 || rec.hot_span_size >= knobs.span_size {
        return out;
    }
    for lt in &rec.trace.layers {
        if lt.files.is_empty() || !layers.iter().any(|l| l.digest == lt.digest) {
            continue;
        }
        let Some(d) = reusable.get(&lt.digest) else {
            info!(layer = %lt.digest, "no earlier index of the layer: its spans stay uniform");
            continue;
        };
        let ix = match discover::load_index(target, d).await {
            Ok(ix) if ix.compressed_digest_string() == lt.digest => ix,
            Ok(_) => continue,
            Err(e) => {
                warn!(layer = %lt.digest, index = %d.digest, error = %e, "earlier index unusable: spans stay uniform");
                continue;
            }
        };
        let ranges = lt.files.iter().flat_map(|f| {
            let entry = ix.find(&f.path).filter(|e| e.kind == EntryKind::File);
            f.ranges.iter().filter_map(move |r| {
                let e = entry?;
                let end = r.offset.saturating_add(r.len).min(e.size);
                (r.offset < end).then(|| (e.offset + r.offset, e.offset + end))
            })
        });
        let h = HotRegions::new(ranges, rec.hot_span_size);
        if !h.is_empty() {
            info!(layer = %lt.digest, hot_bytes = h.bytes(), span = rec.hot_span_size, "finer spans where the recorded start read");
            out.insert(lt.digest.clone(), h);
        }
    }
    out
}

async fn index_one(
    image_store: Arc<dyn Store>,
    target: Arc<dyn Store>,
    layer: Descriptor,
    knobs: &Knobs,
    hot: Option<HotRegions>,
) -> Result<IndexedOne, BuildError> {
    let t0 = Instant::now();
    let skip = |why: String| {
        info!(layer = %layer.digest, reason = %why, "layer not indexed");
        LayerSummary {
            digest: layer.digest.clone(),
            compressed_size: layer.size,
            uncompressed_size: 0,
            index: None,
            windows: None,
            entries: 0,
            spans: 0,
            skipped: Some(why),
            duration: t0.elapsed(),
        }
    };
    if layer.size < knobs.skip_threshold {
        return Ok((
            skip(format!(
                "{} bytes is below the skip threshold of {}",
                layer.size, knobs.skip_threshold
            )),
            None,
        ));
    }
    let compression = match Compression::from_media_type(&layer.media_type) {
        Some(Compression::Zstd) | None => {
            return Ok((
                skip(format!("media type {} is not indexable", layer.media_type)),
                None,
            ));
        }
        Some(c) => c,
    };
    let mut stream: Box<dyn ChunkStream> = image_store.open_blob(&layer).await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, String>>(CHANNEL_CHUNKS);
    let producer = tokio::spawn(async move {
        loop {
            match stream.next_chunk().await {
                Ok(Some(c)) => {
                    if tx.send(Ok(c)).await.is_err() {
                        return; // the indexer stopped; its error tells why
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    let _ = tx.send(Err(e.to_string())).await;
                    return;
                }
            }
        }
    });
    let opts = IndexOptions {
        span_size: knobs.span_size,
    };
    let ld = layer.digest.clone();
    let out = tokio::task::spawn_blocking(move || {
        index_layer_hot(
            ChannelReader {
                rx,
                cur: Bytes::new(),
            },
            compression,
            &opts,
            &hot.unwrap_or_default(),
        )
    })
    .await;
    producer.abort();
    let out = match out {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => {
            return Err(BuildError::Index {
                layer: ld,
                message: e.to_string(),
            });
        }
        Err(e) => {
            return Err(BuildError::Index {
                layer: ld,
                message: format!("indexer task: {e}"),
            });
        }
    };
    if out.compressed_digest != layer.digest || out.compressed_size != layer.size {
        return Err(BuildError::LayerDigestMismatch {
            layer: layer.digest.clone(),
            actual: out.compressed_digest,
            size: out.compressed_size,
        });
    }
    // Nodes mount from the index alone and fetch windows only for spans they inflate.
    let (split, windows_blob) = out.index.split();
    let windows = if split.windows.is_some() {
        Some(target.put_blob(WINDOWS_MEDIA_TYPE, windows_blob).await?)
    } else {
        None
    };
    let index = target
        .put_blob(INDEX_MEDIA_TYPE, Bytes::from(split.encode()))
        .await?;
    let summary = LayerSummary {
        digest: layer.digest.clone(),
        compressed_size: layer.size,
        uncompressed_size: out.index.uncompressed_size,
        entries: out.index.entries.len(),
        spans: out.index.spans.len(),
        index: Some(index),
        windows,
        skipped: None,
        duration: t0.elapsed(),
    };
    Ok((summary, Some(Arc::new(out.index))))
}
