//! Recorded startups: what a real container start read, per layer, in first-access order.
//!
//! The analyzer predicts whole files from the image alone, and misses what a runtime loads
//! indirectly (Python's transitive imports) while fetching whole files of which a start
//! reads a few pages (the JDK's `lib/modules`, jars). A node sees the truth: every read of a
//! lazily mounted file goes through its FUSE layer. [`TraceRecorder`] keeps those reads,
//! bounded, as byte ranges of files of layers; [`StartupTrace`] is their exported form, and
//! [`analysis_from_trace`] turns one into an [`Analysis`] that [`super::build_plan`] maps to
//! spans like any other, so a recorded plan fetches the pages that were read, in the order
//! they were first read.
//!
//! Traces are in terms of layer digests, file paths and file offsets, never spans: a trace
//! recorded with one span size builds plans for any other.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{Analysis, ByteRange, FileClass, FoundFile};
use crate::index::{EntryKind, LayerIndex};

/// Version of the trace format.
pub const TRACE_VERSION: u32 = 1;
/// Ranges kept per file; past it the file's ranges collapse into the one that covers them.
pub const MAX_RANGES_PER_FILE: usize = 256;
/// Files accepted from a trace, whoever wrote it.
pub const MAX_TRACE_FILES: usize = 200_000;

/// Reads that a container start made, per layer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartupTrace {
    pub version: u32,
    pub layers: Vec<LayerTrace>,
}

/// The files read from one layer (by its compressed digest).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerTrace {
    pub digest: String,
    /// In first-access order.
    pub files: Vec<TracedFile>,
}

/// One file read during startup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TracedFile {
    /// Path in the layer, as in its index.
    pub path: String,
    /// First read, in milliseconds since the recorder started (orders files across layers).
    pub first_ms: u64,
    /// File offsets read, sorted and merged.
    pub ranges: Vec<ByteRange>,
}

impl StartupTrace {
    pub fn files(&self) -> usize {
        self.layers.iter().map(|l| l.files.len()).sum()
    }

    /// Bytes of files covered by the recorded ranges.
    pub fn bytes(&self) -> u64 {
        self.layers
            .iter()
            .flat_map(|l| &l.files)
            .flat_map(|f| &f.ranges)
            .map(|r| r.len)
            .fold(0u64, u64::saturating_add)
    }
}

/// Adds `[offset, offset+len)` to sorted, disjoint `ranges`, merging what touches it.
/// Past [`MAX_RANGES_PER_FILE`] the ranges collapse into their hull: bounded memory for a
/// file read in many scattered pieces, at the price of fetching the gaps.
pub fn add_range(ranges: &mut Vec<ByteRange>, offset: u64, len: u64) {
    if len == 0 {
        return;
    }
    let mut start = offset;
    let mut end = offset.saturating_add(len);
    // First range whose end reaches `start`: everything before it stays.
    let i = ranges.partition_point(|r| r.offset.saturating_add(r.len) < start);
    let mut j = i;
    while let Some(r) = ranges.get(j) {
        if r.offset > end {
            break;
        }
        start = start.min(r.offset);
        end = end.max(r.offset.saturating_add(r.len));
        j += 1;
    }
    ranges.splice(
        i..j,
        [ByteRange {
            offset: start,
            len: end - start,
        }],
    );
    if ranges.len() > MAX_RANGES_PER_FILE {
        let lo = ranges.first().map_or(0, |r| r.offset);
        let hi = ranges.last().map_or(0, |r| r.offset.saturating_add(r.len));
        ranges.clear();
        ranges.push(ByteRange {
            offset: lo,
            len: hi - lo,
        });
    }
}

#[derive(Default)]
struct Recorded {
    /// layer digest → path → (first read, ranges).
    layers: HashMap<String, HashMap<String, (u64, Vec<ByteRange>)>>,
    files: usize,
    /// Ranges held, all files together.
    ranges: usize,
}

