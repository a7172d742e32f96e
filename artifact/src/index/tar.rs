//! A streaming tar parser that builds the table of contents from data fed in arbitrary chunks,
//! without holding more than one header (plus bounded PAX/GNU extension data) in memory.
//!
//! Supports ustar, GNU (long names/links, base-256 numbers) and PAX (path, linkpath, size,
//! uid, gid, uname, gname, mtime, `SCHILY.xattr.*`, global headers). Hostile input fails
//! with an error: bad checksums, `..` components, paths under a symlink of the same layer,
//! sizes past the end of the stream.

use std::collections::HashSet;

use super::{Entry, EntryKind};

const BLOCK: u64 = 512;
/// Largest PAX / GNU long-name payload accepted (they are held in memory).
const MAX_EXTENSION: u64 = 1024 * 1024;

/// A tar-level error, with the offset in the uncompressed stream where it was found.
#[derive(Debug, Clone, thiserror::Error)]
#[error("tar error at uncompressed offset {offset}: {message}")]
pub struct TarError {
    pub offset: u64,
    pub message: String,
}

/// Normalizes an archive path: drops leading "/" and "./", empty and "." components and any
/// trailing "/"; rejects ".." components (they could escape the root).
pub fn normalize_path(raw: &str) -> Result<String, String> {
    let mut out = String::with_capacity(raw.len());
    for comp in raw.split('/') {
        match comp {
            "" | "." => {}
            ".." => return Err(format!("path {raw:?} has a \"..\" component")),
            c => {
                if !out.is_empty() {
                    out.push('/');
                }
                out.push_str(c);
            }
        }
    }
    Ok(out)
}

#[derive(Debug)]
enum State {
    /// Collecting a 512-byte header.
    Header,
    /// Skipping entry content and padding.
    Skip(u64),
    /// Collecting the payload of a PAX or GNU extension header, then skipping `pad`.
    Ext { kind: u8, remaining: u64, pad: u64 },
    /// Past the end-of-archive marker; the rest is ignored.
    End,
}

#[derive(Default, Debug)]
struct Pending {
    path: Option<Vec<u8>>,
    linkpath: Option<Vec<u8>>,
    size: Option<u64>,
    uid: Option<u64>,
    gid: Option<u64>,
    uname: Option<Vec<u8>>,
    gname: Option<Vec<u8>>,
    mtime: Option<i64>,
    xattrs: Vec<(String, Vec<u8>)>,
}

/// The streaming parser.
#[derive(Debug)]
pub struct TarParser {
    state: State,
    pos: u64,
    header: Box<[u8; 512]>,
    header_len: usize,
    ext: Vec<u8>,
    zero_blocks: u32,
    local: Pending,
    global: Pending,
    gnu_name: Option<Vec<u8>>,
    gnu_link: Option<Vec<u8>>,
    symlinks: HashSet<String>,
    pub entries: Vec<Entry>,
    /// Bytes of paths and link targets in `entries`.
    path_bytes: u64,
}

impl Default for TarParser {
    fn default() -> Self {
        Self::new()
    }
}

impl TarParser {
    pub fn new() -> Self {
        Self {
            state: State::Header,
            pos: 0,
            header: Box::new([0; 512]),
            header_len: 0,
            ext: Vec::new(),
            zero_blocks: 0,
            local: Pending::default(),
            global: Pending::default(),
            gnu_name: None,
            gnu_link: None,
            symlinks: HashSet::new(),
            entries: Vec::new(),
            path_bytes: 0,
        }
    }

    fn err(&self, message: impl Into<String>) -> TarError {
        TarError {
            offset: self.pos,
            message: message.into(),
        }
    }

