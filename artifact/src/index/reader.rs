//! Verified random access to a layer's uncompressed bytes through its [`LayerIndex`].
//!
//! A read fetches only the compressed bytes of the spans it overlaps (one ranged read per run
//! of adjacent missing spans), inflates each span from its own checkpoint, checks the span's
//! SHA-256 and only then serves or caches it. Cached spans are keyed by their digest, so a
//! cache can be shared by every layer and image on a node.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::index::{Entry, EntryKind, LayerIndex, SpanError, inflate_span_with_windows};
use crate::source::{RangeSource, SourceError};

/// A store of verified, uncompressed spans keyed by their SHA-256.
pub trait SpanCache: Send + Sync {
    fn get(&self, span_digest: &[u8; 32]) -> Option<Bytes>;
    fn put(&self, span_digest: [u8; 32], data: Bytes);
    /// Whether the span is held, without reading it (prefetchers skip held spans). The
    /// default reads it; caches that can answer cheaply override it.
    fn contains(&self, span_digest: &[u8; 32]) -> bool {
        self.get(span_digest).is_some()
    }
}

/// Hooks a node uses to see how reads went (all optional, called on the reading task).
pub trait ReadObserver: Send + Sync {
    /// A read found spans missing from the cache and waited `waited` for them, whether it
    /// fetched them itself or another read (or a prefetch) was already fetching them.
    fn waited(&self, _waited: Duration) {}
    /// A read used `bytes` bytes of spans it found in the cache (only the bytes it
    /// returned, not whole spans).
    fn cached_bytes(&self, _bytes: u64) {}
}

/// What [`LayerReader::prefetch_spans`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefetchStats {
    /// Spans fetched, inflated, verified and cached.
    pub spans_fetched: u64,
    /// Compressed bytes requested from the source.
    pub compressed_bytes: u64,
    /// Ranged requests made.
    pub requests: u64,
    /// Spans skipped: already cached, or being fetched by another read.
    pub spans_skipped: u64,
}

/// An in-memory LRU span cache bounded in bytes.
pub struct MemorySpanCache {
    max_bytes: u64,
    inner: Mutex<Lru>,
}

#[derive(Default)]
struct Lru {
    bytes: u64,
    tick: u64,
    map: HashMap<[u8; 32], (Bytes, u64)>,
    order: BTreeMap<u64, [u8; 32]>,
}

impl MemorySpanCache {
    pub fn new(max_bytes: u64) -> Self {
        Self {
            max_bytes,
            inner: Mutex::new(Lru::default()),
        }
    }

    /// Bytes currently held.
    pub fn size(&self) -> u64 {
        self.inner.lock().map(|l| l.bytes).unwrap_or(0)
    }
}

impl SpanCache for MemorySpanCache {
    fn contains(&self, span_digest: &[u8; 32]) -> bool {
        self.inner
            .lock()
            .is_ok_and(|l| l.map.contains_key(span_digest))
    }

    fn get(&self, span_digest: &[u8; 32]) -> Option<Bytes> {
        let mut l = self.inner.lock().ok()?;
        l.tick += 1;
        let tick = l.tick;
        let (data, old) = {
            let (data, t) = l.map.get_mut(span_digest)?;
            let old = std::mem::replace(t, tick);
            (data.clone(), old)
        };
        l.order.remove(&old);
        l.order.insert(tick, *span_digest);
        Some(data)
    }

    fn put(&self, span_digest: [u8; 32], data: Bytes) {
        let len = data.len() as u64;
        if len > self.max_bytes {
            return;
        }
        let Ok(mut l) = self.inner.lock() else {
            return;
        };
        l.tick += 1;
        let tick = l.tick;
        if let Some((old, t)) = l.map.insert(span_digest, (data, tick)) {
            l.bytes -= old.len() as u64;
            l.order.remove(&t);
        }
        l.order.insert(tick, span_digest);
        l.bytes += len;
        while l.bytes > self.max_bytes {
            let Some((_, key)) = l.order.pop_first() else {
                break;
            };
            if let Some((d, _)) = l.map.remove(&key) {
                l.bytes -= d.len() as u64;
            }
        }
    }
}

/// Counters of a reader's work.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadStats {
    /// Compressed bytes requested from the source.
    pub compressed_bytes_fetched: u64,
    /// Spans fetched, inflated and verified.
    pub spans_fetched: u64,
    /// Spans served from the cache.
    pub cache_hits: u64,
}