/// Ranges a recorder holds, all files together (16 bytes each); past it a file read again
/// keeps only its hull.
pub const MAX_RECORDED_RANGES: usize = 1 << 20;

/// Records the reads of lazily mounted files that happen within a window after a container
/// starts preparing (a Prepare of an image's layers), bounded in files. Cheap outside the
/// window: one atomic load per read.
pub struct TraceRecorder {
    t0: Instant,
    window: Duration,
    max_files: usize,
    /// Milliseconds since `t0` of the last start, plus one (0: none yet).
    last_start: AtomicU64,
    inner: Mutex<Recorded>,
}

impl std::fmt::Debug for TraceRecorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TraceRecorder")
            .field("window", &self.window)
            .field("max_files", &self.max_files)
            .finish_non_exhaustive()
    }
}

impl TraceRecorder {
    pub fn new(window: Duration, max_files: usize) -> TraceRecorder {
        TraceRecorder {
            t0: Instant::now(),
            window,
            max_files,
            last_start: AtomicU64::new(0),
            inner: Mutex::new(Recorded::default()),
        }
    }

    /// Milliseconds since the recorder started (the clock of [`TracedFile::first_ms`]).
    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.t0.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// A container is starting: reads during the next window are startup reads.
    pub fn started(&self) {
        self.last_start
            .store(self.now_ms().saturating_add(1), Ordering::Relaxed);
    }

    /// Whether a read now would be recorded.
    pub fn recording(&self) -> bool {
        let last = self.last_start.load(Ordering::Relaxed);
        let window = u64::try_from(self.window.as_millis()).unwrap_or(u64::MAX);
        last != 0 && self.now_ms() <= (last - 1).saturating_add(window)
    }

    /// A read of `len` bytes at `offset` of the file `path` of layer `layer`.
    pub fn record(&self, layer: &str, path: &str, offset: u64, len: u64) {
        if len == 0 || !self.recording() {
            return;
        }
        let now = self.now_ms();
        let Ok(mut g) = self.inner.lock() else {
            return;
        };
        let full = g.files >= self.max_files;
        let Recorded {
            layers,
            files,
            ranges: held,
        } = &mut *g;
        if let Some(f) = layers.get_mut(layer).and_then(|l| l.get_mut(path)) {
            let before = f.1.len();
            add_range(&mut f.1, offset, len);
            if *held - before + f.1.len() > MAX_RECORDED_RANGES {
                // Bounded memory over fidelity: this file's reads become one range.
                let lo = f.1.first().map_or(0, |r| r.offset);
                let hi = f.1.last().map_or(0, |r| r.offset.saturating_add(r.len));
                f.1 = vec![ByteRange {
                    offset: lo,
                    len: hi - lo,
                }];
            }
            *held = *held - before + f.1.len();
            return;
        }
        if full {
            return;
        }
        let mut ranges = Vec::new();
        add_range(&mut ranges, offset, len);
        layers
            .entry(layer.to_string())
            .or_default()
            .insert(path.to_string(), (now, ranges));
        *files += 1;
        *held += 1;
    }

    /// When a file of `layers` was first read last ([`TraceRecorder::now_ms`] clock).
    pub fn newest_first_read(&self, layers: &[String]) -> Option<u64> {
        let g = self.inner.lock().ok()?;
        layers
            .iter()
            .filter_map(|l| g.layers.get(l))
            .flat_map(|files| files.values().map(|f| f.0))
            .max()
    }

    /// Drops what was recorded of `layer` (removed from the node).
    pub fn forget(&self, layer: &str) {
        if let Ok(mut g) = self.inner.lock()
            && let Some(files) = g.layers.remove(layer)
        {
            g.files -= files.len();
            g.ranges -= files.values().map(|f| f.1.len()).sum::<usize>();
        }
    }

