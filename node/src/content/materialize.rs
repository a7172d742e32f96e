//! Startup-local materialization: small hot files of a startup plan are written whole to
//! local disk, so FUSE serves their reads with a `pread` instead of the span path (no span
//! lookup, no inflate, no network).
//!
//! Files are kept per layer *index*: the `layer_digest` arguments below are the digest of
//! the index a layer is read through (its artifact's), not the layer's, so copies made
//! through one index never serve a mount of the same layer through another.
//!
//! Layout: `<dir>/<index hex>/<sha256 of the file path>` — file names are hashes, so an
//! untrusted path is never joined onto a local one. Files are written to a temporary name and
//! renamed, so a reader never sees a partial file. The directory is emptied at open: what a
//! previous run left is not trusted (it was not verified by this process) and the startup
//! prefetch of a remounted layer writes it again.
//!
//! Bounded by total bytes, file count and per-file size; [`Materializer::remove_layer`]
//! gives a layer's budget back. Opened handles are cached (bounded, least recently used out).
//!
//! Ranges of a startup pack ([`talaria_artifact::startup::pack`]) are kept here too, in a
//! sparse file per packed file (`p-<hash>`), under the same byte and file budgets: the
//! pack's table says which ranges will come ([`Materializer::expect`]), its chunks bring
//! them ([`Materializer::fill`]), and a read of a range still on its way waits for it
//! ([`Materializer::wait_ranged`]) instead of fetching the span.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use sha2::{Digest, Sha256};
use talaria_artifact::startup::ByteRange;
use tracing::{debug, warn};

/// Open file handles kept for reads.
const MAX_HANDLES: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum MaterializeError {
    #[error("materialized files: {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> MaterializeError {
    let path = path.to_path_buf();
    move |source| MaterializeError::Io { what, path, source }
}

struct Item {
    size: u64,
    /// `false` while its bytes are still being written.
    ready: bool,
    /// Which write owns the reservation (a removed and re-put file gets a new one).
    id: u64,
}

/// A file of a startup pack: what has come, what is still to come.
struct Ranged {
    file: Arc<File>,
    /// The file's size as the pack says (a read of another size is not this file).
    size: u64,
    present: Vec<ByteRange>,
    expected: Vec<ByteRange>,
    /// Ranges a fill has taken (being written or present): each byte is written once, so a
    /// second record for bytes already served cannot change them.
    claimed: Vec<ByteRange>,
    /// Budget bytes taken.
    reserved: u64,
    /// Its chunk failed: what is not present will not come.
    abandoned: bool,
}

/// Where a read of a packed file stands.
pub enum RangedRead {
    /// Every byte is on local disk.
    Here(Arc<File>),
    /// Some bytes are still on their way with the pack.
    Coming,
    /// Not (all) in the pack: read through spans.
    No,
}

/// Separate ranges kept per packed file (a trace has at most 256 per file).
const MAX_PACK_RANGES: usize = 4096;

/// Adds `[offset, offset + len)` to sorted, disjoint `ranges`, merging what touches it.
/// `false` (nothing changed) when that would pass [`MAX_PACK_RANGES`]: unlike a trace's
/// ranges these must never grow into their hull, which would claim bytes never written.
fn insert_range(ranges: &mut Vec<ByteRange>, offset: u64, len: u64) -> bool {
    if len == 0 {
        return true;
    }
    let mut start = offset;
    let mut end = offset.saturating_add(len);
    let first = ranges.partition_point(|r| r.offset.saturating_add(r.len) < start);
    let mut last = first;
    while last < ranges.len() && ranges[last].offset <= end {
        start = start.min(ranges[last].offset);
        end = end.max(ranges[last].offset.saturating_add(ranges[last].len));
        last += 1;
    }
    if first == last && ranges.len() >= MAX_PACK_RANGES {
        return false;
    }
    ranges.splice(
        first..last,
        [ByteRange {
            offset: start,
            len: end - start,
        }],
    );
    true
}

