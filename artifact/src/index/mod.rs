//! The layer index: a layer's tar table of contents, its decompression checkpoints and the
//! SHA-256 of every span, so that any byte range of any file can be fetched lazily, inflated
//! alone from a ranged read of the compressed blob, and verified.
//!
//! The binary encoding is documented field by field in `docs/index-format.md`.

mod codec;
pub mod indexer;
pub mod reader;
pub(crate) mod span;
pub(crate) mod tar;
pub mod verify;
pub(crate) mod zlib;

use std::collections::HashMap;
use std::sync::OnceLock;

use bytes::Bytes;
use sha2::Digest;

pub use codec::DecodeError;
pub use span::{SpanError, inflate_span, inflate_span_with_windows};
pub use tar::TarError;

/// Media type of an encoded layer index blob.
pub const INDEX_MEDIA_TYPE: &str = "application/vnd.talaria.layer.index.v1";

/// Media type of a layer's checkpoint windows blob (the windows of a version 2 index).
pub const WINDOWS_MEDIA_TYPE: &str = "application/vnd.talaria.layer.windows.v1";

/// Encoding with every checkpoint window inline.
pub const INDEX_VERSION_INLINE: u32 = 1;

/// Encoding written by builds: the windows live in a separate blob ([`LayerIndex::split`]),
/// so a node mounts a layer from a small index and fetches a window only to inflate a span
/// no pack or cache holds (windows were ~90% of an index's bytes).
pub const INDEX_VERSION: u32 = 2;

/// Largest zlib stream of one window (32 KiB stored raw, plus block and stream headers).
pub const MAX_WINDOW_COMPRESSED: u64 = 32 * 1024 + 1024;

/// Largest span the indexer produces and the decoder accepts beyond `span_size`: a checkpoint
/// can only be taken between deflate blocks, so a span overshoots by up to one block.
pub const MAX_SPAN_OVERSHOOT: u64 = 64 * 1024 * 1024;

/// Smallest and largest accepted span sizes. The largest is the policy knob's maximum: a
/// read inflates a whole span, so a hostile index cannot make a node hold more than this
/// (plus the overshoot) per span read.
pub const MIN_SPAN_SIZE: u64 = 1024;
pub const MAX_SPAN_SIZE: u64 = 64 * 1024 * 1024;

/// Most entries in one layer's table of contents, built or decoded (real layers have up to
/// a few hundred thousand files; each decoded entry costs ~180 B plus its path). With the
/// path and table-of-contents caps, decoding any index fits in ~0.7 GiB (docs/trust.md).
pub const MAX_ENTRIES: u64 = 1_000_000;
/// Most path bytes (paths and link targets) in one layer's table of contents.
pub const MAX_PATH_BYTES: u64 = 128 << 20;

/// Compression of a layer blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// Guesses the compression of an OCI/Docker layer media type.
    pub fn from_media_type(media_type: &str) -> Option<Compression> {
        if media_type.ends_with("+gzip") || media_type.ends_with(".gzip") {
            Some(Compression::Gzip)
        } else if media_type.ends_with("+zstd") || media_type.ends_with(".zstd") {
            Some(Compression::Zstd)
        } else if media_type.ends_with(".tar") || media_type.ends_with("rootfs.diff.tar") {
            Some(Compression::None)
        } else {
            None
        }
    }
}

/// Type of a table-of-contents entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    /// `link_target` is the (normalized) path of the entry this one links to.
    Hardlink,
    Char,
    Block,
    Fifo,
    /// Overlay whiteout: `path` is the name removed from lower layers (`.wh.<name>` in the tar).
    Whiteout,
    /// Overlay opaque directory: `path` is the directory whose lower content is hidden
    /// (`<dir>/.wh..wh..opq` in the tar).
    OpaqueDir,
}

/// One tar entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Normalized: no leading "/" or "./", no "." or ".." components, no trailing "/".
    /// The archive root itself ("./") is the empty path.
    pub path: String,
    pub kind: EntryKind,
    /// Permission bits including setuid/setgid/sticky (`mode & 0o7777`).
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub uname: Option<String>,
    pub gname: Option<String>,
    /// Size of the content in the tar stream (regular files; 0 for most other kinds).
    pub size: u64,
    /// Seconds since the epoch.
    pub mtime: i64,
    /// Symlink target (verbatim) or hardlink target (normalized path).
    pub link_target: Option<String>,
    /// Extended attributes from PAX `SCHILY.xattr.*` records, in archive order.
    pub xattrs: Vec<(String, Vec<u8>)>,
    pub dev_major: u32,
    pub dev_minor: u32,
    /// Offset of the entry's content in the uncompressed stream (just after its header).
    pub offset: u64,
}

