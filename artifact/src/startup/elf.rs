//! Just enough ELF to follow a dynamic executable's loading: the file header, program
//! headers (PT_INTERP, PT_DYNAMIC, PT_LOAD) and the dynamic section's DT_NEEDED, DT_RPATH,
//! DT_RUNPATH. Each step names the bytes it needs next so the caller reads only those,
//! lazily; every size and count from the file is checked against a small bound first.

/// Bytes of the ELF file header to read (the 64-bit header; a 32-bit one is shorter).
pub const HEADER_LEN: u64 = 64;
/// Program headers accepted.
const MAX_PHNUM: u64 = 512;
/// PT_LOAD segments kept.
const MAX_LOADS: usize = 64;
/// Largest dynamic section read.
pub const MAX_DYNAMIC: u64 = 64 * 1024;
/// Largest dynamic string table read.
pub const MAX_STRTAB: u64 = 1024 * 1024;
/// Longest single string (library name, search path) read from a larger table.
pub const MAX_DYN_STRING: u64 = 4096;
/// Longest interpreter path.
const MAX_INTERP: u64 = 4096;

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const PT_GNU_EH_FRAME: u32 = 0x6474_e550;
/// Segment flags.
pub const PF_X: u32 = 1;
pub const PF_W: u32 = 2;
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;
const DT_PLTRELSZ: u64 = 2;
const DT_HASH: u64 = 4;
const DT_STRTAB: u64 = 5;
const DT_SYMTAB: u64 = 6;
const DT_RELA: u64 = 7;
const DT_RELASZ: u64 = 8;
const DT_STRSZ: u64 = 10;
pub const DT_INIT: u64 = 12;
const DT_RPATH: u64 = 15;
const DT_REL: u64 = 17;
const DT_RELSZ: u64 = 18;
const DT_JMPREL: u64 = 23;
const DT_INIT_ARRAY: u64 = 25;
const DT_INIT_ARRAYSZ: u64 = 27;
const DT_RUNPATH: u64 = 29;
const DT_PREINIT_ARRAY: u64 = 32;
const DT_PREINIT_ARRAYSZ: u64 = 33;
const DT_RELRSZ: u64 = 35;
const DT_RELR: u64 = 36;
const DT_GNU_HASH: u64 = 0x6fff_fef5;
const DT_VERSYM: u64 = 0x6fff_fff0;
const DT_VERDEF: u64 = 0x6fff_fffc;
const DT_VERNEED: u64 = 0x6fff_fffe;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ElfError {
    #[error("not an ELF file")]
    NotElf,
    #[error("unsupported ELF: {0}")]
    Unsupported(String),
    #[error("malformed ELF: {0}")]
    Malformed(String),
}

/// The ELF file header fields the loader cares about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub is64: bool,
    pub little: bool,
    pub machine: u16,
    pub phoff: u64,
    pub phentsize: u64,
    pub phnum: u64,
    /// `e_entry`: where an executable starts (0 for most shared objects).
    pub entry: u64,
}

impl Header {
    /// Class and machine: a library must match its executable's.
    pub fn abi(&self) -> (bool, u16) {
        (self.is64, self.machine)
    }

    /// Byte range of the program header table.
    pub fn phdr_range(&self) -> (u64, u64) {
        (self.phoff, self.phentsize.saturating_mul(self.phnum))
    }
}

/// Whether `bytes` start like an ELF file.
pub fn is_elf(bytes: &[u8]) -> bool {
    bytes.starts_with(b"\x7fELF")
}

struct Rd<'a> {
    b: &'a [u8],
    little: bool,
}

impl Rd<'_> {
    fn u16(&self, at: usize) -> Option<u16> {
        let s: [u8; 2] = self.b.get(at..at.checked_add(2)?)?.try_into().ok()?;
        Some(if self.little {
            u16::from_le_bytes(s)
        } else {
            u16::from_be_bytes(s)
        })
    }
    fn u32(&self, at: usize) -> Option<u32> {
        let s: [u8; 4] = self.b.get(at..at.checked_add(4)?)?.try_into().ok()?;
        Some(if self.little {
            u32::from_le_bytes(s)
        } else {
            u32::from_be_bytes(s)
        })
    }
    fn u64(&self, at: usize) -> Option<u64> {
        let s: [u8; 8] = self.b.get(at..at.checked_add(8)?)?.try_into().ok()?;
        Some(if self.little {
            u64::from_le_bytes(s)
        } else {
            u64::from_be_bytes(s)
        })
    }
    /// A word: 8 bytes in ELF64, 4 in ELF32.
    fn word(&self, at: usize, is64: bool) -> Option<u64> {
        if is64 {
            self.u64(at)
        } else {
            self.u32(at).map(u64::from)
        }
    }
}

