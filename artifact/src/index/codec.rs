//! Binary encoding of [`LayerIndex`] (format in `docs/index-format.md`).
//!
//! Decoding treats its input as hostile: every count is checked against the bytes that remain
//! before anything is allocated for it, every offset is checked for order and range, and the
//! compressed table of contents is inflated with a hard bound.

use std::io::Read;

use bytes::Bytes;

use super::span::decompress_window;
use super::zlib::WINDOW_SIZE;
use super::{
    Compression, Entry, EntryKind, INDEX_VERSION, INDEX_VERSION_INLINE, LayerIndex, MAX_ENTRIES,
    MAX_PATH_BYTES, MAX_SPAN_OVERSHOOT, MAX_SPAN_SIZE, MAX_WINDOW_COMPRESSED, MIN_SPAN_SIZE, Span,
    WindowsBlob,
};

const MAGIC: &[u8; 4] = b"TLIX";
/// Smallest possible encoded entry (15 one-byte fields), to bound the entry count.
const MIN_ENTRY_BYTES: u64 = 15;
/// Smallest possible encoded span (6 one-byte fields + digest).
const MIN_SPAN_BYTES: u64 = 6 + 32;
/// deflate cannot expand more than ~1032:1; bound the table of contents accordingly.
const MAX_INFLATE_RATIO: u64 = 1100;
/// Hard cap on the decoded table of contents.
const MAX_TOC_BYTES: u64 = 128 << 20;

/// Why an encoded index was rejected.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not a Talaria layer index (bad magic)")]
    BadMagic,
    #[error(
        "unsupported layer index version {0} (this build reads versions {INDEX_VERSION_INLINE} and {INDEX_VERSION})"
    )]
    UnsupportedVersion(u8),
    #[error("layer index truncated while reading {0}")]
    Truncated(&'static str),
    #[error("invalid layer index: {0}")]
    Invalid(String),
}

fn invalid(m: impl Into<String>) -> DecodeError {
    DecodeError::Invalid(m.into())
}

// ---------- encoding ----------

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

fn put_opt(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        None => put_varint(out, 0),
        Some(s) => {
            put_varint(out, s.len() as u64 + 1);
            out.extend_from_slice(s.as_bytes());
        }
    }
}

fn kind_code(k: EntryKind) -> u8 {
    match k {
        EntryKind::File => 0,
        EntryKind::Dir => 1,
        EntryKind::Symlink => 2,
        EntryKind::Hardlink => 3,
        EntryKind::Char => 4,
        EntryKind::Block => 5,
        EntryKind::Fifo => 6,
        EntryKind::Whiteout => 7,
        EntryKind::OpaqueDir => 8,
    }
}

fn kind_from(c: u8) -> Option<EntryKind> {
    Some(match c {
        0 => EntryKind::File,
        1 => EntryKind::Dir,
        2 => EntryKind::Symlink,
        3 => EntryKind::Hardlink,
        4 => EntryKind::Char,
        5 => EntryKind::Block,
        6 => EntryKind::Fifo,
        7 => EntryKind::Whiteout,
        8 => EntryKind::OpaqueDir,
        _ => return None,
    })
}

fn common_prefix(a: &str, b: &str) -> usize {
    let n = a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
    // Keep the split on a char boundary so the suffix stays valid UTF-8.
    (0..=n).rev().find(|&i| b.is_char_boundary(i)).unwrap_or(0)
}