/// Whether any of `ranges` (sorted, disjoint) shares a byte with `[offset, offset + len)`.
fn overlaps(ranges: &[ByteRange], offset: u64, len: u64) -> bool {
    let end = offset.saturating_add(len);
    let i = ranges.partition_point(|r| r.offset.saturating_add(r.len) <= offset);
    ranges.get(i).is_some_and(|r| r.offset < end) && len > 0
}

fn covers(ranges: &[ByteRange], offset: u64, len: u64) -> bool {
    let end = offset.saturating_add(len);
    ranges
        .iter()
        .any(|r| r.offset <= offset && end <= r.offset.saturating_add(r.len))
}

#[derive(Default)]
struct State {
    /// layer directory name → file name → item.
    layers: HashMap<String, HashMap<String, Item>>,
    /// (layer directory name, file name) → packed file.
    ranged: HashMap<(String, String), Ranged>,
    bytes: u64,
    files: usize,
    /// (layer dir, file name) → handle and last use.
    handles: HashMap<(String, String), (Arc<File>, u64)>,
    tick: u64,
}

/// Local copies of small hot files, per layer. Thread-safe.
pub struct Materializer {
    dir: PathBuf,
    max_bytes: u64,
    max_files: usize,
    max_file_bytes: u64,
    state: Mutex<State>,
    next_id: AtomicU64,
    /// Woken when packed ranges arrive or are abandoned.
    arrived: tokio::sync::Notify,
}

/// Directory name of a layer: the hex of a `sha256:<hex>` digest, else a hash of the string
/// (never the string itself).
fn layer_dir(layer_digest: &str) -> String {
    match layer_digest.strip_prefix("sha256:") {
        Some(h) if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) => {
            h.to_ascii_lowercase()
        }
        _ => format!("x{}", hex::encode(Sha256::digest(layer_digest.as_bytes()))),
    }
}

/// File name of a path: a hash of the path as layer indexes spell it (no leading `/`).
fn file_name(path: &str) -> String {
    let p = path.trim_start_matches("./").trim_start_matches('/');
    hex::encode(Sha256::digest(p.as_bytes()))
}