fn malformed(m: &str) -> ElfError {
    ElfError::Malformed(m.to_string())
}

/// Parses the file header (the first [`HEADER_LEN`] bytes, or fewer for a short file).
pub fn parse_header(b: &[u8]) -> Result<Header, ElfError> {
    if !is_elf(b) {
        return Err(ElfError::NotElf);
    }
    let is64 = match b.get(4) {
        Some(1) => false,
        Some(2) => true,
        other => return Err(ElfError::Unsupported(format!("class {other:?}"))),
    };
    let little = match b.get(5) {
        Some(1) => true,
        Some(2) => false,
        other => return Err(ElfError::Unsupported(format!("data encoding {other:?}"))),
    };
    let r = Rd { b, little };
    let short = || malformed("file header is truncated");
    let machine = r.u16(18).ok_or_else(short)?;
    let (entry, phoff, phentsize, phnum) = if is64 {
        (
            r.u64(24).ok_or_else(short)?,
            r.u64(32).ok_or_else(short)?,
            u64::from(r.u16(54).ok_or_else(short)?),
            u64::from(r.u16(56).ok_or_else(short)?),
        )
    } else {
        (
            u64::from(r.u32(24).ok_or_else(short)?),
            u64::from(r.u32(28).ok_or_else(short)?),
            u64::from(r.u16(42).ok_or_else(short)?),
            u64::from(r.u16(44).ok_or_else(short)?),
        )
    };
    let min_ent = if is64 { 56 } else { 32 };
    if phnum > MAX_PHNUM {
        return Err(malformed(&format!("{phnum} program headers")));
    }
    if phnum > 0 && (phentsize < min_ent || phentsize > 256) {
        return Err(malformed(&format!("program header size {phentsize}")));
    }
    Ok(Header {
        is64,
        little,
        machine,
        phoff,
        phentsize,
        phnum,
        entry,
    })
}

/// A segment of the file mapped at a virtual address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Load {
    pub vaddr: u64,
    pub offset: u64,
    pub filesz: u64,
    /// `p_flags` ([`PF_X`], [`PF_W`], ...).
    pub flags: u32,
}

/// What the program headers say.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Segments {
    /// File range of the interpreter path.
    pub interp: Option<(u64, u64)>,
    /// File range of the dynamic section.
    pub dynamic: Option<(u64, u64)>,
    /// File offset of `.eh_frame_hdr` (`PT_GNU_EH_FRAME`): the unwind tables start there.
    pub eh_frame_hdr: Option<u64>,
    pub loads: Vec<Load>,
}

impl Segments {
    /// File offset of a virtual address, through the PT_LOAD segments.
    pub fn file_offset(&self, vaddr: u64) -> Option<u64> {
        self.loads.iter().find_map(|l| {
            let rel = vaddr.checked_sub(l.vaddr)?;
            (rel < l.filesz)
                .then(|| l.offset.checked_add(rel))
                .flatten()
        })
    }
}

/// Parses the program header table (bytes of [`Header::phdr_range`]).
pub fn parse_phdrs(h: &Header, b: &[u8]) -> Result<Segments, ElfError> {
    let r = Rd {
        b,
        little: h.little,
    };
    let mut s = Segments::default();
    let short = || malformed("program headers are truncated");
    for i in 0..h.phnum {
        let base = usize::try_from(i * h.phentsize).map_err(|_| short())?;
        let p_type = r.u32(base).ok_or_else(short)?;
        let (offset, vaddr, filesz, flags) = if h.is64 {
            (
                r.u64(base + 8).ok_or_else(short)?,
                r.u64(base + 16).ok_or_else(short)?,
                r.u64(base + 32).ok_or_else(short)?,
                r.u32(base + 4).ok_or_else(short)?,
            )
        } else {
            (
                u64::from(r.u32(base + 4).ok_or_else(short)?),
                u64::from(r.u32(base + 8).ok_or_else(short)?),
                u64::from(r.u32(base + 16).ok_or_else(short)?),
                r.u32(base + 24).ok_or_else(short)?,
            )
        };
        match p_type {
            PT_GNU_EH_FRAME => s.eh_frame_hdr = Some(offset),
            PT_INTERP => {
                if filesz == 0 || filesz > MAX_INTERP {
                    return Err(malformed(&format!("PT_INTERP of {filesz} bytes")));
                }
                s.interp = Some((offset, filesz));
            }
            PT_DYNAMIC => s.dynamic = Some((offset, filesz.min(MAX_DYNAMIC))),
            PT_LOAD if s.loads.len() < MAX_LOADS => s.loads.push(Load {
                vaddr,
                offset,
                filesz,
                flags,
            }),
            _ => {}
        }
    }
    Ok(s)
}