    /// Feeds the next bytes of the uncompressed stream.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<(), TarError> {
        while !data.is_empty() {
            match self.state {
                State::End => return Ok(()),
                State::Skip(n) => {
                    let take = n.min(data.len() as u64);
                    data = &data[take as usize..];
                    self.pos += take;
                    self.state = if take == n {
                        State::Header
                    } else {
                        State::Skip(n - take)
                    };
                }
                State::Ext {
                    kind,
                    remaining,
                    pad,
                } => {
                    let take = remaining.min(data.len() as u64) as usize;
                    self.ext.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    self.pos += take as u64;
                    let remaining = remaining - take as u64;
                    if remaining == 0 {
                        let payload = std::mem::take(&mut self.ext);
                        self.apply_extension(kind, &payload)?;
                        self.state = if pad == 0 {
                            State::Header
                        } else {
                            State::Skip(pad)
                        };
                    } else {
                        self.state = State::Ext {
                            kind,
                            remaining,
                            pad,
                        };
                    }
                }
                State::Header => {
                    let take = (512 - self.header_len).min(data.len());
                    self.header[self.header_len..self.header_len + take]
                        .copy_from_slice(&data[..take]);
                    self.header_len += take;
                    data = &data[take..];
                    if self.header_len == 512 {
                        self.header_len = 0;
                        self.header_block()?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Declares the end of the stream; fails if it ends inside an entry.
    pub fn finish(self) -> Result<Vec<Entry>, TarError> {
        match self.state {
            State::End => Ok(self.entries),
            State::Header if self.header_len == 0 => {
                if self.local.path.is_some() || self.gnu_name.is_some() || self.gnu_link.is_some() {
                    Err(self.err("stream ends after an extension header without its entry"))
                } else {
                    Ok(self.entries)
                }
            }
            State::Header => Err(self.err(format!(
                "stream ends inside a tar header ({} of 512 bytes)",
                self.header_len
            ))),
            State::Skip(n) | State::Ext { remaining: n, .. } => Err(self.err(format!(
                "entry size goes {n} bytes past the end of the stream"
            ))),
        }
    }

    fn header_block(&mut self) -> Result<(), TarError> {
        let block_start = self.pos;
        self.pos += BLOCK;
        let h = *self.header;
        if h.iter().all(|&b| b == 0) {
            self.zero_blocks += 1;
            if self.zero_blocks >= 2 {
                self.state = State::End;
            }
            return Ok(());
        }
        let fail = |m: String| TarError {
            offset: block_start,
            message: m,
        };
        if self.zero_blocks > 0 {
            return Err(fail("header after a zero block (corrupt archive)".into()));
        }
        // Checksum: sum of the header with the checksum field read as spaces.
        let stored = parse_numeric(&h[148..156]).map_err(|e| fail(format!("checksum: {e}")))?;
        let unsigned: u64 = h
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    u64::from(b)
                }
            })
            .sum();
        let signed: i64 = h
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    i64::from(b as i8)
                }
            })
            .sum();
        if stored != unsigned && i64::try_from(stored).ok() != Some(signed) {
            return Err(fail(format!(
                "bad header checksum (stored {stored}, computed {unsigned}): not a tar stream or corrupt"
            )));
        }
        let typeflag = h[156];
        let size = parse_numeric(&h[124..136]).map_err(|e| fail(format!("size: {e}")))?;
        let padded = size
            .checked_add(BLOCK - 1)
            .map(|s| s / BLOCK * BLOCK)
            .ok_or_else(|| fail(format!("absurd size {size}")))?;
        match typeflag {
            b'x' | b'g' | b'L' | b'K' => {
                if size > MAX_EXTENSION {
                    return Err(fail(format!(
                        "extension header of {size} bytes exceeds the {MAX_EXTENSION}-byte limit"
                    )));
                }
                self.ext.clear();
                self.state = if size == 0 {
                    self.apply_extension(typeflag, &[])?;
                    State::Header
                } else {
                    State::Ext {
                        kind: typeflag,
                        remaining: size,
                        pad: padded - size,
                    }
                };
                return Ok(());
            }
            _ => {}
        }
        let entry = self.build_entry(&h, typeflag, size, block_start)?;
        let content = entry.size;
        let content_padded = content
            .checked_add(BLOCK - 1)
            .map(|s| s / BLOCK * BLOCK)
            .ok_or_else(|| fail(format!("absurd size {content}")))?;
        self.push_entry(entry).map_err(fail)?;
        self.state = if content_padded == 0 {
            State::Header
        } else {
            State::Skip(content_padded)
        };
        Ok(())
    }

    fn apply_extension(&mut self, kind: u8, payload: &[u8]) -> Result<(), TarError> {
        match kind {
            b'L' => self.gnu_name = Some(cstr(payload).to_vec()),
            b'K' => self.gnu_link = Some(cstr(payload).to_vec()),
            b'x' => {
                let mut p = std::mem::take(&mut self.local);
                let r = parse_pax(payload, &mut p);
                self.local = p;
                r.map_err(|m| self.err(format!("PAX header: {m}")))?;
            }
            _ => {
                let mut p = std::mem::take(&mut self.global);
                let r = parse_pax(payload, &mut p);
                self.global = p;
                r.map_err(|m| self.err(format!("PAX global header: {m}")))?;
            }
        }
        Ok(())
    }

    fn build_entry(
        &mut self,
        h: &[u8; 512],
        typeflag: u8,
        header_size: u64,
        block_start: u64,
    ) -> Result<Entry, TarError> {
        let fail = |m: String| TarError {
            offset: block_start,
            message: m,
        };
        let local = std::mem::take(&mut self.local);
        let gnu_name = self.gnu_name.take();
        let gnu_link = self.gnu_link.take();
        let magic = &h[257..263];
        let posix = magic == b"ustar\0";
        let gnu = magic == b"ustar ";
        let mut raw_name = cstr(&h[0..100]).to_vec();
        if posix {
            let prefix = cstr(&h[345..500]);
            if !prefix.is_empty() {
                let mut p = prefix.to_vec();
                p.push(b'/');
                p.extend_from_slice(&raw_name);
                raw_name = p;
            }
        }
        let name = local
            .path
            .clone()
            .or_else(|| gnu_name.clone())
            .or_else(|| self.global.path.clone())
            .unwrap_or(raw_name);
        let link = local
            .linkpath
            .clone()
            .or(gnu_link)
            .or_else(|| self.global.linkpath.clone())
            .unwrap_or_else(|| cstr(&h[157..257]).to_vec());
        let name = String::from_utf8(name).map_err(|e| {
            fail(format!(
                "non-UTF-8 path {:?}",
                String::from_utf8_lossy(e.as_bytes())
            ))
        })?;
        let num = |range: std::ops::Range<usize>, what: &str| {
            parse_numeric(&h[range]).map_err(|e| fail(format!("{what} of {name:?}: {e}")))
        };
        let mode = (num(100..108, "mode")? & 0o7777) as u32;
        let uid = match local.uid.or(self.global.uid) {
            Some(v) => v,
            None => num(108..116, "uid")?,
        };
        let gid = match local.gid.or(self.global.gid) {
            Some(v) => v,
            None => num(116..124, "gid")?,
        };
        let size = local.size.or(self.global.size).unwrap_or(header_size);
        let mtime = match local.mtime.or(self.global.mtime) {
            Some(v) => v,
            None => {
                parse_signed(&h[136..148]).map_err(|e| fail(format!("mtime of {name:?}: {e}")))?
            }
        };
        let text = |v: Option<Vec<u8>>| -> Option<String> {
            v.filter(|b| !b.is_empty())
                .map(|b| String::from_utf8_lossy(&b).into_owned())
        };
        let (uname, gname) = if posix || gnu {
            (
                text(
                    local
                        .uname
                        .clone()
                        .or_else(|| self.global.uname.clone())
                        .or_else(|| Some(cstr(&h[265..297]).to_vec())),
                ),
                text(
                    local
                        .gname
                        .clone()
                        .or_else(|| self.global.gname.clone())
                        .or_else(|| Some(cstr(&h[297..329]).to_vec())),
                ),
            )
        } else {
            (
                text(local.uname.clone().or_else(|| self.global.uname.clone())),
                text(local.gname.clone().or_else(|| self.global.gname.clone())),
            )
        };
        let (dev_major, dev_minor) = if matches!(typeflag, b'3' | b'4') {
            let major = num(329..337, "device major")?;
            let minor = num(337..345, "device minor")?;
            (
                u32::try_from(major)
                    .map_err(|_| fail(format!("device major {major} too large")))?,
                u32::try_from(minor)
                    .map_err(|_| fail(format!("device minor {minor} too large")))?,
            )
        } else {
            (0, 0)
        };
        let mut kind = match typeflag {
            b'0' | b'\0' | b'7' => EntryKind::File,
            b'1' => EntryKind::Hardlink,
            b'2' => EntryKind::Symlink,
            b'3' => EntryKind::Char,
            b'4' => EntryKind::Block,
            b'5' => EntryKind::Dir,
            b'6' => EntryKind::Fifo,
            b'S' => return Err(fail(format!("GNU sparse entry {name:?} is not supported"))),
            other => {
                return Err(fail(format!(
                    "unsupported tar entry type {:?} for {name:?}",
                    other as char
                )));
            }
        };
        // Old-style directories are regular entries whose name ends with "/".
        if kind == EntryKind::File && name.ends_with('/') {
            kind = EntryKind::Dir;
        }
        let mut path = normalize_path(&name).map_err(fail)?;
        let link_target = match kind {
            EntryKind::Symlink => Some(
                String::from_utf8(link)
                    .map_err(|_| fail(format!("non-UTF-8 symlink target for {path:?}")))?,
            ),
            EntryKind::Hardlink => {
                let t = String::from_utf8(link)
                    .map_err(|_| fail(format!("non-UTF-8 hardlink target for {path:?}")))?;
                let t = normalize_path(&t).map_err(|m| fail(format!("hardlink {path:?}: {m}")))?;
                if t.is_empty() {
                    return Err(fail(format!("hardlink {path:?} has an empty target")));
                }
                Some(t)
            }
            _ => None,
        };
        // Overlay whiteouts.
        let (dir, base) = match path.rfind('/') {
            Some(i) => (&path[..i], &path[i + 1..]),
            None => ("", path.as_str()),
        };
        if base == ".wh..wh..opq" {
            path = dir.to_string();
            kind = EntryKind::OpaqueDir;
        } else if let Some(rest) = base.strip_prefix(".wh.")
            && !rest.starts_with(".wh.")
        {
            if rest.is_empty() {
                return Err(fail(format!("whiteout {path:?} names nothing")));
            }
            path = if dir.is_empty() {
                rest.to_string()
            } else {
                format!("{dir}/{rest}")
            };
            kind = EntryKind::Whiteout;
        }
        let link_target = if matches!(kind, EntryKind::Symlink | EntryKind::Hardlink) {
            link_target
        } else {
            None
        };
        Ok(Entry {
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
            xattrs: local.xattrs,
            dev_major,
            dev_minor,
            offset: self.pos,
        })
    }

    fn push_entry(&mut self, entry: Entry) -> Result<(), String> {
        // Bounded like the decoder: an index this parser makes must decode on every node.
        if self.entries.len() as u64 >= super::MAX_ENTRIES {
            return Err(format!(
                "more than {} entries in one layer",
                super::MAX_ENTRIES
            ));
        }
        self.path_bytes +=
            (entry.path.len() + entry.link_target.as_ref().map_or(0, String::len)) as u64;
        if self.path_bytes > super::MAX_PATH_BYTES {
            return Err(format!(
                "more than {} bytes of paths in one layer",
                super::MAX_PATH_BYTES
            ));
        }
        // An entry below a symlink of this layer would be extracted through it, possibly
        // outside the root.
        let p = entry.path.as_str();
        for (i, _) in p.match_indices('/') {
            if self.symlinks.contains(&p[..i]) {
                return Err(format!(
                    "entry {p:?} lies under the symlink {:?} (would escape the root)",
                    &p[..i]
                ));
            }
        }
        if entry.kind == EntryKind::Symlink {
            self.symlinks.insert(entry.path.clone());
        } else if !self.symlinks.is_empty() {
            self.symlinks.remove(&entry.path);
        }
        self.entries.push(entry);
        Ok(())
    }
}