    /// Everything recorded so far, files in first-access order.
    pub fn snapshot(&self) -> StartupTrace {
        let mut layers: Vec<LayerTrace> = match self.inner.lock() {
            Ok(g) => g
                .layers
                .iter()
                .map(|(digest, files)| {
                    let mut files: Vec<TracedFile> = files
                        .iter()
                        .map(|(path, (first_ms, ranges))| TracedFile {
                            path: path.clone(),
                            first_ms: *first_ms,
                            ranges: ranges.clone(),
                        })
                        .collect();
                    files.sort_by(|a, b| a.first_ms.cmp(&b.first_ms).then(a.path.cmp(&b.path)));
                    LayerTrace {
                        digest: digest.clone(),
                        files,
                    }
                })
                .collect(),
            Err(_) => Vec::new(),
        };
        layers.sort_by(|a, b| a.digest.cmp(&b.digest));
        StartupTrace {
            version: TRACE_VERSION,
            layers,
        }
    }
}

/// Why a trace cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("startup trace version {0} is not supported (this build reads {TRACE_VERSION})")]
    Version(u32),
    #[error("startup trace has {0} files, more than {MAX_TRACE_FILES}")]
    TooLarge(usize),
    #[error("startup trace: {0} has {1} ranges, more than {MAX_RANGES_PER_FILE}")]
    TooManyRanges(String, usize),
    #[error("startup trace is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("compact startup trace: {0}")]
    Compact(String),
}

impl TraceError {
    /// Metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            TraceError::Version(_) => "version",
            TraceError::TooLarge(_) | TraceError::TooManyRanges(..) => "too_large",
            TraceError::Json(_) | TraceError::Compact(_) => "malformed",
        }
    }
}

/// Most compressed bytes of a compact trace (a StartupRecord's `trace`, 1 MiB of zstd in
/// base64: under the API's object size limit).
pub const MAX_COMPACT_BYTES: usize = 1 << 20;
/// Most bytes a compact trace inflates to (JSON: ~100 bytes a file, [`MAX_TRACE_FILES`]).
pub const MAX_COMPACT_JSON: u64 = 32 << 20;

impl StartupTrace {
    /// The trace as JSON compressed with zstd, in base64; `None` when the compressed bytes
    /// exceed [`MAX_COMPACT_BYTES`] (see [`StartupTrace::first_files`]).
    pub fn to_compact(&self) -> Option<String> {
        use base64::Engine;
        let json = serde_json::to_vec(self).ok()?;
        let z = zstd::bulk::compress(&json, 9).ok()?;
        (z.len() <= MAX_COMPACT_BYTES).then(|| base64::engine::general_purpose::STANDARD.encode(z))
    }

    /// Parses and checks a compact trace, inflating at most [`MAX_COMPACT_JSON`] bytes.
    pub fn from_compact(s: &str) -> Result<StartupTrace, TraceError> {
        use base64::Engine;
        use std::io::Read;
        if s.len() > MAX_COMPACT_BYTES.div_ceil(3) * 4 {
            return Err(TraceError::Compact(format!(
                "{} base64 bytes, more than {MAX_COMPACT_BYTES} compressed",
                s.len()
            )));
        }
        let z = base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(|e| TraceError::Compact(format!("base64: {e}")))?;
        let mut json = Vec::new();
        zstd::stream::read::Decoder::new(&z[..])
            .map_err(|e| TraceError::Compact(format!("zstd: {e}")))?
            .take(MAX_COMPACT_JSON + 1)
            .read_to_end(&mut json)
            .map_err(|e| TraceError::Compact(format!("zstd: {e}")))?;
        if json.len() as u64 > MAX_COMPACT_JSON {
            return Err(TraceError::Compact(format!(
                "inflates to more than {MAX_COMPACT_JSON} bytes"
            )));
        }
        StartupTrace::from_json(&json)
    }