/// The interpreter path from the PT_INTERP bytes (NUL-terminated).
pub fn parse_interp(b: &[u8]) -> Result<String, ElfError> {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    let s = std::str::from_utf8(b.get(..end).unwrap_or_default())
        .map_err(|_| malformed("PT_INTERP is not UTF-8"))?;
    if s.is_empty() {
        return Err(malformed("empty PT_INTERP"));
    }
    Ok(s.to_string())
}

/// The dynamic section's string references, before the string table is read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dynamic {
    pub strtab_vaddr: Option<u64>,
    pub strsz: u64,
    pub needed: Vec<u64>,
    pub rpath: Option<u64>,
    pub runpath: Option<u64>,
    /// The tables the loader reads, as `(tag, value)` pairs of the dynamic section (hash
    /// tables, symbols, versions, relocations, init functions and their sizes); see
    /// [`loader_ranges`].
    pub loader: Vec<(u64, u64)>,
}

impl Dynamic {
    /// The value of a tag the loader uses (the first one).
    pub fn tag(&self, tag: u64) -> Option<u64> {
        self.loader.iter().find(|(t, _)| *t == tag).map(|(_, v)| *v)
    }

    /// File range of the init function pointers (`DT_INIT_ARRAY`, `DT_PREINIT_ARRAY`),
    /// each at most `max` bytes.
    pub fn init_arrays(&self, seg: &Segments, max: u64) -> Vec<(u64, u64)> {
        [
            (DT_PREINIT_ARRAY, DT_PREINIT_ARRAYSZ),
            (DT_INIT_ARRAY, DT_INIT_ARRAYSZ),
        ]
        .iter()
        .filter_map(|&(a, sz)| {
            let off = seg.file_offset(self.tag(a)?)?;
            let len = self.tag(sz)?.min(max);
            (len > 0).then_some((off, len))
        })
        .collect()
    }
}

/// Parses dynamic entries (bytes of the PT_DYNAMIC range).
pub fn parse_dynamic(h: &Header, b: &[u8]) -> Dynamic {
    let r = Rd {
        b,
        little: h.little,
    };
    let ent = if h.is64 { 16 } else { 8 };
    let half = ent / 2;
    let mut d = Dynamic::default();
    let mut at = 0usize;
    while let (Some(tag), Some(val)) = (r.word(at, h.is64), r.word(at + half, h.is64)) {
        match tag {
            DT_NULL => break,
            DT_NEEDED if d.needed.len() < 1024 => d.needed.push(val),
            DT_STRTAB => d.strtab_vaddr = Some(val),
            DT_STRSZ => d.strsz = val,
            DT_RPATH => d.rpath = Some(val),
            DT_RUNPATH => d.runpath = Some(val),
            DT_PLTRELSZ | DT_HASH | DT_SYMTAB | DT_RELA | DT_RELASZ | DT_INIT | DT_REL
            | DT_RELSZ | DT_JMPREL | DT_INIT_ARRAY | DT_INIT_ARRAYSZ | DT_PREINIT_ARRAY
            | DT_PREINIT_ARRAYSZ | DT_RELRSZ | DT_RELR | DT_GNU_HASH | DT_VERSYM | DT_VERDEF
            | DT_VERNEED
                if d.loader.len() < 64 =>
            {
                d.loader.push((tag, val));
            }
            _ => {}
        }
        at += ent;
    }
    d
}

