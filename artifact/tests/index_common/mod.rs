//! Helpers shared by the layer-index integration tests: real tar/gzip commands, a raw tar
//! header writer for crafted (including hostile) archives, and a small async runner.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use talaria_artifact::index::indexer::{IndexOptions, IndexOutput, index_layer};
use talaria_artifact::index::reader::{LayerReader, MemorySpanCache};
use talaria_artifact::index::{Compression, LayerIndex};
use talaria_artifact::source::MemorySource;

/// Runs `tar` with `args` (from `/`) and returns the archive.
pub fn tar_cmd(args: &[&str]) -> Vec<u8> {
    let out = Command::new("tar")
        .args(["-C", "/", "--sort=name", "-cf", "-"])
        .args(args)
        .stderr(Stdio::null())
        .output()
        .expect("run tar");
    assert!(!out.stdout.is_empty(), "tar produced nothing for {args:?}");
    out.stdout
}

/// Pipes `data` through a command (stdin → stdout).
pub fn pipe(cmd: &str, args: &[&str], data: &[u8]) -> Vec<u8> {
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut stdin = child.stdin.take().unwrap();
    let input = data.to_vec();
    let writer = std::thread::spawn(move || {
        stdin.write_all(&input).unwrap();
    });
    let mut out = Vec::new();
    child.stdout.take().unwrap().read_to_end(&mut out).unwrap();
    writer.join().unwrap();
    assert!(child.wait().unwrap().success());
    out
}

pub fn gzip_cmd(data: &[u8]) -> Vec<u8> {
    pipe("gzip", &["-c", "-6", "-n"], data)
}

pub fn gzip_flate2(data: &[u8], level: u32) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(level));
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

pub fn sha256_str(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

pub fn index(blob: &[u8], c: Compression, span: u64) -> IndexOutput {
    index_layer(blob, c, &IndexOptions { span_size: span }).expect("index layer")
}

pub fn reader(index: LayerIndex, blob: &[u8]) -> LayerReader {
    LayerReader::new(
        Arc::new(index),
        Arc::new(MemorySource(bytes::Bytes::copy_from_slice(blob))),
        Arc::new(MemorySpanCache::new(1 << 30)),
    )
}

pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// Regular files of a tar as (normalized path, content), read with the `tar` crate.
pub fn tar_files(tar_bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut a = tar::Archive::new(tar_bytes);
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        if e.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let p = e.path().unwrap().to_string_lossy().into_owned();
        let p = p
            .trim_start_matches("./")
            .trim_start_matches('/')
            .to_string();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        out.push((p, data));
    }
    out
}

/// A raw tar writer: full control over every header field, for crafted archives.
#[derive(Default)]
pub struct RawTar {
    pub buf: Vec<u8>,
}

pub struct H<'a> {
    pub name: &'a [u8],
    pub typeflag: u8,
    pub size: u64,
    pub link: &'a [u8],
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
    pub uname: &'a [u8],
    pub gname: &'a [u8],
    pub major: u32,
    pub minor: u32,
    pub prefix: &'a [u8],
}

impl Default for H<'_> {
    fn default() -> Self {
        H {
            name: b"",
            typeflag: b'0',
            size: 0,
            link: b"",
            mode: 0o644,
            uid: 1000,
            gid: 1000,
            mtime: 1_700_000_000,
            uname: b"user",
            gname: b"group",
            major: 0,
            minor: 0,
            prefix: b"",
        }
    }
}

fn octal(field: &mut [u8], v: u64) {
    let s = format!("{:0w$o}", v, w = field.len() - 1);
    field[..s.len()].copy_from_slice(s.as_bytes());
}

pub fn header(h: &H) -> [u8; 512] {
    let mut b = [0u8; 512];
    b[..h.name.len()].copy_from_slice(h.name);
    octal(&mut b[100..108], u64::from(h.mode));
    octal(&mut b[108..116], h.uid);
    octal(&mut b[116..124], h.gid);
    octal(&mut b[124..136], h.size);
    octal(&mut b[136..148], h.mtime);
    b[156] = h.typeflag;
    b[157..157 + h.link.len()].copy_from_slice(h.link);
    b[257..263].copy_from_slice(b"ustar\0");
    b[263..265].copy_from_slice(b"00");
    b[265..265 + h.uname.len()].copy_from_slice(h.uname);
    b[297..297 + h.gname.len()].copy_from_slice(h.gname);
    octal(&mut b[329..337], u64::from(h.major));
    octal(&mut b[337..345], u64::from(h.minor));
    b[345..345 + h.prefix.len()].copy_from_slice(h.prefix);
    b[148..156].fill(b' ');
    let sum: u64 = b.iter().map(|&x| u64::from(x)).sum();
    let s = format!("{sum:06o}\0 ");
    b[148..156].copy_from_slice(s.as_bytes());
    b
}

impl RawTar {
    pub fn entry(&mut self, h: &H, data: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(&header(h));
        self.buf.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.buf.extend(std::iter::repeat_n(0u8, pad));
        self
    }

    pub fn file(&mut self, name: &str, data: &[u8]) -> &mut Self {
        self.entry(
            &H {
                name: name.as_bytes(),
                size: data.len() as u64,
                ..H::default()
            },
            data,
        )
    }

    /// A PAX extended header with the given records, applying to the next entry.
    pub fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
        let mut payload = Vec::new();
        for (k, v) in records {
            let body = k.len() + v.len() + 3; // ' ' '=' '\n'
            let mut len = body + 1;
            while len.to_string().len() + body != len {
                len = len.to_string().len() + body;
            }
            payload.extend_from_slice(format!("{len} {k}=").as_bytes());
            payload.extend_from_slice(v);
            payload.push(b'\n');
        }
        self.entry(
            &H {
                name: b"PaxHeader",
                typeflag: b'x',
                size: payload.len() as u64,
                ..H::default()
            },
            &payload,
        )
    }

    /// A GNU long-name ('L') or long-link ('K') header.
    pub fn gnu_long(&mut self, kind: u8, name: &str) -> &mut Self {
        let mut data = name.as_bytes().to_vec();
        data.push(0);
        self.entry(
            &H {
                name: b"././@LongLink",
                typeflag: kind,
                size: data.len() as u64,
                ..H::default()
            },
            &data,
        )
    }

    pub fn finish(&mut self) -> Vec<u8> {
        let mut b = std::mem::take(&mut self.buf);
        b.extend_from_slice(&[0u8; 1024]);
        b
    }
}
