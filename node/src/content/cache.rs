//! The on-disk span cache: verified, uncompressed spans keyed by their SHA-256, shared by
//! every layer and image on the node, bounded in bytes with least-recently-used eviction.
//!
//! One file per span, named by the digest's hex, written to a temp name and renamed, so a
//! reader never sees a half-written span under its final name. Content is hashed again on
//! every read: a file damaged on disk (or torn by a crash) is a miss and is deleted, never
//! served. Recency survives restarts through the files' mtimes, refreshed on each hit.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use sha2::{Digest, Sha256};
use talaria_artifact::index::reader::{MemorySpanCache, SpanCache};
use tracing::{debug, warn};

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("span cache {dir}: {context}: {source}")]
    Io {
        dir: PathBuf,
        context: String,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Default)]
struct Lru {
    bytes: u64,
    tick: u64,
    /// digest → (length, tick of last use)
    map: HashMap<[u8; 32], (u64, u64)>,
    order: BTreeMap<u64, [u8; 32]>,
}

impl Lru {
    fn touch(&mut self, d: &[u8; 32]) -> bool {
        self.tick += 1;
        let tick = self.tick;
        let Some((_, t)) = self.map.get_mut(d) else {
            return false;
        };
        let old = std::mem::replace(t, tick);
        self.order.remove(&old);
        self.order.insert(tick, *d);
        true
    }

    fn insert(&mut self, d: [u8; 32], len: u64) {
        self.tick += 1;
        let tick = self.tick;
        if let Some((old_len, t)) = self.map.insert(d, (len, tick)) {
            self.bytes = self.bytes.saturating_sub(old_len);
            self.order.remove(&t);
        }
        self.order.insert(tick, d);
        self.bytes = self.bytes.saturating_add(len);
    }

    fn remove(&mut self, d: &[u8; 32]) {
        if let Some((len, t)) = self.map.remove(d) {
            self.bytes = self.bytes.saturating_sub(len);
            self.order.remove(&t);
        }
    }

    /// Removes least recently used entries until `bytes <= max`; returns their digests.
    fn evict(&mut self, max: u64) -> Vec<[u8; 32]> {
        let mut out = Vec::new();
        while self.bytes > max {
            let Some((_, d)) = self.order.pop_first() else {
                break;
            };
            if let Some((len, _)) = self.map.remove(&d) {
                self.bytes = self.bytes.saturating_sub(len);
            }
            out.push(d);
        }
        out
    }
}

/// A [`SpanCache`] on disk.
pub struct DiskSpanCache {
    dir: PathBuf,
    max_bytes: u64,
    lru: Mutex<Lru>,
    size_gauge: Option<Gauge>,
}

fn parse_name(name: &str) -> Option<[u8; 32]> {
    let mut d = [0u8; 32];
    hex::decode_to_slice(name, &mut d).ok()?;
    Some(d)
}

