//! Shared by the fuzz targets and `make_seeds`: a small synthetic layer (every entry kind the
//! index knows), synthetic ELF files, the CRI messages the image-service proxy decodes (as a
//! reference decoder), and input splitting helpers. Deterministic: the same bytes every run.

use std::io::Write;

use talaria_artifact::index::indexer::{IndexOptions, index_layer};
use talaria_artifact::index::{Compression, LayerIndex};

/// Splits `data` at its first NUL byte (JSON text never holds a raw NUL): `(before, after)`,
/// `after` empty when there is none.
pub fn split_nul(data: &[u8]) -> (&[u8], &[u8]) {
    match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[]),
    }
}

/// Layer digests of the image the `startup_trace` target plans for: the sample layer
/// (indexed) and a layer that is not indexed.
pub const TRACE_LAYER: &str =
    "sha256:1111111111111111111111111111111111111111111111111111111111111111";
pub const TRACE_UNINDEXED: &str =
    "sha256:2222222222222222222222222222222222222222222222222222222222222222";

/// Paths of regular files in [`sample_layer`].
pub const SAMPLE_FILES: &[&str] = &[
    "etc/passwd",
    "etc/hostname",
    "etc/secure",
    "bin/app",
    "bin/start.sh",
    "usr/lib/x86_64-linux-gnu/libc.so.6",
    "usr/share/data.bin",
];

/// A small uncompressed layer with every entry kind: directories, files (one with an
/// extended attribute), a symlink, a hard link, a character device, a FIFO, a whiteout and
/// an opaque directory.
pub fn sample_layer() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    fn append(
        b: &mut tar::Builder<Vec<u8>>,
        path: &str,
        kind: tar::EntryType,
        data: &[u8],
        link: Option<&str>,
    ) {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(if kind == tar::EntryType::Directory {
            0o755
        } else {
            0o644
        });
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(data.len() as u64);
        if kind == tar::EntryType::Char {
            h.set_device_major(1).expect("major");
            h.set_device_minor(3).expect("minor");
        }
        if let Some(l) = link {
            h.set_link_name(l).expect("link name");
        }
        h.set_path(path).expect("path");
        h.set_cksum();
        b.append(&h, data).expect("tar entry");
    }
    let mut add = |path: &str, kind: tar::EntryType, data: &[u8], link: Option<&str>| {
        append(&mut b, path, kind, data, link)
    };
    let dir = tar::EntryType::Directory;
    let file = tar::EntryType::Regular;
    add("./", dir, b"", None);
    add("etc/", dir, b"", None);
    add("etc/passwd", file, b"root:x:0:0:root:/root:/bin/sh\n", None);
    add("etc/hostname", file, b"fuzz\n", None);
    add("bin/", dir, b"", None);
    add("bin/app", file, &sample_elf(true, true, 62), None);
    add(
        "bin/start.sh",
        file,
        b"#!/bin/sh -e\nexport A=1\ncd /app && exec /bin/app \"$@\" --x=${A:-0}\n",
        None,
    );
    add("bin/sh", tar::EntryType::Symlink, b"", Some("app"));
    add("bin/app2", tar::EntryType::Link, b"", Some("bin/app"));
    add(
        "usr/lib/x86_64-linux-gnu/libc.so.6",
        file,
        &sample_elf(true, true, 62),
        None,
    );
    let data: Vec<u8> = (0..6000u32).map(|i| (i * 7 % 251) as u8).collect();
    add("usr/share/data.bin", file, &data, None);
    add("dev/null", tar::EntryType::Char, b"", None);
    add("run/fifo", tar::EntryType::Fifo, b"", None);
    add("var/.wh.cache", file, b"", None);
    add("opt/.wh..wh..opq", file, b"", None);
    // One file with an extended attribute (a PAX record before its header).
    b.append_pax_extensions([("SCHILY.xattr.user.fuzz", &b"yes"[..])])
        .expect("pax");
    append(&mut b, "etc/secure", file, b"secret\n", None);
    b.into_inner().expect("tar")
}

/// [`sample_layer`] gzip-compressed.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(data).expect("gzip");
    gz.finish().expect("gzip")
}

/// The index of [`sample_layer`] with `span_size`-byte spans.
pub fn sample_index(span_size: u64) -> LayerIndex {
    index_layer(
        &sample_layer()[..],
        Compression::None,
        &IndexOptions { span_size },
    )
    .expect("index the sample layer")
    .index
}