    /// The trace of the layers `digests` only, first reads counted from the earliest one.
    pub fn of_layers(&self, digests: &[String]) -> StartupTrace {
        let mut layers: Vec<LayerTrace> = self
            .layers
            .iter()
            .filter(|l| digests.contains(&l.digest) && !l.files.is_empty())
            .cloned()
            .collect();
        let t0 = layers
            .iter()
            .flat_map(|l| &l.files)
            .map(|f| f.first_ms)
            .min()
            .unwrap_or(0);
        for f in layers.iter_mut().flat_map(|l| &mut l.files) {
            f.first_ms -= t0;
        }
        StartupTrace {
            version: TRACE_VERSION,
            layers,
        }
    }

    /// The `n` files read first, across layers (to fit a size cap).
    pub fn first_files(&self, n: usize) -> StartupTrace {
        let mut order: Vec<(u64, usize, usize)> = self
            .layers
            .iter()
            .enumerate()
            .flat_map(|(l, lt)| {
                lt.files
                    .iter()
                    .enumerate()
                    .map(move |(f, tf)| (tf.first_ms, l, f))
            })
            .collect();
        order.sort_unstable();
        let keep: std::collections::HashSet<(usize, usize)> =
            order.into_iter().take(n).map(|(_, l, f)| (l, f)).collect();
        let mut out = self.clone();
        for (l, lt) in out.layers.iter_mut().enumerate() {
            let mut f = 0;
            lt.files.retain(|_| {
                f += 1;
                keep.contains(&(l, f - 1))
            });
        }
        out.layers.retain(|l| !l.files.is_empty());
        out
    }
}

/// Merges the traces of several starts of one image. Starts are grouped by `command` (what
/// the container ran: `None` for the image's own entrypoint); within a group a byte range is
/// kept when at least half of the group's starts read it, so one unusual start does not
/// define the plan; the groups are then united (each command's start is planned). A file's
/// first read is the median of its starts' (each start counted from its own first read).
pub fn merge_traces(starts: &[(Option<String>, StartupTrace)]) -> StartupTrace {
    // (layer, path) → (first reads, ranges) over the groups' results.
    let mut merged: BTreeMap<(String, String), (u64, Vec<ByteRange>)> = BTreeMap::new();
    let mut groups: BTreeMap<Option<&str>, Vec<StartupTrace>> = BTreeMap::new();
    for (cmd, t) in starts {
        let digests: Vec<String> = t.layers.iter().map(|l| l.digest.clone()).collect();
        groups
            .entry(cmd.as_deref())
            .or_default()
            .push(t.of_layers(&digests));
    }
    for traces in groups.values() {
        let need = traces.len().div_ceil(2);
        // (layer, path) → per start: (first read, ranges).
        let mut files: BTreeMap<(&str, &str), Vec<StartRead<'_>>> = BTreeMap::new();
        for t in traces {
            for l in &t.layers {
                for f in &l.files {
                    files
                        .entry((&l.digest, &f.path))
                        .or_default()
                        .push((f.first_ms, &f.ranges));
                }
            }
        }
        for ((layer, path), reads) in files {
            if reads.len() < need {
                continue;
            }
            let kept = covered_by_at_least(reads.iter().map(|r| r.1), need);
            if kept.is_empty() {
                continue;
            }
            let mut firsts: Vec<u64> = reads.iter().map(|r| r.0).collect();
            firsts.sort_unstable();
            let first = firsts[firsts.len() / 2];
            let e = merged
                .entry((layer.to_string(), path.to_string()))
                .or_insert((first, Vec::new()));
            e.0 = e.0.min(first);
            for r in kept {
                add_range(&mut e.1, r.offset, r.len);
            }
        }
    }
    let mut layers: BTreeMap<String, Vec<TracedFile>> = BTreeMap::new();
    for ((layer, path), (first_ms, ranges)) in merged {
        layers.entry(layer).or_default().push(TracedFile {
            path,
            first_ms,
            ranges,
        });
    }
    StartupTrace {
        version: TRACE_VERSION,
        layers: layers
            .into_iter()
            .map(|(digest, mut files)| {
                files.sort_by(|a, b| a.first_ms.cmp(&b.first_ms).then(a.path.cmp(&b.path)));
                LayerTrace { digest, files }
            })
            .collect(),
    }
}