impl DiskSpanCache {
    /// Opens (creating) the cache in `dir`, indexing what a previous run left there and
    /// evicting down to `max_bytes`.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<DiskSpanCache, CacheError> {
        let io = |context: &str| {
            let dir = dir.to_path_buf();
            let context = context.to_string();
            move |source| CacheError::Io {
                dir,
                context,
                source,
            }
        };
        fs::create_dir_all(dir).map_err(io("creating the directory"))?;
        let mut found = Vec::new();
        for entry in fs::read_dir(dir).map_err(io("listing"))? {
            let entry = entry.map_err(io("listing"))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let md = match entry.metadata() {
                Ok(md) => md,
                Err(e) => {
                    warn!(file = name, error = %e, "span cache: stat failed; skipped");
                    continue;
                }
            };
            match parse_name(&name) {
                Some(d) if md.is_file() => {
                    let mtime = md.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                    found.push((mtime, d, md.len()));
                }
                _ => {
                    // Temp files of interrupted writes, or strangers: not ours to keep.
                    if let Err(e) = fs::remove_file(entry.path()) {
                        debug!(file = name, error = %e, "span cache: could not remove");
                    }
                }
            }
        }
        found.sort_by_key(|(t, _, _)| *t);
        let mut lru = Lru::default();
        for (_, d, len) in found {
            lru.insert(d, len);
        }
        let cache = DiskSpanCache {
            dir: dir.to_path_buf(),
            max_bytes,
            lru: Mutex::new(lru),
            size_gauge: None,
        };
        cache.evict();
        Ok(cache)
    }

    /// Reports the cache size to `gauge`.
    pub fn with_size_gauge(mut self, gauge: Gauge) -> Self {
        gauge.set(i64::try_from(self.size()).unwrap_or(i64::MAX));
        self.size_gauge = Some(gauge);
        self
    }

    /// Bytes held.
    pub fn size(&self) -> u64 {
        self.lru.lock().map(|l| l.bytes).unwrap_or(0)
    }

    /// Spans held.
    pub fn len(&self) -> usize {
        self.lru.lock().map(|l| l.map.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn path_of(&self, d: &[u8; 32]) -> PathBuf {
        self.dir.join(hex::encode(d))
    }

    fn report(&self, bytes: u64) {
        if let Some(g) = &self.size_gauge {
            g.set(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
    }

    fn evict(&self) {
        let (victims, bytes) = match self.lru.lock() {
            Ok(mut l) => (l.evict(self.max_bytes), l.bytes),
            Err(_) => return,
        };
        for d in victims {
            let p = self.path_of(&d);
            if let Err(e) = fs::remove_file(&p)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                warn!(file = %p.display(), error = %e, "span cache: evicting failed");
            }
        }
        self.report(bytes);
    }

    fn forget(&self, d: &[u8; 32]) {
        let bytes = match self.lru.lock() {
            Ok(mut l) => {
                l.remove(d);
                l.bytes
            }
            Err(_) => return,
        };
        let _ = fs::remove_file(self.path_of(d));
        self.report(bytes);
    }

    fn write(&self, d: &[u8; 32], data: &[u8]) -> std::io::Result<()> {
        let mut tmp = tempfile::Builder::new()
            .prefix("tmp-")
            .tempfile_in(&self.dir)?;
        tmp.write_all(data)?;
        // No fsync: a span torn by a crash fails its hash on read-back and is dropped.
        tmp.persist(self.path_of(d)).map_err(|e| e.error)?;
        Ok(())
    }
}

impl SpanCache for DiskSpanCache {
    fn contains(&self, span_digest: &[u8; 32]) -> bool {
        self.lru
            .lock()
            .is_ok_and(|l| l.map.contains_key(span_digest))
    }

    fn get(&self, span_digest: &[u8; 32]) -> Option<Bytes> {
        let known = self.lru.lock().ok()?.touch(span_digest);
        if !known {
            return None;
        }
        let path = self.path_of(span_digest);
        let data = match fs::read(&path) {
            Ok(d) => d,
            Err(e) => {
                warn!(file = %path.display(), error = %e, "span cache: read failed; dropped");
                self.forget(span_digest);
                return None;
            }
        };
        if Sha256::digest(&data).as_slice() != span_digest {
            warn!(file = %path.display(), "span cache: content does not match its digest; dropped");
            self.forget(span_digest);
            return None;
        }
        // Recency for the next start; failing to record it only weakens eviction order.
        if let Ok(f) = fs::File::open(&path) {
            let _ = f.set_modified(SystemTime::now());
        }
        Some(Bytes::from(data))
    }

    fn put(&self, span_digest: [u8; 32], data: Bytes) {
        let len = data.len() as u64;
        if len > self.max_bytes {
            return;
        }
        if self
            .lru
            .lock()
            .is_ok_and(|l| l.map.contains_key(&span_digest))
        {
            return;
        }
        if let Err(e) = self.write(&span_digest, &data) {
            warn!(dir = %self.dir.display(), error = %e, "span cache: write failed; span not cached");
            return;
        }
        if let Ok(mut l) = self.lru.lock() {
            l.insert(span_digest, len);
        }
        self.evict();
    }
}

/// A small in-memory LRU in front of the disk cache: FUSE reads come in pages of 128 KiB
/// while spans are megabytes, so without it every page would re-read and re-hash its span.
pub struct TieredSpanCache {
    memory: MemorySpanCache,
    disk: std::sync::Arc<DiskSpanCache>,
    hit_bytes: Option<Counter>,
}

impl TieredSpanCache {
    pub fn new(memory_bytes: u64, disk: std::sync::Arc<DiskSpanCache>) -> Self {
        TieredSpanCache {
            memory: MemorySpanCache::new(memory_bytes),
            disk,
            hit_bytes: None,
        }
    }

    /// Counts span bytes served from either tier.
    pub fn with_hit_counter(mut self, hits: Counter) -> Self {
        self.hit_bytes = Some(hits);
        self
    }
}

impl SpanCache for TieredSpanCache {
    fn contains(&self, span_digest: &[u8; 32]) -> bool {
        self.memory.contains(span_digest) || self.disk.contains(span_digest)
    }

    fn get(&self, span_digest: &[u8; 32]) -> Option<Bytes> {
        let data = match self.memory.get(span_digest) {
            Some(d) => d,
            None => {
                let d = self.disk.get(span_digest)?;
                self.memory.put(*span_digest, d.clone());
                d
            }
        };
        if let Some(c) = &self.hit_bytes {
            c.inc_by(data.len() as u64);
        }
        Some(data)
    }

    fn put(&self, span_digest: [u8; 32], data: Bytes) {
        self.memory.put(span_digest, data.clone());
        self.disk.put(span_digest, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(b: u8, n: usize) -> ([u8; 32], Bytes) {
        let data = vec![b; n];
        let d: [u8; 32] = Sha256::digest(&data).into();
        (d, Bytes::from(data))
    }

    #[test]
    fn evicts_lru_verifies_and_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, da) = span(1, 400);
        let (b, db) = span(2, 400);
        let (c, dc) = span(3, 400);
        {
            let cache = DiskSpanCache::open(dir.path(), 1000).expect("open");
            cache.put(a, da.clone());
            std::thread::sleep(std::time::Duration::from_millis(20));
            cache.put(b, db.clone());
            std::thread::sleep(std::time::Duration::from_millis(20));
            assert_eq!(cache.get(&a).as_deref(), Some(&da[..])); // a is now the newest
            cache.put(c, dc.clone());
            assert!(cache.get(&b).is_none(), "b was least recently used");
            assert_eq!(cache.size(), 800);
        }
        // Reopened: content and recency order (a older than c) come back from disk.
        let cache = DiskSpanCache::open(dir.path(), 1000).expect("reopen");
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.get(&c).as_deref(), Some(&dc[..]));
        // A corrupted file is a miss and is removed.
        fs::write(dir.path().join(hex::encode(a)), b"garbage").expect("corrupt");
        assert!(cache.get(&a).is_none());
        assert!(!dir.path().join(hex::encode(a)).exists());
        assert_eq!(cache.size(), 400);
        // A smaller cap on reopen evicts.
        drop(cache);
        let cache = DiskSpanCache::open(dir.path(), 100).expect("reopen small");
        assert_eq!(cache.size(), 0);
        assert!(cache.is_empty());
    }
}