impl Materializer {
    /// Opens (creates) `dir`, removing what an earlier run left there.
    pub fn open(
        dir: &Path,
        max_bytes: u64,
        max_files: usize,
        max_file_bytes: u64,
    ) -> Result<Materializer, MaterializeError> {
        if dir.exists() {
            fs::remove_dir_all(dir).map_err(io("clearing", dir))?;
        }
        fs::create_dir_all(dir).map_err(io("creating", dir))?;
        Ok(Materializer {
            dir: dir.to_path_buf(),
            max_bytes,
            max_files,
            max_file_bytes,
            state: Mutex::new(State::default()),
            next_id: AtomicU64::new(0),
            arrived: tokio::sync::Notify::new(),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere while holding the lock leaves consistent counters (every update
        // is a single step), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a file of `size` bytes would be taken now (a hint: `put` decides).
    pub fn wants(&self, size: u64) -> bool {
        if size > self.max_file_bytes {
            return false;
        }
        let st = self.state();
        st.files < self.max_files && st.bytes.saturating_add(size) <= self.max_bytes
    }

    /// Stores the whole content of `path` of the layer. `Ok(false)`: over a budget, not
    /// stored. `Ok(true)`: stored, or already stored or being stored by another caller.
    pub fn put(
        &self,
        layer_digest: &str,
        path: &str,
        data: &[u8],
    ) -> Result<bool, MaterializeError> {
        let size = data.len() as u64;
        if size > self.max_file_bytes {
            return Ok(false);
        }
        let (ldir, name) = (layer_dir(layer_digest), file_name(path));
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut st = self.state();
            if st.layers.get(&ldir).is_some_and(|l| l.contains_key(&name)) {
                return Ok(true);
            }
            if st.files >= self.max_files || st.bytes.saturating_add(size) > self.max_bytes {
                return Ok(false);
            }
            st.files += 1;
            st.bytes += size;
            st.layers.entry(ldir.clone()).or_default().insert(
                name.clone(),
                Item {
                    size,
                    ready: false,
                    id,
                },
            );
        }
        let written = self.write(&ldir, &name, id, data);
        let mut st = self.state();
        let owned = st
            .layers
            .get(&ldir)
            .and_then(|l| l.get(&name))
            .is_some_and(|i| i.id == id);
        match written {
            Ok(()) if owned => {
                if let Some(i) = st.layers.get_mut(&ldir).and_then(|l| l.get_mut(&name)) {
                    i.ready = true;
                }
                debug!(layer = layer_digest, path, size, "materialized");
                Ok(true)
            }
            Ok(()) => {
                // The layer was removed while this was written: do not leave the file behind.
                drop(st);
                let _ = fs::remove_file(self.dir.join(&ldir).join(&name));
                Ok(false)
            }
            Err(e) => {
                if owned {
                    Self::forget(&mut st, &ldir, &name);
                }
                Err(e)
            }
        }
    }

    fn forget(st: &mut State, ldir: &str, name: &str) {
        if let Some(i) = st.layers.get_mut(ldir).and_then(|l| l.remove(name)) {
            st.files = st.files.saturating_sub(1);
            st.bytes = st.bytes.saturating_sub(i.size);
        }
        if st.layers.get(ldir).is_some_and(|l| l.is_empty()) {
            st.layers.remove(ldir);
        }
        st.handles.remove(&(ldir.to_string(), name.to_string()));
    }

    fn write(&self, ldir: &str, name: &str, id: u64, data: &[u8]) -> Result<(), MaterializeError> {
        let dir = self.dir.join(ldir);
        fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
        let tmp = dir.join(format!(".tmp-{id}"));
        let done = dir.join(name);
        let res = (|| {
            let mut f = File::create(&tmp).map_err(io("creating", &tmp))?;
            f.write_all(data).map_err(io("writing", &tmp))?;
            fs::rename(&tmp, &done).map_err(io("renaming into place", &done))
        })();
        if res.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        res
    }

    /// A read handle on the stored content of `path`, if stored.
    pub fn get(&self, layer_digest: &str, path: &str) -> Option<Arc<File>> {
        let key = (layer_dir(layer_digest), file_name(path));
        {
            let mut st = self.state();
            let ready = st
                .layers
                .get(&key.0)
                .and_then(|l| l.get(&key.1))
                .is_some_and(|i| i.ready);
            if !ready {
                return None;
            }
            st.tick += 1;
            let tick = st.tick;
            if let Some((f, used)) = st.handles.get_mut(&key) {
                *used = tick;
                return Some(f.clone());
            }
        }
        let p = self.dir.join(&key.0).join(&key.1);
        let f = match File::open(&p) {
            Ok(f) => Arc::new(f),
            Err(e) => {
                warn!(path = %p.display(), error = %e, "materialized file unreadable; reading through spans");
                let mut st = self.state();
                Self::forget(&mut st, &key.0, &key.1);
                return None;
            }
        };
        let mut st = self.state();
        // Still stored? (remove_layer may have run meanwhile.)
        if !st
            .layers
            .get(&key.0)
            .is_some_and(|l| l.contains_key(&key.1))
        {
            return Some(f);
        }
        if st.handles.len() >= MAX_HANDLES
            && let Some(old) = st
                .handles
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone())
        {
            st.handles.remove(&old);
        }
        let tick = st.tick;
        st.handles.insert(key, (f.clone(), tick));
        Some(f)
    }

    /// Announces `[offset, offset + len)` of a packed file of `file_size` bytes, so that
    /// reads of it wait for the pack. `Ok(false)`: over a budget (or another size than
    /// announced before), not taken; its bytes will be dropped when they come.
    pub fn expect(
        &self,
        layer_digest: &str,
        path: &str,
        file_size: u64,
        offset: u64,
        len: u64,
    ) -> Result<bool, MaterializeError> {
        let key = (layer_dir(layer_digest), file_name(path));
        let mut st = self.state();
        if let Some(r) = st.ranged.get(&key) {
            if r.size != file_size || r.abandoned {
                return Ok(false);
            }
        } else {
            if st.files >= self.max_files {
                return Ok(false);
            }
            let dir = self.dir.join(&key.0);
            fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
            let p = dir.join(format!("p-{}", key.1));
            let f = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&p)
                .map_err(io("creating", &p))?;
            st.files += 1;
            st.ranged.insert(
                key.clone(),
                Ranged {
                    file: Arc::new(f),
                    size: file_size,
                    present: Vec::new(),
                    expected: Vec::new(),
                    claimed: Vec::new(),
                    reserved: 0,
                    abandoned: false,
                },
            );
        }
        if st.bytes.saturating_add(len) > self.max_bytes {
            return Ok(false);
        }
        let Some(r) = st.ranged.get_mut(&key) else {
            return Ok(false);
        };
        if !insert_range(&mut r.expected, offset, len) {
            return Ok(false);
        }
        r.reserved += len;
        st.bytes += len;
        Ok(true)
    }

    /// Stores bytes of a packed file that [`Materializer::expect`] announced. `Ok(false)`:
    /// not announced (over a budget, or the layer was removed), dropped.
    pub fn fill(
        &self,
        layer_digest: &str,
        path: &str,
        offset: u64,
        data: &[u8],
    ) -> Result<bool, MaterializeError> {
        use std::os::unix::fs::FileExt;
        let key = (layer_dir(layer_digest), file_name(path));
        let len = data.len() as u64;
        let file = {
            let mut st = self.state();
            let Some(r) = st.ranged.get_mut(&key) else {
                return Ok(false);
            };
            if !covers(&r.expected, offset, len)
                || overlaps(&r.claimed, offset, len)
                || !insert_range(&mut r.claimed, offset, len)
            {
                return Ok(false);
            }
            r.file.clone()
        };
        // Written outside the lock; the range is marked present only once it is written.
        file.write_all_at(data, offset)
            .map_err(io("writing", &self.dir.join(&key.0)))?;
        let mut st = self.state();
        let Some(r) = st.ranged.get_mut(&key) else {
            return Ok(false);
        };
        let marked = insert_range(&mut r.present, offset, len);
        drop(st);
        self.arrived.notify_waiters();
        Ok(marked)
    }

    /// The pack will not bring what it announced of this file and has not brought yet.
    pub fn abandon(&self, layer_digest: &str, path: &str) {
        let key = (layer_dir(layer_digest), file_name(path));
        if let Some(r) = self.state().ranged.get_mut(&key) {
            r.abandoned = true;
        }
        self.arrived.notify_waiters();
    }

    /// Where a read of `[offset, offset + len)` of the packed file `path` (of `file_size`
    /// bytes per the layer's index) stands.
    pub fn ranged(
        &self,
        layer_digest: &str,
        path: &str,
        file_size: u64,
        offset: u64,
        len: u64,
    ) -> RangedRead {
        let st = self.state();
        if st.ranged.is_empty() || len == 0 {
            return RangedRead::No;
        }
        let key = (layer_dir(layer_digest), file_name(path));
        match st.ranged.get(&key) {
            Some(r) if r.size == file_size => {
                if covers(&r.present, offset, len) {
                    RangedRead::Here(r.file.clone())
                } else if !r.abandoned && covers(&r.expected, offset, len) {
                    RangedRead::Coming
                } else {
                    RangedRead::No
                }
            }
            _ => RangedRead::No,
        }
    }

    /// Waits up to `timeout` for a read that is [`RangedRead::Coming`]; `None`: read it
    /// through spans (not coming any more, or too late).
    pub async fn wait_ranged(
        &self,
        layer_digest: &str,
        path: &str,
        file_size: u64,
        offset: u64,
        len: u64,
        timeout: std::time::Duration,
    ) -> Option<Arc<File>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Registered before the check, so an arrival between the two is not missed.
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            match self.ranged(layer_digest, path, file_size, offset, len) {
                RangedRead::Here(f) => return Some(f),
                RangedRead::No => return None,
                RangedRead::Coming => {}
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                return None;
            }
        }
    }

    /// The local copy of all of `path` (`file_size` bytes per the layer's index), if one is
    /// here: materialized whole, or every byte of it brought by a pack.
    pub fn whole(&self, layer_digest: &str, path: &str, file_size: u64) -> Option<Arc<File>> {
        match self.ranged(layer_digest, path, file_size, 0, file_size) {
            RangedRead::Here(f) => Some(f),
            _ => self.get(layer_digest, path),
        }
    }

    /// Whether the pack announced any of `path`.
    pub fn is_packed(&self, layer_digest: &str, path: &str) -> bool {
        let key = (layer_dir(layer_digest), file_name(path));
        self.state().ranged.contains_key(&key)
    }

    /// Forgets a layer's files and deletes them, giving their budget back.
    pub fn remove_layer(&self, layer_digest: &str) {
        let ldir = layer_dir(layer_digest);
        {
            let mut st = self.state();
            if let Some(files) = st.layers.remove(&ldir) {
                st.files = st.files.saturating_sub(files.len());
                let bytes: u64 = files.values().map(|i| i.size).sum();
                st.bytes = st.bytes.saturating_sub(bytes);
            }
            let packed: Vec<(String, String)> = st
                .ranged
                .keys()
                .filter(|(l, _)| *l == ldir)
                .cloned()
                .collect();
            for k in packed {
                if let Some(r) = st.ranged.remove(&k) {
                    st.files = st.files.saturating_sub(1);
                    st.bytes = st.bytes.saturating_sub(r.reserved);
                }
            }
            st.handles.retain(|(l, _), _| *l != ldir);
        }
        // Waiters on the removed files read through spans.
        self.arrived.notify_waiters();
        let dir = self.dir.join(&ldir);
        if let Err(e) = fs::remove_dir_all(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            warn!(dir = %dir.display(), error = %e, "removing materialized files");
        }
    }

    /// Bytes and files stored or being stored.
    pub fn usage(&self) -> (u64, usize) {
        let st = self.state();
        (st.bytes, st.files)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use std::time::Duration;

    const L1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const L2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    fn read_all(f: &File) -> Vec<u8> {
        let mut buf = vec![0u8; 1 << 16];
        let n = f.read_at(&mut buf, 0).unwrap();
        buf.truncate(n);
        buf
    }

    #[test]
    fn put_get_and_budgets() {
        let tmp = tempfile::tempdir().unwrap();
        let m = Materializer::open(&tmp.path().join("m"), 100, 3, 60).unwrap();
        assert!(m.wants(60));
        assert!(!m.wants(61), "over the per-file limit");
        assert!(m.put(L1, "/etc/passwd", b"root:x:0:0").unwrap());
        // The same file under its index spelling is the same file.
        let f = m.get(L1, "etc/passwd").expect("stored");
        assert_eq!(read_all(&f), b"root:x:0:0");
        assert!(m.get(L2, "etc/passwd").is_none(), "other layer");
        assert!(!m.put(L1, "big", &[0u8; 61]).unwrap(), "per-file limit");
        assert!(m.put(L1, "a", &[1u8; 60]).unwrap());
        assert!(!m.put(L1, "b", &[1u8; 40]).unwrap(), "byte budget");
        assert!(m.put(L2, "c", &[2u8; 5]).unwrap());
        assert!(!m.put(L2, "d", &[2u8; 1]).unwrap(), "file budget");
        assert_eq!(m.usage(), (75, 3));
        // Stored under hashed names only: no path from the layer appears on disk.
        let names: Vec<String> = walk(tmp.path());
        assert!(names.iter().all(|n| !n.contains("passwd")), "{names:?}");
        assert!(
            names.iter().any(|n| n.contains(&"1".repeat(64))),
            "{names:?}"
        );

        m.remove_layer(L1);
        assert_eq!(m.usage(), (5, 1));
        assert!(m.get(L1, "/etc/passwd").is_none());
        assert!(!tmp.path().join("m").join("1".repeat(64)).exists());
        assert!(m.put(L1, "b", &[1u8; 40]).unwrap(), "budget given back");
        assert_eq!(read_all(&m.get(L2, "c").unwrap()), vec![2u8; 5]);
    }

    fn walk(p: &Path) -> Vec<String> {
        let mut out = Vec::new();
        for e in fs::read_dir(p).unwrap() {
            let e = e.unwrap();
            out.push(e.path().display().to_string());
            if e.file_type().unwrap().is_dir() {
                out.extend(walk(&e.path()));
            }
        }
        out
    }

    fn r(offset: u64, len: u64) -> ByteRange {
        ByteRange { offset, len }
    }

    #[test]
    fn insert_range_merges_and_never_grows_into_a_hull() {
        let mut v = Vec::new();
        assert!(insert_range(&mut v, 100, 10));
        assert!(insert_range(&mut v, 0, 10));
        assert!(insert_range(&mut v, 10, 5)); // touches 0..10
        assert_eq!(v, vec![r(0, 15), r(100, 10)]);
        assert!(insert_range(&mut v, 14, 90)); // bridges both
        assert_eq!(v, vec![r(0, 110)]);
        let mut many: Vec<ByteRange> = (0..MAX_PACK_RANGES as u64).map(|i| r(i * 10, 1)).collect();
        assert!(
            !insert_range(&mut many, 1_000_000, 1),
            "one more separate range is refused"
        );
        assert_eq!(many.len(), MAX_PACK_RANGES);
        assert!(insert_range(&mut many, 0, 5), "merging into one is fine");
        assert!(covers(&many, 0, 5) && !covers(&many, 0, 11));
    }

    #[tokio::test]
    async fn packed_ranges_come_wait_and_go() {
        let tmp = tempfile::tempdir().unwrap();
        let m = Arc::new(Materializer::open(&tmp.path().join("m"), 100, 10, 60).unwrap());
        let state = |off, len| match m.ranged(L1, "/usr/lib/big", 1000, off, len) {
            RangedRead::Here(_) => "here",
            RangedRead::Coming => "coming",
            RangedRead::No => "no",
        };
        assert_eq!(state(0, 10), "no", "nothing announced");
        // Two ranges of a 1000-byte file: 30 + 40 bytes of the 100-byte budget.
        assert!(m.expect(L1, "usr/lib/big", 1000, 0, 30).unwrap());
        assert!(m.expect(L1, "usr/lib/big", 1000, 500, 40).unwrap());
        assert!(
            !m.expect(L1, "usr/lib/big", 1000, 800, 31).unwrap(),
            "over the budget"
        );
        assert!(
            !m.expect(L1, "usr/lib/big", 999, 900, 1).unwrap(),
            "another size"
        );
        assert_eq!(state(0, 10), "coming");
        assert_eq!(state(25, 10), "no", "past the announced range");
        assert!(
            matches!(m.ranged(L1, "usr/lib/big", 999, 0, 10), RangedRead::No),
            "a file of another size is another file"
        );
        // A waiter wakes when its bytes are written.
        let waiter = {
            let m = m.clone();
            tokio::spawn(async move {
                m.wait_ranged(L1, "usr/lib/big", 1000, 500, 40, Duration::from_secs(10))
                    .await
            })
        };
        tokio::task::yield_now().await;
        assert!(
            !m.fill(L1, "usr/lib/big", 100, b"x").unwrap(),
            "not announced"
        );
        assert!(m.fill(L1, "usr/lib/big", 500, &[7u8; 40]).unwrap());
        let f = waiter.await.unwrap().expect("the bytes came");
        let mut buf = [0u8; 40];
        f.read_exact_at(&mut buf, 500).unwrap();
        assert_eq!(buf, [7u8; 40]);
        assert_eq!(state(510, 30), "here");
        // Write-once: a second record for bytes already written (whole or in part) is
        // dropped; what was served stays.
        assert!(!m.fill(L1, "usr/lib/big", 500, &[9u8; 40]).unwrap());
        assert!(!m.fill(L1, "usr/lib/big", 530, &[9u8; 20]).unwrap());
        f.read_exact_at(&mut buf, 500).unwrap();
        assert_eq!(buf, [7u8; 40], "bytes already served never change");
        // Abandoned: what has not come is read through spans, at once.
        m.abandon(L1, "usr/lib/big");
        assert_eq!(state(0, 10), "no");
        assert!(
            m.wait_ranged(L1, "usr/lib/big", 1000, 0, 10, Duration::from_secs(10))
                .await
                .is_none()
        );
        assert_eq!(state(500, 40), "here", "what came stays");
        assert!(m.is_packed(L1, "/usr/lib/big"));
        assert_eq!(m.usage(), (70, 1));
        // A wait ends at its timeout when the bytes never come.
        assert!(m.expect(L2, "f", 10, 0, 10).unwrap());
        assert!(
            m.wait_ranged(L2, "f", 10, 0, 10, Duration::from_millis(20))
                .await
                .is_none()
        );
        m.remove_layer(L1);
        m.remove_layer(L2);
        assert_eq!(m.usage(), (0, 0), "budget given back");
        assert_eq!(state(500, 40), "no");
    }

    #[test]
    fn overlapping_ranges() {
        let rs = [r(10, 10), r(30, 5)];
        assert!(!overlaps(&rs, 0, 10), "touching is not overlapping");
        assert!(overlaps(&rs, 5, 6));
        assert!(overlaps(&rs, 19, 1));
        assert!(!overlaps(&rs, 20, 10));
        assert!(overlaps(&rs, 25, 100));
        assert!(!overlaps(&rs, 35, 5));
        assert!(!overlaps(&rs, 12, 0), "an empty range overlaps nothing");
        assert!(!overlaps(&[], 0, 10));
    }

    #[test]
    fn hostile_names_stay_inside_and_open_cleans() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("m");
        fs::create_dir_all(dir.join("stale")).unwrap();
        fs::write(dir.join("stale/f"), b"old").unwrap();
        let m = Materializer::open(&dir, 1 << 20, 100, 1 << 20).unwrap();
        assert!(!dir.join("stale").exists(), "cleaned at open");
        for (layer, path) in [
            ("../../etc", "../../../../tmp/x"),
            ("sha256:../..", "/"),
            ("", ""),
            (L1, &"a/".repeat(3000)),
        ] {
            assert!(m.put(layer, path, b"v").unwrap());
            assert_eq!(read_all(&m.get(layer, path).unwrap()), b"v");
        }
        for n in walk(tmp.path()) {
            assert!(n.starts_with(dir.to_str().unwrap()), "{n}");
        }
    }

    #[test]
    fn handles_are_bounded_and_concurrent_puts_are_safe() {
        let tmp = tempfile::tempdir().unwrap();
        let m = Arc::new(Materializer::open(tmp.path(), 1 << 30, 10_000, 1 << 20).unwrap());
        // Four writers race on the same names; each name ends up stored once, whole.
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for i in 0..200 {
                        let p = format!("f{}", i % 150);
                        assert!(m.put(L1, &p, p.as_bytes()).unwrap());
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        for i in 0..150 {
            let p = format!("f{i}");
            assert_eq!(read_all(&m.get(L1, &p).expect("stored")), p.as_bytes());
        }
        assert_eq!(m.usage().1, 150);
        for i in 0..MAX_HANDLES + 50 {
            let p = format!("h{i}");
            m.put(L2, &p, b"x").unwrap();
            m.get(L2, &p).unwrap();
        }
        assert!(m.state().handles.len() <= MAX_HANDLES);
    }
}