/// A decompression checkpoint and the span of uncompressed data that starts there.
///
/// Span `i` covers `[uncompressed_offset, uncompressed_offset + uncompressed_size)`; it can be
/// inflated alone from the compressed bytes `[compressed_offset, compressed_end)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Span {
    pub uncompressed_offset: u64,
    pub uncompressed_size: u64,
    /// First compressed byte needed (for gzip: the byte holding the first bit of the span).
    pub compressed_offset: u64,
    /// One past the last compressed byte needed.
    pub compressed_end: u64,
    /// Bits of the byte at `compressed_offset` that belong to the previous span (0..=7).
    pub bits: u8,
    /// Length of the uncompressed history window (≤ 32 KiB; 0 at a gzip member start or for
    /// uncompressed layers).
    pub window_len: u32,
    /// The history window, zlib-compressed (empty when `window_len` is 0, or when the
    /// window lives in the windows blob: see `window_at`).
    pub window: Bytes,
    /// Where the zlib-compressed window lies in the windows blob (offset, length), for an
    /// index whose windows are separate and a span that has one.
    pub window_at: Option<(u64, u64)>,
    /// SHA-256 of the span's uncompressed bytes.
    pub digest: [u8; 32],
}

/// The separate blob of a version 2 index's windows: every span's zlib-compressed window,
/// concatenated in span order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowsBlob {
    pub digest: [u8; 32],
    pub size: u64,
}

impl WindowsBlob {
    /// `"sha256:<hex>"` of the blob.
    pub fn digest_string(&self) -> String {
        format!("sha256:{}", hex::encode(self.digest))
    }
}

/// The index of one layer.
#[derive(Clone, Debug)]
pub struct LayerIndex {
    pub version: u32,
    pub compression: Compression,
    pub compressed_size: u64,
    pub uncompressed_size: u64,
    pub span_size: u64,
    /// SHA-256 of the compressed blob (the layer digest) and of the uncompressed tar (diff_id).
    pub compressed_digest: [u8; 32],
    pub diff_id: [u8; 32],
    pub entries: Vec<Entry>,
    pub spans: Vec<Span>,
    /// The windows blob, when the windows are not inline (version 2).
    pub windows: Option<WindowsBlob>,
    /// path → index of the last entry with that path (later entries win, as in tar extraction).
    lookup: OnceLock<HashMap<String, usize>>,
}

impl PartialEq for LayerIndex {
    fn eq(&self, other: &Self) -> bool {
        self.version == other.version
            && self.compression == other.compression
            && self.compressed_size == other.compressed_size
            && self.uncompressed_size == other.uncompressed_size
            && self.span_size == other.span_size
            && self.compressed_digest == other.compressed_digest
            && self.diff_id == other.diff_id
            && self.entries == other.entries
            && self.spans == other.spans
            && self.windows == other.windows
    }
}

impl Eq for LayerIndex {}