/// Why a read failed. Unverified data is never returned.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("read {offset}+{len} is outside the layer's {size} uncompressed bytes")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("fetching compressed bytes {start}..{end} (spans {first}..={last}): {source}")]
    Source {
        start: u64,
        end: u64,
        first: usize,
        last: usize,
        #[source]
        source: SourceError,
    },
    #[error("source returned {got} bytes for compressed range {start}..{end}")]
    ShortRead { start: u64, end: u64, got: u64 },
    #[error(
        "fetching windows {start}..{end} (spans {first}..={last}) from the windows blob: {source}"
    )]
    Windows {
        start: u64,
        end: u64,
        first: usize,
        last: usize,
        #[source]
        source: SourceError,
    },
    #[error("the index keeps its windows in blob {0}, and this reader has no source for it")]
    NoWindows(String),
    #[error("span {span} (uncompressed offset {offset}) failed verification: {source}")]
    Span {
        span: usize,
        offset: u64,
        #[source]
        source: SpanError,
    },
    #[error("{path:?} is not a regular file ({kind:?})")]
    NotAFile { path: String, kind: EntryKind },
    #[error("inflate task failed: {0}")]
    Task(String),
}

/// Reads a layer lazily through its index.
pub struct LayerReader {
    index: Arc<LayerIndex>,
    source: Arc<dyn RangeSource>,
    /// The windows blob of an index whose windows are separate (version 2).
    windows: Option<Arc<dyn RangeSource>>,
    cache: Arc<dyn SpanCache>,
    fetched_bytes: AtomicU64,
    fetched_spans: AtomicU64,
    hits: AtomicU64,
    /// One async lock per span: concurrent reads of the same span fetch it once, the others
    /// wait and then find it in the cache.
    in_flight: Vec<tokio::sync::Mutex<()>>,
    observer: Option<Arc<dyn ReadObserver>>,
}

impl LayerReader {
    pub fn new(
        index: Arc<LayerIndex>,
        source: Arc<dyn RangeSource>,
        cache: Arc<dyn SpanCache>,
    ) -> Self {
        let in_flight = (0..index.spans.len())
            .map(|_| tokio::sync::Mutex::new(()))
            .collect();
        Self {
            index,
            source,
            windows: None,
            cache,
            fetched_bytes: AtomicU64::new(0),
            fetched_spans: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            in_flight,
            observer: None,
        }
    }

    /// Reads the windows of a version 2 index from `windows` (its windows blob), a range at
    /// a time, next to the compressed bytes of the spans they serve.
    pub fn with_windows(mut self, windows: Arc<dyn RangeSource>) -> Self {
        self.windows = Some(windows);
        self
    }