/// The bytes before the first NUL.
fn cstr(b: &[u8]) -> &[u8] {
    match b.iter().position(|&c| c == 0) {
        Some(i) => &b[..i],
        None => b,
    }
}

/// Parses an octal field (spaces/NULs around it) or a GNU base-256 field (positive only).
fn parse_numeric(field: &[u8]) -> Result<u64, String> {
    let v = parse_signed(field)?;
    u64::try_from(v).map_err(|_| format!("negative value {v}"))
}

fn parse_signed(field: &[u8]) -> Result<i64, String> {
    let first = field.first().copied().unwrap_or(0);
    if first & 0x80 != 0 {
        // Base-256, two's complement, big-endian; 0xff first byte means negative.
        let negative = first & 0x40 != 0;
        let mut v: i128 = i128::from(if negative { first | 0x80 } else { first & 0x7f });
        if negative {
            v -= 256;
        }
        for &b in &field[1..] {
            v = v
                .checked_mul(256)
                .and_then(|x| x.checked_add(i128::from(b)))
                .ok_or("base-256 number overflows")?;
            if v.abs() > i128::from(i64::MAX) {
                return Err("base-256 number overflows".into());
            }
        }
        return i64::try_from(v).map_err(|_| "base-256 number overflows".to_string());
    }
    let s = cstr(field);
    let s = trim(s);
    if s.is_empty() {
        return Ok(0);
    }
    let mut v: i64 = 0;
    for &c in s {
        if !(b'0'..=b'7').contains(&c) {
            return Err(format!(
                "invalid octal number {:?}",
                String::from_utf8_lossy(field)
            ));
        }
        v = v
            .checked_mul(8)
            .and_then(|x| x.checked_add(i64::from(c - b'0')))
            .ok_or("octal number overflows")?;
    }
    Ok(v)
}