/// The NUL-terminated string at `off` of a string table (`None` when out of range or not
/// UTF-8).
pub fn strtab_str(tab: &[u8], off: u64) -> Option<String> {
    let rest = tab.get(usize::try_from(off).ok()?..)?;
    let end = rest.iter().position(|&c| c == 0)?;
    let s = std::str::from_utf8(rest.get(..end)?).ok()?;
    (!s.is_empty()).then(|| s.to_string())
}

/// Pages: predicted ranges start and end on page boundaries, as the page cache does.
pub const PAGE: u64 = 4096;
/// What one page fault on a file mapping brings into the page cache: the kernel's
/// read-around window (`ra_pages`, 128 KiB by default), centered on the faulting page. A
/// predicted range is widened by half of it on each side, as faults at its first and last
/// pages would pull, and a code address becomes one whole window.
pub const READ_AROUND: u64 = 128 * 1024;
/// Executable segments up to this size are predicted whole; a bigger one only around its
/// init functions and entry point.
pub const MAX_TEXT: u64 = 64 << 20;
/// A read-only data segment bigger than this and than [`DATA_TO_TEXT`] times the object's
/// code is a data container (ICU's data library, GPU kernels in CUDA libraries): its data
/// is looked up sparsely by what runs, and not predicted.
pub const MAX_DENSE_RODATA: u64 = 4 << 20;
pub const DATA_TO_TEXT: u64 = 4;
/// Largest init function pointer array read (8-byte entries: 8192 functions).
pub const MAX_INIT_ARRAY: u64 = 64 * 1024;
/// Init functions whose code is predicted (more are rare: a window each is kept anyway
/// only when the addresses differ by a window).
const MAX_INIT_FUNCS: usize = 8192;

/// The function addresses of init arrays (bytes of [`Dynamic::init_arrays`]); null and
/// `-1` entries (terminators of old toolchains) are skipped.
pub fn parse_init_array(h: &Header, b: &[u8]) -> Vec<u64> {
    let r = Rd {
        b,
        little: h.little,
    };
    let ent = if h.is64 { 8 } else { 4 };
    let all_ones = if h.is64 {
        u64::MAX
    } else {
        u64::from(u32::MAX)
    };
    (0..b.len() / ent)
        .take(MAX_INIT_FUNCS)
        .filter_map(|i| r.word(i * ent, h.is64))
        .filter(|&a| a != 0 && a != all_ones)
        .collect()
}