/// One start's first read and ranges of a file.
type StartRead<'a> = (u64, &'a [ByteRange]);

/// The parts of the byte ranges covered by at least `need` of the (each sorted, disjoint)
/// range lists.
fn covered_by_at_least<'a>(
    lists: impl Iterator<Item = &'a [ByteRange]>,
    need: usize,
) -> Vec<ByteRange> {
    // +1 at a range's start, -1 at its end; starts sort before ends at the same offset only
    // where that joins touching ranges of different starts.
    let mut edges: Vec<(u64, i64)> = Vec::new();
    for list in lists {
        for r in list {
            edges.push((r.offset, 1));
            edges.push((r.offset.saturating_add(r.len), -1));
        }
    }
    edges.sort_unstable_by_key(|&(at, d)| (at, -d));
    let mut out = Vec::new();
    let mut depth = 0i64;
    let mut open: Option<u64> = None;
    let need = i64::try_from(need).unwrap_or(i64::MAX).max(1);
    for (at, d) in edges {
        depth += d;
        match open {
            None if depth >= need => open = Some(at),
            Some(s) if depth < need => {
                if at > s {
                    add_range(&mut out, s, at - s);
                }
                open = None;
            }
            _ => {}
        }
    }
    out
}

impl StartupTrace {
    /// Parses and checks a trace.
    pub fn from_json(bytes: &[u8]) -> Result<StartupTrace, TraceError> {
        let t: StartupTrace = serde_json::from_slice(bytes)?;
        if t.version != TRACE_VERSION {
            return Err(TraceError::Version(t.version));
        }
        if t.files() > MAX_TRACE_FILES {
            return Err(TraceError::TooLarge(t.files()));
        }
        // A recorder never writes more; planning cost stays linear in the trace.
        if let Some(f) = t
            .layers
            .iter()
            .flat_map(|l| &l.files)
            .find(|f| f.ranges.len() > MAX_RANGES_PER_FILE)
        {
            return Err(TraceError::TooManyRanges(f.path.clone(), f.ranges.len()));
        }
        Ok(t)
    }
}

