//! Verified random access to a layer's uncompressed bytes through its [`LayerIndex`].
//!
//! A read fetches only the compressed bytes of the spans it overlaps (one ranged read per run
//! of adjacent missing spans), inflates each span from its own checkpoint, checks the span's
//! SHA-256 and only then serves or caches it. Cached spans are keyed by their digest, so a
//! cache can be shared by every layer and image on a node.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};

use crate::index::{Entry, EntryKind, LayerIndex, SpanError, inflate_span};
use crate::source::{RangeSource, SourceError};

/// A store of verified, uncompressed spans keyed by their SHA-256.
pub trait SpanCache: Send + Sync {
    fn get(&self, span_digest: &[u8; 32]) -> Option<Bytes>;
    fn put(&self, span_digest: [u8; 32], data: Bytes);
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
    cache: Arc<dyn SpanCache>,
    fetched_bytes: AtomicU64,
    fetched_spans: AtomicU64,
    hits: AtomicU64,
    /// One async lock per span: concurrent reads of the same span fetch it once, the others
    /// wait and then find it in the cache.
    in_flight: Vec<tokio::sync::Mutex<()>>,
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
            cache,
            fetched_bytes: AtomicU64::new(0),
            fetched_spans: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            in_flight,
        }
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
        let spans = self.load_spans(first, last).await?;
        // Fast path: one span holds the whole read, no copy.
        if let [(i, data)] = spans.as_slice() {
            let base = ix.spans.get(*i).map(|s| s.uncompressed_offset).unwrap_or(0);
            let from = (uncompressed_offset - base) as usize;
            return Ok(data.slice(from..from + len as usize));
        }
        let mut out = BytesMut::with_capacity(len as usize);
        for (i, data) in &spans {
            let base = ix.spans.get(*i).map(|s| s.uncompressed_offset).unwrap_or(0);
            let from = uncompressed_offset.max(base) - base;
            let to = end.min(base + data.len() as u64) - base;
            out.extend_from_slice(&data[from as usize..to as usize]);
        }
        Ok(out.freeze())
    }

    /// Returns the verified data of spans `first..=last`, fetching the missing ones.
    async fn load_spans(
        &self,
        first: usize,
        last: usize,
    ) -> Result<Vec<(usize, Bytes)>, ReadError> {
        let mut have = self.cached(first, last);
        if have.iter().all(|(_, d)| d.is_some()) {
            return Ok(have
                .into_iter()
                .filter_map(|(i, d)| d.map(|d| (i, d)))
                .collect());
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
        Ok(have
            .into_iter()
            .filter_map(|(i, d)| d.or_else(|| fetched.remove(&i)).map(|d| (i, d)))
            .collect())
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

    async fn fetch_run(&self, first: usize, last: usize) -> Result<Vec<(usize, Bytes)>, ReadError> {
        let start = self.index.compressed_range(first).0;
        let end = self.index.compressed_range(last).1;
        let len = end.saturating_sub(start);
        let data =
            self.source
                .read_range(start, len)
                .await
                .map_err(|source| ReadError::Source {
                    start,
                    end,
                    first,
                    last,
                    source,
                })?;
        self.fetched_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        if data.len() as u64 != len {
            return Err(ReadError::ShortRead {
                start,
                end,
                got: data.len() as u64,
            });
        }
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
                let span = inflate_span(&index, i, bytes).map_err(|source| ReadError::Span {
                    span: i,
                    offset: span_off,
                    source,
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