/// The byte ranges of a dynamically loaded ELF object that its start reads, as
/// `(offset, len)`: sorted, disjoint, on page boundaries, within `size`. Measured against
/// page-cache residency after real cold starts (`hack/startup-truth.sh`):
///
/// - The file header and program headers (the loader's `read` and the kernel's).
/// - `PT_INTERP` and `PT_DYNAMIC`.
/// - The loader's tables, from the dynamic section: hash tables (`DT_HASH`, `DT_GNU_HASH`),
///   `DT_SYMTAB`, `DT_STRTAB`, version tables, relocations (`DT_RELA`, `DT_REL`,
///   `DT_JMPREL`, `DT_RELR`). A table whose size the dynamic section does not give ends
///   where the next one starts (or at its segment's end): the linker lays them out back to
///   back. Symbol lookups from other objects touch them all over, relocation processing
///   reads the relocation tables through (measured: all resident).
/// - Every writable `PT_LOAD` segment's file part: relocations write `.got`, `.data.rel.ro`,
///   `.init_array`, `.data` (the RELRO region and the data after it), and a write to a
///   private file mapping first reads the page from the file (measured: all resident).
/// - Code. Which functions a start calls is not in the file's format, but with the 128 KiB
///   read-around of every fault a start that uses a library at all pulls most of its text
///   (measured: 35–98% of `.text` for libc, libcrypto, libstdc++, ICU, libjvm, libnode,
///   python, nginx; 5% for a library only loaded). A miss costs a synchronous fetch of a
///   span of the layer, far more than the bandwidth of the unused part, so an executable
///   segment up to [`MAX_TEXT`] is predicted whole. A bigger one (libtorch, CUDA
///   libraries) only gets one read-around window around each address of `code` (the caller
///   passes the entry point, `DT_INIT` and the init arrays' functions): the init functions
///   run on every load and with GNU ld sit together (`.text.startup`) next to `.init` and
///   the PLT, whose stubs every call to another object goes through; the rest comes in
///   lazily.
/// - Read-only data after the text (`.rodata`, `.gcc_except_table`...) up to the unwind
///   tables (`PT_GNU_EH_FRAME`): constants and tables the code uses (measured: mostly
///   resident). `.eh_frame_hdr`/`.eh_frame` are read when a C++ exception unwinds or a
///   debugger/profiler walks the stack (measured: 3–30% resident, from neighbouring
///   read-around); sections not in any segment (`.symtab`, `.strtab`, debug info) are
///   never mapped. A data container ([`MAX_DENSE_RODATA`], [`DATA_TO_TEXT`]) is left out.
pub fn loader_ranges(
    h: &Header,
    seg: &Segments,
    d: Option<&Dynamic>,
    code: &[u64],
    size: u64,
) -> Vec<(u64, u64)> {
    let mut raw: Vec<(u64, u64)> = Vec::new();
    let (phoff, phlen) = h.phdr_range();
    raw.push((0, HEADER_LEN.max(phoff.saturating_add(phlen))));
    raw.extend(seg.interp);
    raw.extend(seg.dynamic);
    // File extent of the segment holding an offset.
    let seg_end = |off: u64| {
        seg.loads
            .iter()
            .find(|l| off >= l.offset && off - l.offset < l.filesz)
            .map(|l| l.offset.saturating_add(l.filesz))
    };
    if let Some(d) = d {
        // (start vaddr, size when the dynamic section gives it)
        let mut tables: Vec<(u64, Option<u64>)> = Vec::new();
        if let Some(v) = d.strtab_vaddr {
            tables.push((v, Some(d.strsz)));
        }
        for (tag, sz) in [
            (DT_HASH, None),
            (DT_GNU_HASH, None),
            (DT_SYMTAB, None),
            (DT_VERSYM, None),
            (DT_VERDEF, None),
            (DT_VERNEED, None),
            (DT_RELA, Some(DT_RELASZ)),
            (DT_REL, Some(DT_RELSZ)),
            (DT_JMPREL, Some(DT_PLTRELSZ)),
            (DT_RELR, Some(DT_RELRSZ)),
        ] {
            if let Some(v) = d.tag(tag) {
                tables.push((v, sz.map(|t| d.tag(t).unwrap_or(0))));
            }
        }
        let tables: Vec<(u64, Option<u64>)> = tables
            .into_iter()
            .filter_map(|(v, sz)| Some((seg.file_offset(v)?, sz)))
            .collect();
        let mut starts: Vec<u64> = tables.iter().map(|t| t.0).collect();
        starts.sort_unstable();
        for (off, sz) in tables {
            let Some(end) = seg_end(off) else { continue };
            let end = match sz {
                Some(sz) => off.saturating_add(sz).min(end),
                None => starts
                    .iter()
                    .copied()
                    .find(|&s| s > off)
                    .map_or(end, |s| s.min(end)),
            };
            raw.push((off, end - off));
        }
    }
    let text: u64 = seg
        .loads
        .iter()
        .filter(|l| l.flags & PF_X != 0)
        .map(|l| l.filesz)
        .sum();
    let mut code_windows = false;
    for l in &seg.loads {
        if l.flags & PF_W != 0 {
            raw.push((l.offset, l.filesz));
        } else if l.flags & PF_X != 0 {
            if l.filesz <= MAX_TEXT {
                raw.push((l.offset, l.filesz));
            } else {
                code_windows = true;
            }
        } else if l.offset > 0 {
            // Read-only data after the text: up to the unwind tables.
            let end = l.offset.saturating_add(l.filesz);
            let data_end = seg
                .eh_frame_hdr
                .filter(|&e| e >= l.offset && e < end)
                .unwrap_or(end);
            let len = data_end - l.offset;
            let container = len > MAX_DENSE_RODATA && len > text.saturating_mul(DATA_TO_TEXT);
            if !container {
                raw.push((l.offset, len));
            }
        }
    }
    let half = READ_AROUND / 2;
    let mut out: Vec<(u64, u64)> = raw
        .into_iter()
        .filter(|&(_, len)| len > 0)
        .map(|(off, len)| {
            (
                off.saturating_sub(half),
                off.saturating_add(len).saturating_add(half),
            )
        })
        .collect();
    out.extend(
        code.iter()
            .filter(|_| code_windows)
            .filter_map(|&v| seg.file_offset(v))
            .map(|off| (off.saturating_sub(half), off.saturating_add(half))),
    );
    merge_pages(out, size)
}

