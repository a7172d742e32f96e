//! The ELF reader never panics on any file, following the analyzer's steps (header, program headers, PT_INTERP, dynamic section, string table); what it returns stays within its documented bounds and the file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use talaria_artifact::startup::elf;

fuzz_target!(|file: &[u8]| {
    let head = &file[..file.len().min(elf::HEADER_LEN as usize)];
    let parsed = elf::parse_header(head);
    assert_eq!(
        parsed.is_ok(),
        reference_accepts(head),
        "parse_header of {head:02x?}"
    );
    let Ok(h) = parsed else {
        return;
    };
    assert!(elf::is_elf(head));
    assert!(h.phnum <= 512);
    assert!(h.phnum == 0 || (h.phentsize >= if h.is64 { 56 } else { 32 } && h.phentsize <= 256));
    let _ = (
        elf::multiarch(h.machine, h.is64),
        elf::platform(h.machine),
        h.abi(),
    );
    let (off, len) = h.phdr_range();
    let Some(ph) = slice(file, off, len) else {
        return;
    };
    let Ok(seg) = elf::parse_phdrs(&h, ph) else {
        return;
    };
    if let Some((o, l)) = seg.interp {
        assert!(l > 0 && l <= 4096);
        if let Some(b) = slice(file, o, l)
            && let Ok(interp) = elf::parse_interp(b)
        {
            assert!(!interp.is_empty() && !interp.contains('\0'));
            assert!(interp.len() as u64 <= l);
        }
    }
    for l in &seg.loads {
        if l.filesz > 0 {
            let rel = l.filesz / 2;
            if let (Some(v), Some(got)) = (
                l.vaddr.checked_add(rel),
                seg.file_offset(l.vaddr.saturating_add(rel)),
            ) {
                // The first load holding the address maps it; some load must map it as said.
                assert!(seg.loads.iter().any(|m| {
                    v.checked_sub(m.vaddr)
                        .is_some_and(|r| r < m.filesz && m.offset.checked_add(r) == Some(got))
                }));
            }
        }
    }
    let Some((doff, dlen)) = seg.dynamic else {
        return;
    };
    assert!(dlen <= elf::MAX_DYNAMIC);
    let Some(dy) = slice(file, doff, dlen) else {
        return;
    };
    let d = elf::parse_dynamic(&h, dy);
    assert!(d.needed.len() <= 1024);
    let Some(tab_off) = d.strtab_vaddr.and_then(|v| seg.file_offset(v)) else {
        return;
    };
    let Some(tab) = slice(file, tab_off, d.strsz.min(elf::MAX_STRTAB)) else {
        return;
    };
    for o in d.needed.iter().chain(&d.rpath).chain(&d.runpath) {
        if let Some(s) = elf::strtab_str(tab, *o) {
            assert!(!s.is_empty() && !s.contains('\0'));
            assert!(*o as usize + s.len() < tab.len(), "string within its table");
        }
    }
});

/// Whether a header is acceptable, read independently: ELF magic, class 1 or 2, byte order
/// 1 or 2, the fields present, at most 512 program headers of 32/56 to 256 bytes each.
fn reference_accepts(b: &[u8]) -> bool {
    if !b.starts_with(b"\x7fELF")
        || b.len() < 6
        || !(1..=2).contains(&b[4])
        || !(1..=2).contains(&b[5])
    {
        return false;
    }
    let (is64, little) = (b[4] == 2, b[5] == 1);
    let u16_at = |at: usize| {
        b.get(at..at + 2).map(|s| {
            let s = [s[0], s[1]];
            if little {
                u16::from_le_bytes(s)
            } else {
                u16::from_be_bytes(s)
            }
        })
    };
    // The last field read: e_phnum (and e_phoff before it, within the same length).
    let (entsize, num) = if is64 {
        (u16_at(54), u16_at(56))
    } else {
        (u16_at(42), u16_at(44))
    };
    let (Some(entsize), Some(num)) = (entsize, num) else {
        return false;
    };
    let min = if is64 { 56 } else { 32 };
    num <= 512 && (num == 0 || (min..=256).contains(&entsize))
}

/// `len` bytes of `file` at `off`, when all there.
fn slice(file: &[u8], off: u64, len: u64) -> Option<&[u8]> {
    let s = usize::try_from(off).ok()?;
    let e = s.checked_add(usize::try_from(len).ok()?)?;
    file.get(s..e)
}
