//! The bytes of one mounted layer's files, from the one place that decides where they come
//! from: a local copy (a materialized file or a startup pack's ranges already here), the
//! startup pack still in flight (wait for it rather than fetch twice), else the layer's
//! verified spans through the [`LayerReader`]. It counts what it returns and records
//! startup reads; the FUSE server only translates requests and maps errors.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use talaria_artifact::index::Entry;
use talaria_artifact::index::reader::LayerReader;
use talaria_artifact::startup::TraceRecorder;
use tracing::{debug, warn};

use super::materialize::{Materializer, RangedRead};
use super::reach::Reachability;
use crate::metrics::Metrics;

/// Why a read of a layer's file failed (the FUSE server answers EIO either way).
#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    #[error(transparent)]
    Read(#[from] talaria_artifact::index::reader::ReadError),
    #[error("the read waited {0:?}")]
    TimedOut(Duration),
    #[error("no entry {0} in the layer's index")]
    NoEntry(usize),
    #[error("the layer is poisoned: it does not match its index")]
    Poisoned,
}

/// A read that no local copy answers now: it waits for the pack or goes to the spans.
pub struct Pending {
    /// The file's entry in the layer's index.
    entry: usize,
    offset: u64,
    size: u32,
    /// The startup pack announced these bytes and has not brought them yet.
    coming: bool,
}

/// The content of one mounted layer. Cheap to clone (shared parts only), so a read that
/// must wait takes a clone onto the runtime.
#[derive(Clone)]
pub struct LayerContent {
    reader: Arc<LayerReader>,
    reach: Arc<Reachability>,
    read_timeout: Duration,
    metrics: Arc<Metrics>,
    /// Local copies of hot files, and the index digest they are kept under (shared: a read
    /// that waits takes a clone of this struct).
    materialized: Option<(Arc<Materializer>, Arc<str>)>,
    /// Bytes returned to the kernel (what applications actually read).
    read_bytes: Option<Counter>,
    /// Startup reads are recorded here, under the layer digest.
    recorder: Option<(Arc<TraceRecorder>, Arc<str>)>,
    /// Where sequential reads of big files are, to fetch ahead of them.
    ahead: Arc<std::sync::Mutex<ReadAhead>>,
}

/// Files from this size on stream ahead of sequential reads.
const AHEAD_MIN_FILE: u64 = 16 << 20;
/// The first read-ahead; it doubles with each sequential read that needs it, up to the max.
const AHEAD_START: u64 = 4 << 20;
const AHEAD_MAX: u64 = 64 << 20;
/// Files followed at once per layer (past it, the oldest are forgotten).
const AHEAD_FILES: usize = 64;

/// Read-ahead of big files read in order on demand (a model's weights): the kernel asks
/// 128 KiB at a time and each span missed costs a round trip, so a sequential reader would
/// wait span by span. Past the first sequential read, the spans of a window ahead are fetched
/// in the background (one ranged request), the window doubling while the reads stay in order.
#[derive(Debug, Default)]
struct ReadAhead {
    /// Entry → (where its last read ended, how far ahead was asked, window, age).
    files: std::collections::HashMap<usize, (u64, u64, u64, u64)>,
    clock: u64,
}

impl ReadAhead {
    /// A read of `[offset, offset+len)` of entry `entry` (`size` bytes): the file range to
    /// fetch ahead now, if any.
    fn read(&mut self, entry: usize, size: u64, offset: u64, len: u64) -> Option<(u64, u64)> {
        if size < AHEAD_MIN_FILE || len == 0 {
            return None;
        }
        self.clock += 1;
        if self.files.len() >= AHEAD_FILES && !self.files.contains_key(&entry) {
            let oldest = self.files.iter().min_by_key(|(_, f)| f.3).map(|(k, _)| *k);
            if let Some(k) = oldest {
                self.files.remove(&k);
            }
        }
        let end = offset.saturating_add(len).min(size);
        let f = self.files.entry(entry).or_insert((u64::MAX, 0, 0, 0));
        let sequential = f.0 == offset;
        f.0 = end;
        f.3 = self.clock;
        if !sequential {
            f.1 = end;
            f.2 = AHEAD_START;
            return None;
        }
        // Asked again once the reader is half-way into what was asked last (half of the
        // last window, which is half of the next one).
        if f.1 >= end.saturating_add(f.2 / 4) || end >= size {
            return None;
        }
        let from = f.1.max(end);
        let to = end.saturating_add(f.2).min(size);
        f.1 = to;
        f.2 = (f.2 * 2).min(AHEAD_MAX);
        (from < to).then_some((from, to))
    }
}