/// A dynamic ELF executable: PT_INTERP, two PT_LOADs, PT_DYNAMIC with DT_NEEDED (2),
/// DT_RUNPATH, DT_STRTAB, DT_STRSZ.
pub fn sample_elf(is64: bool, little: bool, machine: u16) -> Vec<u8> {
    let (ehsize, phentsize) = if is64 { (64usize, 56usize) } else { (52, 32) };
    let phnum = 4usize;
    let interp_off = ehsize + phnum * phentsize;
    let interp = b"/lib64/ld-linux-x86-64.so.2\0";
    let strtab_off = interp_off + interp.len();
    let strtab = b"\0libc.so.6\0libm.so.6\0$ORIGIN/../lib\0";
    let dyn_off = (strtab_off + strtab.len()).next_multiple_of(8);
    let vbase: u64 = 0x40_0000;
    let dyn_entries: [(u64, u64); 6] = [
        (1, 1),                         // DT_NEEDED libc.so.6
        (1, 11),                        // DT_NEEDED libm.so.6
        (29, 21),                       // DT_RUNPATH
        (5, vbase + strtab_off as u64), // DT_STRTAB
        (10, strtab.len() as u64),      // DT_STRSZ
        (0, 0),                         // DT_NULL
    ];
    let word = if is64 { 8 } else { 4 };
    let dyn_len = dyn_entries.len() * 2 * word;
    let total = dyn_off + dyn_len;
    let mut f = vec![0u8; total];
    let put = |f: &mut Vec<u8>, at: usize, v: u64, n: usize| {
        let bytes = if little {
            v.to_le_bytes()[..n].to_vec()
        } else {
            v.to_be_bytes()[8 - n..].to_vec()
        };
        f[at..at + n].copy_from_slice(&bytes);
    };
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = if is64 { 2 } else { 1 };
    f[5] = if little { 1 } else { 2 };
    f[6] = 1;
    put(&mut f, 16, 3, 2); // ET_DYN
    put(&mut f, 18, u64::from(machine), 2);
    if is64 {
        put(&mut f, 32, ehsize as u64, 8);
        put(&mut f, 54, phentsize as u64, 2);
        put(&mut f, 56, phnum as u64, 2);
    } else {
        put(&mut f, 28, ehsize as u64, 4);
        put(&mut f, 42, phentsize as u64, 2);
        put(&mut f, 44, phnum as u64, 2);
    }
    // (type, offset, vaddr, filesz)
    let phdrs: [(u64, u64, u64, u64); 4] = [
        (
            3,
            interp_off as u64,
            vbase + interp_off as u64,
            interp.len() as u64,
        ),
        (1, 0, vbase, dyn_off as u64),
        (2, dyn_off as u64, vbase + dyn_off as u64, dyn_len as u64),
        (1, dyn_off as u64, vbase + dyn_off as u64, dyn_len as u64),
    ];
    for (i, (t, off, va, sz)) in phdrs.into_iter().enumerate() {
        let b = ehsize + i * phentsize;
        put(&mut f, b, t, 4);
        if is64 {
            put(&mut f, b + 8, off, 8);
            put(&mut f, b + 16, va, 8);
            put(&mut f, b + 32, sz, 8);
        } else {
            put(&mut f, b + 4, off, 4);
            put(&mut f, b + 8, va, 4);
            put(&mut f, b + 16, sz, 4);
        }
    }
    f[interp_off..interp_off + interp.len()].copy_from_slice(interp);
    f[strtab_off..strtab_off + strtab.len()].copy_from_slice(strtab);
    for (i, (tag, val)) in dyn_entries.into_iter().enumerate() {
        let at = dyn_off + i * 2 * word;
        put(&mut f, at, tag, word);
        put(&mut f, at + word, val, word);
    }
    f
}

/// The CRI messages of `node/proto/runtime/v1/image_pull.proto`, as an independent reference
/// decoder for the proxy's (which is private to talaria-node).
pub mod cri {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ImageSpec {
        #[prost(string, tag = "1")]
        pub image: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct AuthConfig {
        #[prost(string, tag = "1")]
        pub username: String,
        #[prost(string, tag = "2")]
        pub password: String,
        #[prost(string, tag = "3")]
        pub auth: String,
        #[prost(string, tag = "4")]
        pub server_address: String,
        #[prost(string, tag = "5")]
        pub identity_token: String,
        #[prost(string, tag = "6")]
        pub registry_token: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PullImageRequest {
        #[prost(message, optional, tag = "1")]
        pub image: Option<ImageSpec>,
        #[prost(message, optional, tag = "2")]
        pub auth: Option<AuthConfig>,
    }
}