    /// Reports waits and cache use of reads to `observer`.
    pub fn with_observer(mut self, observer: Arc<dyn ReadObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    pub fn index(&self) -> &Arc<LayerIndex> {
        &self.index
    }

    pub fn stats(&self) -> ReadStats {
        ReadStats {
            compressed_bytes_fetched: self.fetched_bytes.load(Ordering::Relaxed),
            spans_fetched: self.fetched_spans.load(Ordering::Relaxed),
            cache_hits: self.hits.load(Ordering::Relaxed),
        }
    }

    /// Reads `[offset, offset + len)` of a regular file; reads past its end are cut short.
    pub async fn read_file(
        &self,
        entry: &Entry,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, ReadError> {
        if entry.kind != EntryKind::File {
            return Err(ReadError::NotAFile {
                path: entry.path.clone(),
                kind: entry.kind,
            });
        }
        if offset >= entry.size {
            return Ok(Bytes::new());
        }
        let len = len.min(entry.size - offset);
        self.read_at(entry.offset + offset, len).await
    }

    /// Reads `[uncompressed_offset, uncompressed_offset + len)` of the uncompressed stream.
    pub async fn read_at(&self, uncompressed_offset: u64, len: u64) -> Result<Bytes, ReadError> {
        let ix = &self.index;
        let end = uncompressed_offset
            .checked_add(len)
            .filter(|&e| e <= ix.uncompressed_size)
            .ok_or(ReadError::OutOfRange {
                offset: uncompressed_offset,
                len,
                size: ix.uncompressed_size,
            })?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        let first = ix.span_for(uncompressed_offset);
        let last = ix.span_for(end - 1);
        let t0 = Instant::now();
        let (spans, waited) = self.load_spans(first, last).await?;
        if let Some(o) = &self.observer {
            if waited {
                o.waited(t0.elapsed());
            }
            let used: u64 = spans
                .iter()
                .filter(|(_, _, cached)| *cached)
                .filter_map(|(i, data, _)| {
                    let base = ix.spans.get(*i)?.uncompressed_offset;
                    let to = end.min(base + data.len() as u64);
                    Some(to.saturating_sub(uncompressed_offset.max(base)))
                })
                .sum();
            if used > 0 {
                o.cached_bytes(used);
            }
        }
        // Fast path: one span holds the whole read, no copy.
        if let [(i, data, _)] = spans.as_slice() {
            let base = ix.spans.get(*i).map(|s| s.uncompressed_offset).unwrap_or(0);
            let from = (uncompressed_offset - base) as usize;
            return Ok(data.slice(from..from + len as usize));
        }
        let mut out = BytesMut::with_capacity(len as usize);
        for (i, data, _) in &spans {
            let base = ix.spans.get(*i).map(|s| s.uncompressed_offset).unwrap_or(0);
            let from = uncompressed_offset.max(base) - base;
            let to = end.min(base + data.len() as u64) - base;
            out.extend_from_slice(&data[from as usize..to as usize]);
        }
        Ok(out.freeze())
    }

    /// Returns the verified data of spans `first..=last` (with whether each came from the
    /// cache), fetching the missing ones, and whether it had to wait for any.
    #[allow(clippy::type_complexity)]
    async fn load_spans(
        &self,
        first: usize,
        last: usize,
    ) -> Result<(Vec<(usize, Bytes, bool)>, bool), ReadError> {
        let mut have = self.cached(first, last);
        if have.iter().all(|(_, d)| d.is_some()) {
            return Ok((
                have.into_iter()
                    .filter_map(|(i, d)| d.map(|d| (i, d, true)))
                    .collect(),
                false,
            ));
        }
        // Lock the missing spans in ascending order (no deadlock between overlapping reads),
        // then look again: another read may have fetched them meanwhile.
        let mut guards = Vec::new();
        for (i, d) in &have {
            if d.is_none()
                && let Some(m) = self.in_flight.get(*i)
            {
                guards.push(m.lock().await);
            }
        }
        for (i, d) in have.iter_mut() {
            if d.is_none() {
                *d = self.cached(*i, *i).pop().and_then(|(_, d)| d);
            }
        }
        // Runs of adjacent missing spans, each fetched with one ranged read, concurrently.
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for (i, d) in &have {
            if d.is_some() {
                continue;
            }
            match runs.last_mut() {
                Some((_, e)) if *e + 1 == *i => *e = *i,
                _ => runs.push((*i, *i)),
            }
        }
        let fetched =
            futures::future::try_join_all(runs.iter().map(|&(a, b)| self.fetch_run(a, b))).await?;
        drop(guards);
        let mut fetched: HashMap<usize, Bytes> = fetched.into_iter().flatten().collect();
        Ok((
            have.into_iter()
                .filter_map(|(i, d)| match d {
                    Some(d) => Some((i, d, true)),
                    None => fetched.remove(&i).map(|d| (i, d, false)),
                })
                .collect(),
            true,
        ))
    }

    /// Makes sure spans `first..=last` are cached without ever waiting on other reads:
    /// spans already cached, or locked by a read fetching them, are skipped; the others are
    /// locked and fetched with one ranged read per run of adjacent spans, one run after the
    /// other. For prefetchers, which must neither queue behind reads nor make a read wait
    /// on a span they have not started fetching.
    pub async fn prefetch_spans(
        &self,
        first: usize,
        last: usize,
    ) -> Result<PrefetchStats, ReadError> {
        let mut stats = PrefetchStats::default();
        let mut guards = Vec::new();
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for i in first..=last {
            let (Some(span), Some(lock)) = (self.index.spans.get(i), self.in_flight.get(i)) else {
                break;
            };
            if self.cache.contains(&span.digest) {
                stats.spans_skipped += 1;
                continue;
            }
            let Ok(guard) = lock.try_lock() else {
                stats.spans_skipped += 1;
                continue;
            };
            // Fetched by a read that let go of the lock just now.
            if self.cache.contains(&span.digest) {
                stats.spans_skipped += 1;
                continue;
            }
            guards.push(guard);
            match runs.last_mut() {
                Some((_, e)) if *e + 1 == i => *e = i,
                _ => runs.push((i, i)),
            }
        }
        for (a, b) in runs {
            let (start, end) = (
                self.index.compressed_range(a).0,
                self.index.compressed_range(b).1,
            );
            let spans = self.fetch_run(a, b).await?;
            stats.requests += 1;
            stats.compressed_bytes += end.saturating_sub(start);
            stats.spans_fetched += spans.len() as u64;
        }
        drop(guards);
        Ok(stats)
    }

    /// Cache lookups for spans `first..=last`.
    fn cached(&self, first: usize, last: usize) -> Vec<(usize, Option<Bytes>)> {
        let ix = &self.index;
        (first..=last)
            .map(|i| {
                // A cached span of the wrong length (a broken cache) counts as a miss.
                let d = ix.spans.get(i).and_then(|s| {
                    self.cache
                        .get(&s.digest)
                        .filter(|d| d.len() as u64 == s.uncompressed_size)
                });
                if d.is_some() {
                    self.hits.fetch_add(1, Ordering::Relaxed);
                }
                (i, d)
            })
            .collect()
    }

    /// Bytes `[start, end)` of `src`, all of them (counted as fetched either way).
    async fn read_exact(
        &self,
        src: &dyn RangeSource,
        start: u64,
        end: u64,
        failed: impl FnOnce(SourceError) -> ReadError,
    ) -> Result<Bytes, ReadError> {
        let b = src
            .read_range(start, end.saturating_sub(start))
            .await
            .map_err(failed)?;
        self.fetched_bytes
            .fetch_add(b.len() as u64, Ordering::Relaxed);
        if b.len() as u64 != end.saturating_sub(start) {
            return Err(ReadError::ShortRead {
                start,
                end,
                got: b.len() as u64,
            });
        }
        Ok(b)
    }

    async fn fetch_run(&self, first: usize, last: usize) -> Result<Vec<(usize, Bytes)>, ReadError> {
        let start = self.index.compressed_range(first).0;
        let end = self.index.compressed_range(last).1;
        let data = self.read_exact(self.source.as_ref(), start, end, |source| {
            ReadError::Source {
                start,
                end,
                first,
                last,
                source,
            }
        });
        // The spans' windows, when separate, come in one ranged read alongside.
        let wrange = self.index.windows_range(first, last);
        let windows = async {
            let Some((ws, we)) = wrange else {
                return Ok(None);
            };
            let src = self.windows.as_ref().ok_or_else(|| {
                ReadError::NoWindows(
                    self.index
                        .windows
                        .map(|w| w.digest_string())
                        .unwrap_or_default(),
                )
            })?;
            let w = self
                .read_exact(src.as_ref(), ws, we, |source| ReadError::Windows {
                    start: ws,
                    end: we,
                    first,
                    last,
                    source,
                })
                .await?;
            Ok(Some((ws, w)))
        };
        let (data, windows) = futures::try_join!(data, windows)?;
        let index = self.index.clone();
        // Inflating and hashing megabytes is CPU work: keep it off the async workers.
        let work = move || -> Result<Vec<(usize, Bytes)>, ReadError> {
            let mut out = Vec::with_capacity(last - first + 1);
            for i in first..=last {
                let (s, e) = index.compressed_range(i);
                let (s, e) = (
                    s.saturating_sub(start) as usize,
                    e.saturating_sub(start) as usize,
                );
                let span_off = index
                    .spans
                    .get(i)
                    .map(|x| x.uncompressed_offset)
                    .unwrap_or(0);
                let bytes = data.get(s..e).ok_or(ReadError::ShortRead {
                    start,
                    end,
                    got: data.len() as u64,
                })?;
                let w = windows.as_ref().map(|(ws, w)| (*ws, &w[..]));
                let span = inflate_span_with_windows(&index, i, bytes, w).map_err(|source| {
                    ReadError::Span {
                        span: i,
                        offset: span_off,
                        source,
                    }
                })?;
                out.push((i, Bytes::from(span)));
            }
            Ok(out)
        };
        let spans = match tokio::runtime::Handle::try_current() {
            Ok(h) => h
                .spawn_blocking(work)
                .await
                .map_err(|e| ReadError::Task(e.to_string()))??,
            Err(_) => work()?,
        };
        self.fetched_spans
            .fetch_add(spans.len() as u64, Ordering::Relaxed);
        for (i, d) in &spans {
            if let Some(s) = self.index.spans.get(*i) {
                self.cache.put(s.digest, d.clone());
            }
        }
        Ok(spans)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::indexer::{IndexOptions, index_layer};
    use crate::index::{Compression, MIN_SPAN_SIZE};
    use crate::source::MemorySource;

    /// An uncompressed one-file layer of 8 spans and a reader on it.
    fn layer_reader(observer: Arc<Counts>) -> LayerReader {
        let mut b = tar::Builder::new(Vec::new());
        let data: Vec<u8> = (0..8 * MIN_SPAN_SIZE).map(|i| (i % 251) as u8).collect();
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, "f", data.as_slice()).expect("tar");
        let blob = b.into_inner().expect("tar");
        let out = index_layer(
            blob.as_slice(),
            Compression::None,
            &IndexOptions {
                span_size: MIN_SPAN_SIZE,
            },
        )
        .expect("index");
        LayerReader::new(
            Arc::new(out.index),
            Arc::new(MemorySource(Bytes::from(blob))),
            Arc::new(MemorySpanCache::new(1 << 30)),
        )
        .with_observer(observer)
    }

    #[derive(Default)]
    struct Counts {
        waits: AtomicU64,
        cached: AtomicU64,
    }

    impl ReadObserver for Counts {
        fn waited(&self, _: Duration) {
            self.waits.fetch_add(1, Ordering::Relaxed);
        }
        fn cached_bytes(&self, bytes: u64) {
            self.cached.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    #[tokio::test]
    async fn prefetch_skips_cached_and_locked_spans_and_reads_then_wait_for_nothing() {
        let counts = Arc::new(Counts::default());
        let r = layer_reader(counts.clone());
        assert!(r.index().spans.len() >= 8, "{}", r.index().spans.len());
        // Span 2 is being fetched by a read: the prefetch leaves it alone, in two runs.
        let held = r.in_flight[2].lock().await;
        let st = r.prefetch_spans(0, 4).await.expect("prefetch");
        assert_eq!(st.spans_fetched, 4);
        assert_eq!(st.spans_skipped, 1);
        assert_eq!(st.requests, 2);
        assert_eq!(st.compressed_bytes, r.stats().compressed_bytes_fetched);
        drop(held);
        // Again: all cached but span 2.
        let st = r.prefetch_spans(0, 4).await.expect("prefetch again");
        assert_eq!((st.spans_fetched, st.spans_skipped, st.requests), (1, 4, 1));
        // A read inside the prefetched spans waits for nothing and counts only what it used.
        let off = r.index().spans[1].uncompressed_offset + 10;
        let got = r.read_at(off, 100).await.expect("read");
        assert_eq!(got.len(), 100);
        assert_eq!(counts.waits.load(Ordering::Relaxed), 0);
        assert_eq!(counts.cached.load(Ordering::Relaxed), 100);
        // A read of a span not prefetched waits (its own fetch).
        let off = r.index().spans[6].uncompressed_offset;
        r.read_at(off, 10).await.expect("read uncached");
        assert_eq!(counts.waits.load(Ordering::Relaxed), 1);
        assert_eq!(counts.cached.load(Ordering::Relaxed), 100);
        // Out-of-range span numbers end the prefetch quietly.
        let n = r.index().spans.len();
        let st = r.prefetch_spans(n, n + 3).await.expect("past the end");
        assert_eq!(st, PrefetchStats::default());
    }

    #[test]
    fn memory_cache_evicts_least_recently_used() {
        let c = MemorySpanCache::new(10);
        c.put([1; 32], Bytes::from_static(b"aaaa"));
        c.put([2; 32], Bytes::from_static(b"bbbb"));
        assert!(c.get(&[1; 32]).is_some()); // 1 is now the most recent
        c.put([3; 32], Bytes::from_static(b"cccc"));
        assert!(c.get(&[2; 32]).is_none());
        assert_eq!(c.get(&[1; 32]).as_deref(), Some(&b"aaaa"[..]));
        assert_eq!(c.get(&[3; 32]).as_deref(), Some(&b"cccc"[..]));
        assert_eq!(c.size(), 8);
        // Too large to ever fit: not stored, nothing evicted.
        c.put([4; 32], Bytes::from(vec![0u8; 11]));
        assert!(c.get(&[4; 32]).is_none());
        assert_eq!(c.size(), 8);
        // Replacing a key keeps the accounting exact.
        c.put([3; 32], Bytes::from_static(b"cc"));
        assert_eq!(c.size(), 6);
    }
}