fn trim(mut s: &[u8]) -> &[u8] {
    while let [b' ' | 0, rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | 0] = s {
        s = rest;
    }
    s
}

/// Parses PAX records "<len> <key>=<value>\n" into `p`.
fn parse_pax(mut data: &[u8], p: &mut Pending) -> Result<(), String> {
    while !data.is_empty() {
        // Some writers pad the payload with NULs.
        if data.iter().all(|&b| b == 0) {
            break;
        }
        let sp = data
            .iter()
            .position(|&b| b == b' ')
            .ok_or("record without a length")?;
        let len: usize = std::str::from_utf8(&data[..sp])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or("invalid record length")?;
        if len <= sp + 1 || len > data.len() || data[len - 1] != b'\n' {
            return Err(format!("record length {len} is inconsistent"));
        }
        let rec = &data[sp + 1..len - 1];
        data = &data[len..];
        let eq = rec
            .iter()
            .position(|&b| b == b'=')
            .ok_or("record without '='")?;
        let key = std::str::from_utf8(&rec[..eq]).map_err(|_| "non-UTF-8 key")?;
        let value = &rec[eq + 1..];
        let number = |v: &[u8]| -> Result<u64, String> {
            std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| format!("invalid number for {key}"))
        };
        match key {
            "path" => p.path = Some(value.to_vec()),
            "linkpath" => p.linkpath = Some(value.to_vec()),
            "size" => p.size = Some(number(value)?),
            "uid" => p.uid = Some(number(value)?),
            "gid" => p.gid = Some(number(value)?),
            "uname" => p.uname = Some(value.to_vec()),
            "gname" => p.gname = Some(value.to_vec()),
            "mtime" => {
                let s = std::str::from_utf8(value).map_err(|_| "invalid mtime")?;
                let whole = s.split('.').next().unwrap_or("");
                let v: i64 = whole.parse().map_err(|_| format!("invalid mtime {s:?}"))?;
                p.mtime = Some(v);
            }
            k => {
                if let Some(name) = k.strip_prefix("SCHILY.xattr.") {
                    p.xattrs.push((name.to_string(), value.to_vec()));
                } else if k.starts_with("GNU.sparse.") {
                    return Err("GNU sparse files are not supported".into());
                }
                // Other keys (atime, ctime, charset, comments, ...) do not affect the index.
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_paths() {
        assert_eq!(normalize_path("./a//b/./c/").unwrap(), "a/b/c");
        assert_eq!(normalize_path("/etc/passwd").unwrap(), "etc/passwd");
        assert_eq!(normalize_path("./").unwrap(), "");
        assert!(normalize_path("a/../../b").is_err());
        assert!(normalize_path("..").is_err());
    }

    #[test]
    fn parses_numbers() {
        assert_eq!(parse_numeric(b"0000644\0").unwrap(), 0o644);
        assert_eq!(parse_numeric(b"   12 \0").unwrap(), 0o12);
        assert_eq!(parse_numeric(&[0x80, 0, 0, 0, 0, 0, 1, 0]).unwrap(), 256);
        assert_eq!(parse_signed(&[0xff; 8]).unwrap(), -1);
        assert!(parse_numeric(b"12x4").is_err());
        assert!(
            parse_numeric(&[0x80, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]).is_err()
        );
    }

    #[test]
    fn parses_pax() {
        let mut p = Pending::default();
        parse_pax(b"16 path=a/b/c.d\n25 SCHILY.xattr.user.x=1\n", &mut p).unwrap();
        assert_eq!(p.path.as_deref(), Some(&b"a/b/c.d"[..]));
        assert_eq!(p.xattrs, vec![("user.x".to_string(), b"1".to_vec())]);
        assert!(parse_pax(b"99 path=x\n", &mut Pending::default()).is_err());
        assert!(parse_pax(b"5 a=b\n", &mut Pending::default()).is_err());
    }
}