impl LayerIndex {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        compression: Compression,
        compressed_size: u64,
        uncompressed_size: u64,
        span_size: u64,
        compressed_digest: [u8; 32],
        diff_id: [u8; 32],
        entries: Vec<Entry>,
        spans: Vec<Span>,
    ) -> Self {
        Self {
            version: INDEX_VERSION_INLINE,
            compression,
            compressed_size,
            uncompressed_size,
            span_size,
            compressed_digest,
            diff_id,
            entries,
            spans,
            windows: None,
            lookup: OnceLock::new(),
        }
    }

    /// Roughly the heap this decoded index holds (entries and their strings, the path
    /// lookup once built, spans and inline windows): what keeping it in memory costs.
    pub fn memory_bytes(&self) -> u64 {
        let strings = |e: &Entry| {
            let opt = |s: &Option<String>| s.as_ref().map_or(0, String::len);
            // The path twice: the lookup map keeps its own copy.
            2 * e.path.len()
                + opt(&e.uname)
                + opt(&e.gname)
                + opt(&e.link_target)
                + e.xattrs
                    .iter()
                    .map(|(k, v)| k.len() + v.len() + 48)
                    .sum::<usize>()
        };
        let entries: u64 = self
            .entries
            .iter()
            .map(|e| (std::mem::size_of::<Entry>() + 48 + strings(e)) as u64)
            .sum();
        let spans: u64 = self
            .spans
            .iter()
            .map(|s| (std::mem::size_of::<Span>() + s.window.len()) as u64)
            .sum();
        entries + spans
    }

    /// Encodes the index (see `docs/index-format.md`): version 1 with its windows inline,
    /// version 2 (without them) when they are in a windows blob.
    pub fn encode(&self) -> Vec<u8> {
        codec::encode(self)
    }

    /// The index with its windows moved out (version 2), and the windows blob. An index
    /// whose windows are already separate, or that has none (uncompressed layers), is
    /// returned as is, with an empty blob.
    pub fn split(&self) -> (LayerIndex, Bytes) {
        let mut out = self.clone();
        if self.windows.is_some() || self.spans.iter().all(|s| s.window.is_empty()) {
            return (out, Bytes::new());
        }
        let mut blob = Vec::with_capacity(self.spans.iter().map(|s| s.window.len()).sum());
        for s in &mut out.spans {
            s.window_at = (!s.window.is_empty()).then(|| {
                let at = blob.len() as u64;
                blob.extend_from_slice(&s.window);
                (at, s.window.len() as u64)
            });
            s.window = Bytes::new();
        }
        out.version = INDEX_VERSION;
        out.windows = Some(WindowsBlob {
            digest: sha2::Sha256::digest(&blob).into(),
            size: blob.len() as u64,
        });
        (out, Bytes::from(blob))
    }

    /// The index with every window inline again, from its windows blob (checked against the
    /// digest and size the index records). An index with inline windows ignores `blob`.
    pub fn with_windows(&self, blob: &[u8]) -> Result<LayerIndex, DecodeError> {
        let Some(w) = self.windows else {
            return Ok(self.clone());
        };
        let actual: [u8; 32] = sha2::Sha256::digest(blob).into();
        if blob.len() as u64 != w.size || actual != w.digest {
            return Err(DecodeError::Invalid(format!(
                "windows blob of {} bytes hashes to sha256:{}, the index wants {} bytes, {}",
                blob.len(),
                hex::encode(actual),
                w.size,
                w.digest_string()
            )));
        }
        let mut out = self.clone();
        for (i, s) in out.spans.iter_mut().enumerate() {
            if let Some((at, len)) = s.window_at.take() {
                let (a, e) = (at as usize, at.saturating_add(len) as usize);
                let z = blob.get(a..e).ok_or_else(|| {
                    DecodeError::Invalid(format!("span {i}: window past the windows blob"))
                })?;
                s.window = Bytes::copy_from_slice(z);
            }
        }
        out.version = INDEX_VERSION_INLINE;
        out.windows = None;
        Ok(out)
    }

    /// Range `[start, end)` of the windows blob holding the windows of spans
    /// `first..=last`; `None` when none of them has a separate window.
    pub fn windows_range(&self, first: usize, last: usize) -> Option<(u64, u64)> {
        let spans = self
            .spans
            .get(first..=last.min(self.spans.len().checked_sub(1)?))?;
        let mut r: Option<(u64, u64)> = None;
        for (at, len) in spans.iter().filter_map(|s| s.window_at) {
            let end = at.saturating_add(len);
            r = Some(match r {
                None => (at, end),
                Some((s, e)) => (s.min(at), e.max(end)),
            });
        }
        r
    }

    /// Decodes and validates an encoded index. Never panics on arbitrary input.
    pub fn decode(bytes: &[u8]) -> Result<LayerIndex, DecodeError> {
        codec::decode(bytes)
    }

    /// The entry at `path` (normalized; a leading "/" or "./" is tolerated). When an archive
    /// holds several entries with one path, the last one wins. The lookup table is built on
    /// first use: mutate `entries` only before calling `find`.
    pub fn find(&self, path: &str) -> Option<&Entry> {
        let map = self.lookup.get_or_init(|| {
            let mut map = HashMap::with_capacity(self.entries.len());
            for (i, e) in self.entries.iter().enumerate() {
                map.insert(e.path.clone(), i);
            }
            map
        });
        let key = tar::normalize_path(path).ok()?;
        map.get(&key).and_then(|&i| self.entries.get(i))
    }

    /// `"sha256:<hex>"` of the compressed blob.
    pub fn compressed_digest_string(&self) -> String {
        format!("sha256:{}", hex::encode(self.compressed_digest))
    }

    /// `"sha256:<hex>"` of the uncompressed tar.
    pub fn diff_id_string(&self) -> String {
        format!("sha256:{}", hex::encode(self.diff_id))
    }

    /// Index of the span holding `uncompressed_offset` (the last span for offsets at or past
    /// the end; 0 when there are no spans).
    pub fn span_for(&self, uncompressed_offset: u64) -> usize {
        self.spans
            .partition_point(|s| s.uncompressed_offset <= uncompressed_offset)
            .saturating_sub(1)
    }

    /// Compressed byte range `[start, end)` to fetch to inflate `span` alone; no neighbour is
    /// needed. An out-of-range span gives the empty range at the end of the blob.
    pub fn compressed_range(&self, span: usize) -> (u64, u64) {
        match self.spans.get(span) {
            Some(s) => (s.compressed_offset, s.compressed_end),
            None => (self.compressed_size, self.compressed_size),
        }
    }
}