pub(super) fn encode(ix: &LayerIndex) -> Vec<u8> {
    let mut toc = Vec::with_capacity(ix.entries.len() * 48);
    let mut prev_path = "";
    let mut prev_end: u64 = 0;
    for e in &ix.entries {
        let shared = common_prefix(prev_path, &e.path);
        put_varint(&mut toc, shared as u64);
        put_bytes(&mut toc, &e.path.as_bytes()[shared..]);
        toc.push(kind_code(e.kind));
        put_varint(&mut toc, u64::from(e.mode));
        put_varint(&mut toc, e.uid);
        put_varint(&mut toc, e.gid);
        put_opt(&mut toc, e.uname.as_deref());
        put_opt(&mut toc, e.gname.as_deref());
        put_varint(&mut toc, e.size);
        put_varint(&mut toc, zigzag(e.mtime));
        put_opt(&mut toc, e.link_target.as_deref());
        put_varint(&mut toc, e.xattrs.len() as u64);
        for (k, v) in &e.xattrs {
            put_bytes(&mut toc, k.as_bytes());
            put_bytes(&mut toc, v);
        }
        put_varint(&mut toc, u64::from(e.dev_major));
        put_varint(&mut toc, u64::from(e.dev_minor));
        put_varint(&mut toc, zigzag(e.offset.wrapping_sub(prev_end) as i64));
        prev_path = &e.path;
        prev_end = e.offset.wrapping_add(e.size);
    }
    let mut z = flate2::write::ZlibEncoder::new(
        Vec::with_capacity(toc.len() / 4),
        flate2::Compression::best(),
    );
    // Writing into a Vec cannot fail.
    let toc_z = std::io::Write::write_all(&mut z, &toc)
        .and_then(|_| z.finish())
        .unwrap_or_default();

    let mut out = Vec::with_capacity(64 + toc_z.len() + ix.spans.len() * 64);
    let separate = ix.windows.is_some();
    out.extend_from_slice(MAGIC);
    out.push(if separate {
        INDEX_VERSION as u8
    } else {
        INDEX_VERSION_INLINE as u8
    });
    out.push(match ix.compression {
        Compression::None => 0,
        Compression::Gzip => 1,
        Compression::Zstd => 2,
    });
    put_varint(&mut out, ix.compressed_size);
    put_varint(&mut out, ix.uncompressed_size);
    put_varint(&mut out, ix.span_size);
    out.extend_from_slice(&ix.compressed_digest);
    out.extend_from_slice(&ix.diff_id);
    put_varint(&mut out, ix.entries.len() as u64);
    put_varint(&mut out, toc.len() as u64);
    put_bytes(&mut out, &toc_z);
    put_varint(&mut out, ix.spans.len() as u64);
    let mut prev_off = 0u64;
    for s in &ix.spans {
        put_varint(&mut out, s.compressed_offset.wrapping_sub(prev_off));
        put_varint(&mut out, s.compressed_end.wrapping_sub(s.compressed_offset));
        out.push(s.bits);
        put_varint(&mut out, s.uncompressed_size);
        put_varint(&mut out, u64::from(s.window_len));
        if separate {
            // Only the length: the windows follow one another in the windows blob.
            put_varint(&mut out, s.window_at.map_or(0, |(_, len)| len));
        } else {
            put_bytes(&mut out, &s.window);
        }
        out.extend_from_slice(&s.digest);
        prev_off = s.compressed_offset;
    }
    if let Some(w) = &ix.windows {
        put_varint(&mut out, w.size);
        out.extend_from_slice(&w.digest);
    }
    out
}

// ---------- decoding ----------