/// Up to `size` bytes at `offset` of a local copy of a file of `file_size` bytes; an error
/// when the copy is shorter than the file (then the span path answers instead).
fn pread(f: &File, offset: u64, size: u32, file_size: u64) -> std::io::Result<Vec<u8>> {
    let want = u64::from(size).min(file_size.saturating_sub(offset));
    // `want` ≤ the kernel's read size (a u32), so it fits in memory and in usize.
    let mut buf = vec![0u8; usize::try_from(want).unwrap_or(0)];
    f.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

/// [`pread`] of a local copy, `None` (logged) when it fails: the span path answers then.
fn local_read(f: &File, path: &str, offset: u64, size: u32, file_size: u64) -> Option<Vec<u8>> {
    pread(f, offset, size, file_size)
        .inspect_err(|e| {
            warn!(path, offset, size, error = %e, "local copy unreadable; reading through spans")
        })
        .ok()
}

impl LayerContent {
    pub fn new(
        reader: Arc<LayerReader>,
        reach: Arc<Reachability>,
        read_timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> LayerContent {
        LayerContent {
            reader,
            reach,
            read_timeout,
            metrics,
            materialized: None,
            read_bytes: None,
            recorder: None,
            ahead: Arc::default(),
        }
    }

    pub fn reader(&self) -> &Arc<LayerReader> {
        &self.reader
    }

    /// Serves the files `m` holds under `index_digest` (the index this layer is read
    /// through: copies made through another index are not this mount's) from local disk.
    pub fn with_materialized(mut self, m: Arc<Materializer>, index_digest: String) -> Self {
        self.materialized = Some((m, index_digest.into()));
        self
    }

    /// Records reads into `r` (it keeps those of a startup window) under `layer_digest`.
    pub fn with_recorder(mut self, r: Arc<TraceRecorder>, layer_digest: String) -> Self {
        self.recorder = Some((r, layer_digest.into()));
        self
    }

    /// Counts the bytes every read returns to the kernel into `c`.
    pub fn with_read_bytes_counter(mut self, c: Counter) -> Self {
        self.read_bytes = Some(c);
        self
    }

    /// The local copy of all of `entry`, if one is here (the kernel may then read it
    /// directly).
    pub fn whole_local(&self, entry: &Entry) -> Option<Arc<File>> {
        if self.reach.is_poisoned() {
            return None;
        }
        let (m, layer) = self.materialized.as_ref()?;
        m.whole(layer, &entry.path, entry.size)
    }

    /// Records an open whose reads will not come here (kernel passthrough) as a read of the
    /// whole file, so a recording made with a pack still names the file.
    pub fn record_whole(&self, entry: &Entry) {
        if let Some((r, l)) = &self.recorder {
            r.record(l, &entry.path, 0, entry.size);
        }
    }

    /// Answers a read of index entry `entry` at once from a local copy (a `pread`, fast
    /// enough for the FUSE thread); otherwise what is left to do, for
    /// [`LayerContent::read_pending`]. `None`: not a file of this layer.
    pub fn read_now(&self, entry: usize, offset: u64, size: u32) -> Option<Result<Bytes, Pending>> {
        let i = entry;
        let entry = self.reader.index().entries.get(i)?;
        Some(self.read_local(i, entry, offset, size))
    }

    fn read_local(
        &self,
        i: usize,
        entry: &Entry,
        offset: u64,
        size: u32,
    ) -> Result<Bytes, Pending> {
        if self.reach.is_poisoned() {
            // Not even a local copy: it may have come from the same index.
            return Err(Pending {
                entry: i,
                offset,
                size,
                coming: false,
            });
        }
        let want = u64::from(size).min(entry.size.saturating_sub(offset));
        if let Some((r, layer)) = &self.recorder {
            r.record(layer, &entry.path, offset, want);
        }
        let mut coming = false;
        if let Some((m, layer)) = &self.materialized {
            let local = match m.ranged(layer, &entry.path, entry.size, offset, want) {
                RangedRead::Here(f) => Some(f),
                RangedRead::Coming => {
                    coming = true;
                    None
                }
                RangedRead::No => m.get(layer, &entry.path),
            };
            if let Some(data) =
                local.and_then(|f| local_read(&f, &entry.path, offset, size, entry.size))
            {
                return Ok(self.counted(data.into()));
            }
        }
        Err(Pending {
            entry: i,
            offset,
            size,
            coming,
        })
    }

    /// Finishes a read that [`LayerContent::read_now`] could not answer: waits for the
    /// pack when it is bringing the bytes, else reads the spans, within the read timeout.
    pub async fn read_pending(self, p: Pending) -> Result<Bytes, ContentError> {
        let Pending {
            entry,
            offset,
            size,
            coming,
        } = p;
        let entry_index = entry;
        if self.reach.is_poisoned() {
            self.metrics.read_errors.inc();
            return Err(ContentError::Poisoned);
        }
        let index = self.reader.index().clone();
        // `read_now` found it, in the same index.
        let Some(entry) = index.entries.get(entry) else {
            return Err(ContentError::NoEntry(entry));
        };
        // The startup pack is bringing these bytes: wait for it rather than fetch them a
        // second time (bounded: the pack abandons what its failed chunks held).
        if coming && let Some((m, layer)) = &self.materialized {
            let want = u64::from(size).min(entry.size.saturating_sub(offset));
            let t0 = std::time::Instant::now();
            let here = m
                .wait_ranged(
                    layer,
                    &entry.path,
                    entry.size,
                    offset,
                    want,
                    self.read_timeout,
                )
                .await;
            self.metrics.startup_read_waits.inc();
            self.metrics
                .startup_read_wait_seconds
                .inc_by(t0.elapsed().as_secs_f64());
            if let Some(data) =
                here.and_then(|f| local_read(&f, &entry.path, offset, size, entry.size))
            {
                return Ok(self.counted(data.into()));
            }
        }
        // Which files a start reads that no pack or local copy holds (a plan to redo).
        debug!(path = %entry.path, offset, size, "read through spans");
        self.read_ahead(entry_index, entry, offset, u64::from(size));
        // A registry already known down fails this read at once: not worth a warning each.
        let known_down = self.reach.down_since().is_some();
        let timeout = self.read_timeout;
        let read = self.reader.read_file(entry, offset, u64::from(size));
        tokio::pin!(read);
        match tokio::time::timeout(timeout, &mut read).await {
            Ok(Ok(data)) => Ok(self.counted(data)),
            Ok(Err(e)) => {
                self.metrics.read_errors.inc();
                if known_down {
                    debug!(path = %entry.path, offset, size, error = %e, "read failed");
                } else {
                    warn!(path = %entry.path, offset, size, error = %e, "read failed");
                }
                Err(e.into())
            }
            Err(_) => {
                // Marked while the fetch is still held (it is dropped with this future,
                // which lets readers waiting on its spans go on): the kernel's retry of this
                // read and those readers must not wait through another timeout.
                self.reach
                    .failed(&format_args!("a read waited {timeout:?}"));
                self.metrics.read_errors.inc();
                warn!(path = %entry.path, offset, size, ?timeout, "read timed out");
                Err(ContentError::TimedOut(timeout))
            }
        }
    }

    /// Fetches ahead of a sequential reader of a big file, in the background ([`ReadAhead`]):
    /// spans already cached or being fetched are skipped.
    fn read_ahead(&self, i: usize, entry: &Entry, offset: u64, len: u64) {
        // Most reads are of small files: no lock for them.
        if entry.size < AHEAD_MIN_FILE {
            return;
        }
        let Some((from, to)) = self
            .ahead
            .lock()
            .ok()
            .and_then(|mut a| a.read(i, entry.size, offset, len))
        else {
            return;
        };
        let index = self.reader.index();
        let first = index.span_for(entry.offset.saturating_add(from));
        let last = index.span_for(entry.offset.saturating_add(to - 1));
        let reader = self.reader.clone();
        let path = entry.path.clone();
        tokio::spawn(async move {
            if let Err(e) = reader.prefetch_spans(first, last).await {
                debug!(path, error = %e, "read-ahead failed; reads fetch on demand");
            }
        });
    }

    fn counted(&self, data: Bytes) -> Bytes {
        if let Some(c) = &self.read_bytes {
            c.inc_by(data.len() as u64);
        }
        data
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn sequential_reads_of_big_files_stream_ahead_in_growing_windows() {
        let mut a = ReadAhead::default();
        let size = 100 * MIB;
        let k = 128 << 10;
        // Small files and first reads do not.
        assert_eq!(a.read(1, MIB, 0, k), None);
        assert_eq!(a.read(0, size, 0, k), None);
        // The second read in order asks for the first window.
        assert_eq!(a.read(0, size, k, k), Some((2 * k, 2 * k + 4 * MIB)));
        // Within the first half of it: nothing more.
        assert_eq!(a.read(0, size, 2 * k, k), None);
        // Past half-way: the next window, twice as big, from where the last one ended.
        let mut off = 3 * k;
        let mut asked = Vec::new();
        while off < size {
            if let Some(r) = a.read(0, size, off, k) {
                asked.push(r);
            }
            off += k;
        }
        assert_eq!(asked[0], (2 * k + 4 * MIB, 3 * k + 2 * MIB + 8 * MIB));
        // Windows are contiguous, capped, and never pass the end.
        for w in asked.windows(2) {
            assert_eq!(w[0].1, w[1].0);
            assert!(w[1].1 - w[1].0 <= AHEAD_MAX);
        }
        assert_eq!(asked.last().unwrap().1, size);
        // A jump restarts: no read-ahead until reads are in order again.
        assert_eq!(a.read(0, size, 10 * MIB, k), None);
        assert!(a.read(0, size, 10 * MIB + k, k).is_some());
    }

    #[test]
    fn followed_files_are_bounded() {
        let mut a = ReadAhead::default();
        for i in 0..(AHEAD_FILES * 3) {
            a.read(i, 64 * MIB, 0, 4096);
        }
        assert!(a.files.len() <= AHEAD_FILES);
    }
}