/// `[start, end)` ranges rounded out to pages, clipped to `size`, sorted and merged;
/// returned as `(offset, len)`.
pub fn merge_pages(mut v: Vec<(u64, u64)>, size: u64) -> Vec<(u64, u64)> {
    let up = |x: u64| x.div_ceil(PAGE).saturating_mul(PAGE);
    for r in &mut v {
        r.0 = (r.0 / PAGE * PAGE).min(size);
        r.1 = up(r.1).min(size);
    }
    v.retain(|r| r.1 > r.0);
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (s, e) in v {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out.into_iter().map(|(s, e)| (s, e - s)).collect()
}

/// Multiarch triplet of a machine (Debian library directories).
pub fn multiarch(machine: u16, is64: bool) -> Option<&'static str> {
    match (machine, is64) {
        (62, true) => Some("x86_64-linux-gnu"),
        (3, false) => Some("i386-linux-gnu"),
        (183, true) => Some("aarch64-linux-gnu"),
        (40, false) => Some("arm-linux-gnueabihf"),
        (21, true) => Some("powerpc64le-linux-gnu"),
        (22, true) => Some("s390x-linux-gnu"),
        (243, true) => Some("riscv64-linux-gnu"),
        _ => None,
    }
}

/// `$PLATFORM` for a machine.
pub fn platform(machine: u16) -> &'static str {
    match machine {
        62 => "x86_64",
        3 => "i686",
        183 => "aarch64",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elf64(phnum: u16, phentsize: u16) -> Vec<u8> {
        let mut b = vec![0u8; 64];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[18..20].copy_from_slice(&62u16.to_le_bytes());
        b[32..40].copy_from_slice(&64u64.to_le_bytes());
        b[54..56].copy_from_slice(&phentsize.to_le_bytes());
        b[56..58].copy_from_slice(&phnum.to_le_bytes());
        b
    }

    #[test]
    fn header_bounds_are_checked() {
        let h = parse_header(&elf64(2, 56)).unwrap();
        assert!(h.is64 && h.little && h.machine == 62);
        assert_eq!(h.phdr_range(), (64, 112));
        assert!(matches!(
            parse_header(&elf64(60000, 56)),
            Err(ElfError::Malformed(_))
        ));
        assert!(matches!(
            parse_header(&elf64(2, 3)),
            Err(ElfError::Malformed(_))
        ));
        assert_eq!(parse_header(b"#!/bin/sh"), Err(ElfError::NotElf));
        assert!(parse_header(&elf64(1, 56)[..20]).is_err());
    }

    #[test]
    fn phdrs_dynamic_and_strings() {
        let h = parse_header(&elf64(3, 56)).unwrap();
        let mut ph = vec![0u8; 3 * 56];
        let put = |ph: &mut Vec<u8>, i: usize, t: u32, off: u64, va: u64, sz: u64| {
            let b = i * 56;
            ph[b..b + 4].copy_from_slice(&t.to_le_bytes());
            ph[b + 8..b + 16].copy_from_slice(&off.to_le_bytes());
            ph[b + 16..b + 24].copy_from_slice(&va.to_le_bytes());
            ph[b + 32..b + 40].copy_from_slice(&sz.to_le_bytes());
        };
        put(&mut ph, 0, PT_INTERP, 0x200, 0x200, 28);
        put(&mut ph, 1, PT_LOAD, 0x1000, 0x401000, 0x2000);
        put(&mut ph, 2, PT_DYNAMIC, 0x1800, 0x401800, 1 << 30);
        let s = parse_phdrs(&h, &ph).unwrap();
        assert_eq!(s.interp, Some((0x200, 28)));
        assert_eq!(s.dynamic, Some((0x1800, MAX_DYNAMIC)));
        assert_eq!(s.file_offset(0x401100), Some(0x1100));
        assert_eq!(s.file_offset(0x999999), None);
        assert!(parse_phdrs(&h, &ph[..100]).is_err());

        let mut dy = Vec::new();
        for (t, v) in [
            (1u64, 1u64),
            (1, 10),
            (29, 19),
            (5, 0x401100),
            (10, 30),
            (0, 0),
        ] {
            dy.extend_from_slice(&t.to_le_bytes());
            dy.extend_from_slice(&v.to_le_bytes());
        }
        let d = parse_dynamic(&h, &dy);
        assert_eq!(d.needed, vec![1, 10]);
        assert_eq!(d.runpath, Some(19));
        assert_eq!(d.strtab_vaddr, Some(0x401100));
        let tab = b"\0libc.so.6\0libm.so.6\0$ORIGIN/..\0";
        assert_eq!(strtab_str(tab, 1).as_deref(), Some("libc.so.6"));
        assert_eq!(strtab_str(tab, 21).as_deref(), Some("$ORIGIN/.."));
        assert_eq!(strtab_str(tab, 999), None);
        assert_eq!(
            parse_interp(b"/lib64/ld-linux-x86-64.so.2\0").unwrap(),
            "/lib64/ld-linux-x86-64.so.2"
        );
        // A dynamic section without DT_NULL ends at its bytes' end.
        assert_eq!(parse_dynamic(&h, &dy[..32]).needed.len(), 2);
    }

    #[test]
    fn loader_ranges_of_a_library() {
        let h = parse_header(&elf64(4, 56)).unwrap();
        let load = |offset, filesz, flags| Load {
            vaddr: offset,
            offset,
            filesz,
            flags,
        };
        const M: u64 = 1 << 20;
        let seg = Segments {
            interp: None,
            dynamic: Some((40 * M + 0x100, 0x200)),
            eh_frame_hdr: Some(30 * M),
            loads: vec![
                load(0, 2 * M, 4),             // R: headers, loader tables
                load(2 * M, 20 * M, 4 | PF_X), // text
                load(22 * M, 10 * M, 4),       // rodata, then unwind tables at 30 MiB
                load(40 * M, M / 2, 4 | PF_W), // data
            ],
        };
        let d = Dynamic {
            strtab_vaddr: Some(0x10000),
            strsz: 0x1000,
            loader: vec![
                (DT_GNU_HASH, 0x1000),
                (DT_SYMTAB, 0x4000),
                (DT_RELA, 0x20000),
                (DT_RELASZ, 0x3000),
            ],
            ..Dynamic::default()
        };
        let size = 41 * M;
        let r = loader_ranges(&h, &seg, Some(&d), &[], size);
        let half = READ_AROUND / 2;
        assert_eq!(
            r,
            vec![
                // headers through the relocations, with read-around after
                (0, 0x23000 + half),
                // text and rodata up to the unwind tables
                (2 * M - half, 28 * M + 2 * half),
                // the data segment (the dynamic section is in it) to the end of the file
                (40 * M - half, M / 2 + 2 * half),
            ]
        );
        // A huge text: only windows around the code that runs on load.
        let mut big = seg.clone();
        big.loads[1].filesz = 100 * M;
        big.loads[2].offset = 102 * M;
        big.loads[3].offset = 120 * M;
        big.dynamic = None;
        big.eh_frame_hdr = None;
        let r = loader_ranges(&h, &big, Some(&d), &[3 * M], 121 * M);
        assert!(r.contains(&(3 * M - half, READ_AROUND)), "{r:?}");
        assert!(!r.iter().any(|&(o, _)| o > 3 * M && o < 102 * M - half));
        // A data container: the rodata is left out.
        let mut icu = seg.clone();
        icu.loads[1].filesz = 4096;
        let r = loader_ranges(&h, &icu, Some(&d), &[], size);
        assert!(
            !r.iter().any(|&(o, l)| o < 25 * M && o + l > 25 * M),
            "{r:?}"
        );
        // Ranges stay within the file, on pages.
        assert!(
            r.iter()
                .all(|&(o, l)| o % PAGE == 0 && l % PAGE == 0 && o + l <= size)
        );
        assert_eq!(
            merge_pages(vec![(10, 20), (4096, 5000), (9000, 1 << 40)], 10_000),
            vec![(0, 10_000)]
        );
        assert_eq!(parse_init_array(&h, &[0u8; 8]), Vec::<u64>::new());
        assert_eq!(parse_init_array(&h, &0x1234u64.to_le_bytes()), vec![0x1234]);
    }
}