struct Cur<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cur<'a> {
    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        let b = *self.buf.get(self.pos).ok_or(DecodeError::Truncated(what))?;
        self.pos += 1;
        Ok(b)
    }

    fn take(&mut self, n: u64, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if n > self.remaining() {
            return Err(DecodeError::Truncated(what));
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn varint(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = self.u8(what)?;
            let bits = u64::from(b & 0x7f);
            if shift == 63 && bits > 1 {
                return Err(invalid(format!("{what}: varint overflows")));
            }
            v |= bits << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(invalid(format!("{what}: varint too long")))
    }

    fn bytes(&mut self, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let n = self.varint(what)?;
        self.take(n, what)
    }

    fn string(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let b = self.bytes(what)?;
        String::from_utf8(b.to_vec()).map_err(|_| invalid(format!("{what} is not UTF-8")))
    }

    fn opt_string(&mut self, what: &'static str) -> Result<Option<String>, DecodeError> {
        match self.varint(what)? {
            0 => Ok(None),
            n => {
                let b = self.take(n - 1, what)?;
                String::from_utf8(b.to_vec())
                    .map(Some)
                    .map_err(|_| invalid(format!("{what} is not UTF-8")))
            }
        }
    }

    fn digest(&mut self, what: &'static str) -> Result<[u8; 32], DecodeError> {
        let b = self.take(32, what)?;
        let mut d = [0u8; 32];
        d.copy_from_slice(b);
        Ok(d)
    }
}

pub(super) fn decode(bytes: &[u8]) -> Result<LayerIndex, DecodeError> {
    let mut c = Cur { buf: bytes, pos: 0 };
    if c.take(4, "magic").map_err(|_| DecodeError::BadMagic)? != MAGIC {
        return Err(DecodeError::BadMagic);
    }
    let version = c.u8("version")?;
    let separate = match u32::from(version) {
        INDEX_VERSION_INLINE => false,
        INDEX_VERSION => true,
        _ => return Err(DecodeError::UnsupportedVersion(version)),
    };
    let compression = match c.u8("compression")? {
        0 => Compression::None,
        1 => Compression::Gzip,
        2 => Compression::Zstd,
        other => return Err(invalid(format!("unknown compression code {other}"))),
    };
    if compression == Compression::Zstd {
        return Err(invalid("zstd indexes are not supported by this version"));
    }
    let compressed_size = c.varint("compressed size")?;
    let uncompressed_size = c.varint("uncompressed size")?;
    let span_size = c.varint("span size")?;
    if !(MIN_SPAN_SIZE..=MAX_SPAN_SIZE).contains(&span_size) {
        return Err(invalid(format!("span size {span_size} out of range")));
    }
    let compressed_digest = c.digest("layer digest")?;
    let diff_id = c.digest("diff_id")?;
    let entry_count = c.varint("entry count")?;
    let toc_len = c.varint("table of contents length")?;
    let toc_z = c.bytes("table of contents")?;
    let max_toc = (toc_z.len() as u64)
        .saturating_mul(MAX_INFLATE_RATIO)
        .saturating_add(1024)
        .min(MAX_TOC_BYTES);
    if toc_len > max_toc {
        return Err(invalid(format!(
            "table of contents claims {toc_len} bytes from {} compressed",
            toc_z.len()
        )));
    }
    if entry_count > MAX_ENTRIES {
        return Err(invalid(format!(
            "{entry_count} entries (most {MAX_ENTRIES})"
        )));
    }
    if entry_count.saturating_mul(MIN_ENTRY_BYTES) > toc_len {
        return Err(invalid(format!(
            "{entry_count} entries cannot fit in {toc_len} bytes"
        )));
    }
    // Exactly what was claimed (bounded above): no doubling past it while inflating.
    let mut toc = Vec::with_capacity(usize::try_from(toc_len).unwrap_or(0).saturating_add(1));
    let mut z = flate2::read::ZlibDecoder::new(toc_z);
    (&mut z)
        .take(toc_len + 1)
        .read_to_end(&mut toc)
        .map_err(|e| invalid(format!("table of contents does not inflate: {e}")))?;
    if toc.len() as u64 != toc_len || z.total_in() != toc_z.len() as u64 {
        return Err(invalid(format!(
            "table of contents inflates to {} bytes from {} of {} input bytes, expected {toc_len}",
            toc.len(),
            z.total_in(),
            toc_z.len()
        )));
    }
    let entries = decode_entries(&toc, entry_count, uncompressed_size)?;

    let span_count = c.varint("span count")?;
    if span_count.saturating_mul(MIN_SPAN_BYTES) > c.remaining() {
        return Err(invalid(format!(
            "{span_count} spans cannot fit in {} bytes",
            c.remaining()
        )));
    }
    let mut spans = Vec::with_capacity(span_count as usize);
    let mut prev_off = 0u64;
    let mut uoff = 0u64;
    let max_span = span_size + MAX_SPAN_OVERSHOOT;
    // Offset of the next window in the windows blob (version 2).
    let mut window_off = 0u64;
    for i in 0..span_count {
        let delta = c.varint("span offset")?;
        let compressed_offset = prev_off
            .checked_add(delta)
            .ok_or_else(|| invalid(format!("span {i}: offset overflows")))?;
        let clen = c.varint("span compressed length")?;
        let compressed_end = compressed_offset
            .checked_add(clen)
            .filter(|&e| e <= compressed_size)
            .ok_or_else(|| invalid(format!("span {i}: compressed range past the blob")))?;
        let bits = c.u8("span bits")?;
        let ulen = c.varint("span length")?;
        let window_len = c.varint("window length")?;
        let (window, window_at) = if separate {
            let zlen = c.varint("window blob length")?;
            if (zlen == 0) != (window_len == 0) || zlen > MAX_WINDOW_COMPRESSED {
                return Err(invalid(format!(
                    "span {i}: {zlen} compressed bytes for a window of {window_len}"
                )));
            }
            let at = (zlen > 0).then_some((window_off, zlen));
            window_off = window_off.saturating_add(zlen);
            (&[][..], at)
        } else {
            (c.bytes("window")?, None)
        };
        let digest = c.digest("span digest")?;
        if bits > 7 {
            return Err(invalid(format!("span {i}: bit offset {bits}")));
        }
        if ulen == 0 || ulen > max_span {
            return Err(invalid(format!("span {i}: length {ulen} out of range")));
        }
        if clen == 0 {
            return Err(invalid(format!("span {i}: empty compressed range")));
        }
        if window_len > WINDOW_SIZE as u64 {
            return Err(invalid(format!("span {i}: window of {window_len} bytes")));
        }
        if let Some(prev) = spans.last() {
            let prev: &Span = prev;
            // Consecutive spans may share the byte holding the checkpoint, nothing more.
            if compressed_offset.saturating_add(1) < prev.compressed_end {
                return Err(invalid(format!("span {i}: overlaps the previous span")));
            }
        }
        match compression {
            Compression::None => {
                if bits != 0 || window_len != 0 || compressed_offset != uoff || clen != ulen {
                    return Err(invalid(format!(
                        "span {i}: inconsistent for an uncompressed layer"
                    )));
                }
            }
            _ => {
                if bits != 0 && clen < 2 {
                    return Err(invalid(format!("span {i}: too short for its bit offset")));
                }
            }
        }
        if !separate {
            decompress_window(window, window_len as u32)
                .map_err(|e| invalid(format!("span {i}: {e}")))?;
        }
        spans.push(Span {
            uncompressed_offset: uoff,
            uncompressed_size: ulen,
            compressed_offset,
            compressed_end,
            bits,
            window_len: window_len as u32,
            window: Bytes::copy_from_slice(window),
            window_at,
            digest,
        });
        uoff = uoff
            .checked_add(ulen)
            .filter(|&u| u <= uncompressed_size)
            .ok_or_else(|| invalid(format!("span {i}: spans exceed the uncompressed size")))?;
        prev_off = compressed_offset;
    }
    if uoff != uncompressed_size {
        return Err(invalid(format!(
            "spans cover {uoff} bytes, the layer has {uncompressed_size}"
        )));
    }
    let windows = if separate {
        let size = c.varint("windows blob size")?;
        let digest = c.digest("windows blob digest")?;
        if size != window_off {
            return Err(invalid(format!(
                "windows blob of {size} bytes, the spans' windows take {window_off}"
            )));
        }
        Some(WindowsBlob { digest, size })
    } else {
        None
    };
    if c.remaining() != 0 {
        return Err(invalid(format!(
            "{} unexpected trailing bytes",
            c.remaining()
        )));
    }
    let mut ix = LayerIndex::new(
        compression,
        compressed_size,
        uncompressed_size,
        span_size,
        compressed_digest,
        diff_id,
        entries,
        spans,
    );
    if windows.is_some() {
        ix.version = INDEX_VERSION;
        ix.windows = windows;
    }
    Ok(ix)
}

/// Whether `normalize_path(path)` would give `path` back, without building it: no empty,
/// `.` or `..` component (the empty path is the archive root).
fn is_normalized(path: &str) -> bool {
    path.is_empty() || path.split('/').all(|c| !matches!(c, "" | "." | ".."))
}

fn decode_entries(
    toc: &[u8],
    count: u64,
    uncompressed_size: u64,
) -> Result<Vec<Entry>, DecodeError> {
    let mut c = Cur { buf: toc, pos: 0 };
    // Reserved as they come past a first batch: the count is the index's claim.
    let mut entries: Vec<Entry> = Vec::with_capacity(count.min(1 << 16) as usize);
    let mut total_path_bytes = 0u64;
    let mut prev_end = 0u64;
    for i in 0..count {
        let shared = c.varint("path prefix")?;
        let suffix = c.bytes("path")?;
        let prev_path = entries.last().map(|e| e.path.as_bytes()).unwrap_or(b"");
        if shared > prev_path.len() as u64 {
            return Err(invalid(format!("entry {i}: shared path prefix too long")));
        }
        let mut path_bytes = Vec::with_capacity(shared as usize + suffix.len());
        path_bytes.extend_from_slice(&prev_path[..shared as usize]);
        path_bytes.extend_from_slice(suffix);
        let path = String::from_utf8(path_bytes)
            .map_err(|_| invalid(format!("entry {i}: path is not UTF-8")))?;
        if !is_normalized(&path) {
            return Err(invalid(format!(
                "entry {i}: path {path:?} is not normalized"
            )));
        }
        let kind =
            kind_from(c.u8("kind")?).ok_or_else(|| invalid(format!("entry {i}: unknown kind")))?;
        let mode = c.varint("mode")?;
        let mode = u32::try_from(mode)
            .ok()
            .filter(|m| m & !0o7777 == 0)
            .ok_or_else(|| invalid(format!("entry {i}: mode {mode:o}")))?;
        let uid = c.varint("uid")?;
        let gid = c.varint("gid")?;
        let uname = c.opt_string("uname")?;
        let gname = c.opt_string("gname")?;
        let size = c.varint("size")?;
        let mtime = unzigzag(c.varint("mtime")?);
        let link_target = c.opt_string("link target")?;
        let xattr_count = c.varint("xattr count")?;
        if xattr_count.saturating_mul(2) > c.remaining() {
            return Err(invalid(format!("entry {i}: absurd xattr count")));
        }
        let mut xattrs = Vec::with_capacity(xattr_count as usize);
        for _ in 0..xattr_count {
            let k = c.string("xattr name")?;
            let v = c.bytes("xattr value")?.to_vec();
            xattrs.push((k, v));
        }
        let dev_major = u32::try_from(c.varint("device major")?)
            .map_err(|_| invalid(format!("entry {i}: device major too large")))?;
        let dev_minor = u32::try_from(c.varint("device minor")?)
            .map_err(|_| invalid(format!("entry {i}: device minor too large")))?;
        let delta = unzigzag(c.varint("offset")?);
        let offset = u64::try_from(delta)
            .ok()
            .and_then(|d| prev_end.checked_add(d))
            .ok_or_else(|| invalid(format!("entry {i}: offset goes backwards")))?;
        let end = offset
            .checked_add(size)
            .filter(|&e| e <= uncompressed_size)
            .ok_or_else(|| invalid(format!("entry {i}: content past the end of the layer")))?;
        if matches!(kind, EntryKind::Symlink | EntryKind::Hardlink) != link_target.is_some() {
            return Err(invalid(format!(
                "entry {i}: link target does not match its kind"
            )));
        }
        total_path_bytes = total_path_bytes
            .saturating_add(path.len() as u64)
            .saturating_add(link_target.as_ref().map_or(0, |t| t.len() as u64));
        if total_path_bytes > MAX_PATH_BYTES {
            // Paths share prefixes on the wire, so a small table of contents can still
            // decode to a great many path bytes.
            return Err(invalid(format!(
                "entry {i}: more than {MAX_PATH_BYTES} bytes of paths"
            )));
        }
        prev_end = end;
        entries.push(Entry {
            path,
            kind,
            mode,
            uid,
            gid,
            uname,
            gname,
            size,
            mtime,
            link_target,
            xattrs,
            dev_major,
            dev_minor,
            offset,
        });
    }
    if c.remaining() != 0 {
        return Err(invalid("table of contents has trailing bytes"));
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::super::tar::normalize_path;
    use super::*;

    #[test]
    fn is_normalized_agrees_with_normalize_path() {
        for p in [
            "",
            "a",
            "a/b",
            "etc/passwd",
            "/a",
            "a/",
            "a//b",
            "./a",
            "a/.",
            "a/./b",
            "..",
            "a/..",
            "../a",
            ".",
            "/",
            "//",
            "a/.b",
            "a/b..",
            "...",
            ".a/b",
        ] {
            let same = normalize_path(p).is_ok_and(|n| n == p);
            assert_eq!(is_normalized(p), same, "{p:?}");
        }
    }

    #[test]
    fn varints_round_trip() {
        for v in [0u64, 1, 127, 128, 300, u64::MAX, u64::MAX - 1, 1 << 63] {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            let mut c = Cur { buf: &b, pos: 0 };
            assert_eq!(c.varint("x").unwrap(), v);
            assert_eq!(c.remaining(), 0);
        }
        for v in [0i64, -1, 1, i64::MIN, i64::MAX] {
            assert_eq!(unzigzag(zigzag(v)), v);
        }
        let mut c = Cur {
            buf: &[0xff; 11],
            pos: 0,
        };
        assert!(c.varint("x").is_err());
    }

    #[test]
    fn prefix_respects_char_boundaries() {
        assert_eq!(common_prefix("a/é", "a/è"), 2);
        assert_eq!(common_prefix("abc", "abd"), 2);
    }
}