/// The files of `trace` that belong to the image whose layers are `digests` (manifest
/// order) with indexes `layers`, as an analysis in first-access order across layers. Files
/// the trace names that the index does not hold as regular files are left out with a note
/// (the trace was recorded from another image, or is stale); ranges past a file's end are
/// clipped.
pub fn analysis_from_trace(
    trace: &StartupTrace,
    digests: &[String],
    layers: &[Option<&LayerIndex>],
) -> Analysis {
    let mut analysis = Analysis::default();
    let mut found: Vec<(u64, FoundFile)> = Vec::new();
    for lt in &trace.layers {
        // A digest listed twice in a manifest is mounted once; the upper copy is the one read.
        let Some(pos) = digests.iter().rposition(|d| *d == lt.digest) else {
            continue;
        };
        let Some(Some(ix)) = layers.get(pos) else {
            analysis.notes.push(super::Note {
                subject: lt.digest.clone(),
                message: "layer not indexed; its recorded reads are left out".into(),
            });
            continue;
        };
        for f in &lt.files {
            let Some(entry) = ix.find(&f.path).filter(|e| e.kind == EntryKind::File) else {
                analysis.notes.push(super::Note {
                    subject: f.path.clone(),
                    message: "recorded, but not a regular file of its layer".into(),
                });
                continue;
            };
            let ranges: Vec<ByteRange> = f
                .ranges
                .iter()
                .filter(|r| r.offset < entry.size && r.len > 0)
                .map(|r| ByteRange {
                    offset: r.offset,
                    len: r.len.min(entry.size - r.offset),
                })
                .collect();
            if ranges.is_empty() {
                continue;
            }
            found.push((
                f.first_ms,
                FoundFile {
                    path: format!("/{}", entry.path),
                    layer: pos,
                    size: entry.size,
                    data_offset: entry.offset,
                    // One class: the plan keeps the recorded order.
                    class: FileClass::Entrypoint,
                    ranges,
                    reasons: vec!["recorded".into()],
                },
            ));
        }
    }
    found.sort_by_key(|(t, _)| *t);
    analysis.files = found.into_iter().map(|(_, f)| f).collect();
    analysis
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(offset: u64, len: u64) -> ByteRange {
        ByteRange { offset, len }
    }

    type File<'a> = (&'a str, u64, &'a [(u64, u64)]);

    fn trace(files: &[File<'_>]) -> StartupTrace {
        StartupTrace {
            version: TRACE_VERSION,
            layers: vec![LayerTrace {
                digest: "sha256:l".into(),
                files: files
                    .iter()
                    .map(|(p, t, rs)| TracedFile {
                        path: p.to_string(),
                        first_ms: *t,
                        ranges: rs.iter().map(|&(o, l)| r(o, l)).collect(),
                    })
                    .collect(),
            }],
        }
    }

    #[test]
    fn merged_starts_keep_what_half_of_each_command_read() {
        let a = trace(&[("bin/app", 100, &[(0, 100)]), ("odd", 150, &[(0, 10)])]);
        let b = trace(&[("bin/app", 10, &[(50, 100)])]);
        let c = trace(&[("bin/app", 20, &[(60, 10)]), ("lib/x", 30, &[(0, 5)])]);
        let m = merge_traces(&[(None, a.clone()), (None, b.clone()), (None, c)]);
        let files: Vec<_> = m.layers[0]
            .files
            .iter()
            .map(|f| (f.path.as_str(), f.first_ms, f.ranges.clone()))
            .collect();
        // 0..50 read once, 50..100 twice (a, b), 60..70 three times, 100..150 once (b): 2 of
        // 3 keep 50..100; `odd` and `lib/x` were read by one start each. Times are each
        // start's own (a from 100, so bin/app at 0; b and c from 10 and 20): median 0.
        assert_eq!(files, vec![("bin/app", 0, vec![r(50, 50)])]);
        // Two starts: either one's reads are kept.
        let m = merge_traces(&[(None, a.clone()), (None, b.clone())]);
        assert_eq!(m.files(), 2);
        assert_eq!(m.layers[0].files[0].ranges, vec![r(0, 150)]);
        // Another command is planned too, whatever the majority of the others read.
        let m = merge_traces(&[
            (None, a.clone()),
            (None, b.clone()),
            (None, b.clone()),
            (Some("cmd".into()), trace(&[("bin/tool", 0, &[(0, 1)])])),
        ]);
        let paths: Vec<_> = m.layers[0].files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, vec!["bin/app", "bin/tool"]);
        assert_eq!(m.layers[0].files[0].ranges, vec![r(50, 100)]);
    }

    #[test]
    fn compact_traces_round_trip_and_are_capped() {
        let t = trace(&[
            ("bin/app", 3, &[(0, 100), (4096, 10)]),
            ("lib/x", 5, &[(0, 5)]),
        ]);
        let c = t.to_compact().unwrap();
        assert_eq!(StartupTrace::from_compact(&c).unwrap(), t);
        assert!(matches!(
            StartupTrace::from_compact("not base64!"),
            Err(TraceError::Compact(_))
        ));
        let huge = "A".repeat(MAX_COMPACT_BYTES / 3 * 4 + 8);
        assert!(matches!(
            StartupTrace::from_compact(&huge),
            Err(TraceError::Compact(_))
        ));
        // A bomb: a small zstd frame of many zeros.
        use base64::Engine;
        let bomb = zstd::bulk::compress(&vec![b' '; (MAX_COMPACT_JSON + 10) as usize], 3).unwrap();
        let bomb = base64::engine::general_purpose::STANDARD.encode(bomb);
        assert!(matches!(
            StartupTrace::from_compact(&bomb),
            Err(TraceError::Compact(m)) if m.contains("inflates")
        ));
        // The first files, by first read.
        assert_eq!(t.first_files(1).layers[0].files[0].path, "bin/app");
        assert_eq!(t.first_files(1).files(), 1);
        assert_eq!(t.first_files(5), t);
        // Only the image's layers, counted from the first read.
        let o = t.of_layers(&["sha256:l".into()]);
        assert_eq!(o.layers[0].files[0].first_ms, 0);
        assert_eq!(t.of_layers(&["sha256:other".into()]).files(), 0);
    }

    #[test]
    fn ranges_merge_when_they_touch() {
        let rec = TraceRecorder::new(Duration::from_secs(60), 10);
        assert_eq!(rec.newest_first_read(&["sha256:a".into()]), None);
        rec.started();
        rec.record("sha256:a", "x", 0, 1);
        assert!(
            rec.newest_first_read(&["sha256:a".into()])
                .is_some_and(|t| t <= rec.now_ms())
        );
        assert_eq!(rec.newest_first_read(&["sha256:b".into()]), None);
        let mut v = Vec::new();
        add_range(&mut v, 100, 10);
        add_range(&mut v, 0, 10);
        add_range(&mut v, 50, 10);
        assert_eq!(v, vec![r(0, 10), r(50, 10), r(100, 10)]);
        add_range(&mut v, 10, 40); // touches 0..10 and 50..60
        assert_eq!(v, vec![r(0, 60), r(100, 10)]);
        add_range(&mut v, 55, 100);
        assert_eq!(v, vec![r(0, 155)]);
        add_range(&mut v, 0, 0);
        assert_eq!(v, vec![r(0, 155)]);
        add_range(&mut v, u64::MAX - 1, 10);
        assert_eq!(v.last(), Some(&r(u64::MAX - 1, 1)));
    }

    #[test]
    fn scattered_reads_collapse_to_a_bounded_hull() {
        let mut v = Vec::new();
        for i in 0..(MAX_RANGES_PER_FILE as u64 + 1) {
            add_range(&mut v, i * 100, 10);
        }
        assert_eq!(v, vec![r(0, MAX_RANGES_PER_FILE as u64 * 100 + 10)]);
    }

    #[test]
    fn records_within_the_window_only_and_bounded() {
        let rec = TraceRecorder::new(Duration::from_secs(60), 2);
        rec.record("sha256:a", "etc/passwd", 0, 10);
        assert_eq!(
            rec.snapshot().files(),
            0,
            "nothing starts: nothing recorded"
        );
        rec.started();
        rec.record("sha256:a", "etc/passwd", 0, 10);
        rec.record("sha256:a", "etc/passwd", 10, 10);
        rec.record("sha256:b", "bin/sh", 4096, 4096);
        rec.record("sha256:b", "bin/true", 0, 1); // over max_files
        rec.record("sha256:b", "bin/sh", 0, 4096); // known file: still merged
        let t = rec.snapshot();
        assert_eq!(t.files(), 2);
        rec.forget("sha256:zzz");
        assert_eq!(rec.snapshot(), t, "an unknown layer changes nothing");
        assert_eq!(t.layers[0].files[0].ranges, vec![r(0, 20)]);
        assert_eq!(t.layers[1].files[0].ranges, vec![r(0, 8192)]);
        let back = StartupTrace::from_json(&serde_json::to_vec(&t).unwrap()).unwrap();
        assert_eq!(back, t);
        rec.forget("sha256:a");
        assert_eq!(rec.snapshot().files(), 1);
        rec.record("sha256:c", "bin/ls", 0, 1); // room again
        assert_eq!(rec.snapshot().files(), 2);

        let closed = TraceRecorder::new(Duration::ZERO, 10);
        closed.started();
        std::thread::sleep(Duration::from_millis(5));
        closed.record("sha256:a", "x", 0, 1);
        assert_eq!(closed.snapshot().files(), 0, "window over");
    }

    #[test]
    fn bad_traces_are_refused() {
        assert!(matches!(
            StartupTrace::from_json(br#"{"version":9,"layers":[]}"#),
            Err(TraceError::Version(9))
        ));
        assert!(matches!(
            StartupTrace::from_json(b"{"),
            Err(TraceError::Json(_))
        ));
        let ranges: Vec<ByteRange> = (0..=MAX_RANGES_PER_FILE as u64)
            .map(|i| r(i * 2, 1))
            .collect();
        let many = StartupTrace {
            version: TRACE_VERSION,
            layers: vec![LayerTrace {
                digest: "sha256:a".into(),
                files: vec![TracedFile {
                    path: "x".into(),
                    first_ms: 0,
                    ranges,
                }],
            }],
        };
        assert!(matches!(
            StartupTrace::from_json(&serde_json::to_vec(&many).unwrap()),
            Err(TraceError::TooManyRanges(p, n)) if p == "x" && n == MAX_RANGES_PER_FILE + 1
        ));
    }

    fn layer(files: &[(&str, usize)]) -> LayerIndex {
        let mut b = tar::Builder::new(Vec::new());
        for (p, n) in files {
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(*n as u64);
            b.append_data(&mut h, p, vec![7u8; *n].as_slice()).unwrap();
        }
        let tar = b.into_inner().unwrap();
        crate::index::indexer::index_layer(
            tar.as_slice(),
            crate::index::Compression::None,
            &crate::index::indexer::IndexOptions { span_size: 4096 },
        )
        .unwrap()
        .index
    }

    #[test]
    fn a_trace_plans_the_spans_read_in_first_read_order() {
        let l0 = layer(&[("usr/lib/big", 64 * 1024), ("etc/conf", 100)]);
        let l1 = layer(&[("app/main", 5000)]);
        let digests = vec!["sha256:l0".to_string(), "sha256:l1".to_string()];
        let file = |path: &str, first_ms, ranges| TracedFile {
            path: path.into(),
            first_ms,
            ranges,
        };
        let trace = StartupTrace {
            version: TRACE_VERSION,
            layers: vec![
                LayerTrace {
                    digest: "sha256:l0".into(),
                    files: vec![
                        // One page in the middle of a 64 KiB file.
                        file("usr/lib/big", 20, vec![r(32 * 1024, 100)]),
                        file("etc/conf", 30, vec![r(0, 1000)]), // clipped to 100
                        file("etc/gone", 40, vec![r(0, 1)]),
                    ],
                },
                LayerTrace {
                    digest: "sha256:l1".into(),
                    files: vec![file("app/main", 10, vec![r(0, 5000)])],
                },
                LayerTrace {
                    digest: "sha256:other-image".into(),
                    files: vec![file("x", 0, vec![r(0, 1)])],
                },
            ],
        };
        let a = analysis_from_trace(&trace, &digests, &[Some(&l0), Some(&l1)]);
        let got: Vec<(&str, usize)> = a.files.iter().map(|f| (f.path.as_str(), f.layer)).collect();
        assert_eq!(
            got,
            vec![("/app/main", 1), ("/usr/lib/big", 0), ("/etc/conf", 0)]
        );
        assert_eq!(a.files[2].ranges, vec![r(0, 100)]);
        assert_eq!(a.notes.len(), 1, "{:?}", a.notes);

        let plan = super::super::build_plan(
            &a,
            &[Some(&l0), Some(&l1)],
            &super::super::PlanOptions {
                profile: "startup-local-v1".into(),
                version: 1,
                budget: u64::MAX,
            },
        );
        let big = plan
            .entries
            .iter()
            .find(|e| e.path == "/usr/lib/big")
            .unwrap();
        let entry = l0.find("usr/lib/big").unwrap();
        assert_eq!(
            big.spans,
            vec![l0.span_for(entry.offset + 32 * 1024) as u32],
            "only the span holding the page read"
        );
        assert_eq!(plan.entries[0].path, "/app/main");
        assert_eq!(plan.entries[0].reason, "recorded");
    }
}
