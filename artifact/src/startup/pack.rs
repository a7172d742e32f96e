//! The startup pack: the bytes a recorded start read, in first-read order, as one blob.
//!
//! A plan of spans fetches whole spans (a checkpoint needs a deflate block boundary), so a
//! start that reads 2,000 small files scattered through site-packages moves two to three
//! times the bytes it reads, and every fine span costs a 32 KiB window in the index. The
//! pack holds exactly the file ranges the start read, recompressed together: a node streams
//! it in order with a few large ranged requests and serves those reads from local disk.
//!
//! Format: the blob is a sequence of compressed members ("chunks", about [`CHUNK_TARGET`]
//! bytes uncompressed each): zstd frames ([`PackCompression::Zstd`], what the writer makes)
//! or gzip members (packs written before; a table without `compression` is gzip). The plan's [`PackTable`] lists every chunk's place in the blob, its
//! SHA-256 (the plan is verified by digest, so each chunk is too) and the records it holds:
//! `(layer, path, offset, len)` of a file, whose bytes follow each other in the chunk. A
//! record never crosses a chunk; a long range is split into several records.

use std::io::{Read, Write};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::ByteRange;

/// Media types of the pack blob in the artifact manifest, by [`PackCompression`].
pub const PACK_MEDIA_TYPE: &str = "application/vnd.talaria.startup.pack.v1.gzip";
pub const PACK_ZSTD_MEDIA_TYPE: &str = "application/vnd.talaria.startup.pack.v1.zstd";
/// zstd level of a pack's chunks: 11% smaller than gzip -6 on PostgreSQL's binaries and
/// data, ~45 MB/s to write; decoding is as fast at any level up to ~15.
const ZSTD_LEVEL: i32 = 9;

/// How a pack's chunks are compressed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PackCompression {
    /// Packs written before zstd (their tables have no `compression`).
    #[default]
    Gzip,
    /// Decodes ~3x faster than gzip, which a node does while its container starts.
    Zstd,
}

impl PackCompression {
    pub fn media_type(self) -> &'static str {
        match self {
            PackCompression::Gzip => PACK_MEDIA_TYPE,
            PackCompression::Zstd => PACK_ZSTD_MEDIA_TYPE,
        }
    }
}
/// Uncompressed bytes per chunk the writer aims for: small enough that the first reads are
/// served after one short request, large enough that a few requests fill the link.
pub const CHUNK_TARGET: u64 = 1 << 20;
/// Largest uncompressed chunk a reader accepts (bounds the memory one chunk takes).
pub const MAX_CHUNK_BYTES: u64 = 16 << 20;
/// Most chunks and records a table may hold (a plan blob is read whole).
pub const MAX_CHUNKS: usize = 100_000;
pub const MAX_RECORDS: usize = 1_000_000;
/// A file up to this size is packed whole whatever part the start read: its other bytes
/// cost little and a slightly different read pattern still finds them. Larger files are
/// packed whole only when the start read most of them ([`pack_ranges`]): shared libraries
/// and binaries are mapped, and a start touches a fraction of their pages (PostgreSQL's
/// pack at 1 MiB here and "half read": 13.4 MiB compressed for 22.5 MiB of reads).
pub const WHOLE_FILE_MAX: u64 = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("startup pack table: {0}")]
    Table(String),
    #[error("startup pack chunk {chunk}: {message}")]
    Chunk { chunk: usize, message: String },
    #[error("startup pack: compressing: {0}")]
    Compress(#[from] std::io::Error),
}

/// Where the pack's bytes are, and what they are.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackTable {
    /// The pack blob (`sha256:<hex>`) and its size.
    pub digest: String,
    pub size: u64,
    /// Layer digests the records refer to by position.
    pub layers: Vec<String>,
    pub chunks: Vec<PackChunk>,
    #[serde(default)]
    pub compression: PackCompression,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackChunk {
    /// Place of the compressed member in the blob.
    pub offset: u64,
    pub length: u64,
    /// Hex SHA-256 of the member's bytes.
    pub sha256: String,
    /// Bytes once inflated: the sum of the records' lengths.
    pub uncompressed: u64,
    pub records: Vec<PackRecord>,
}

/// `len` bytes of a file from `offset`, as the layer's index names it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackRecord {
    /// Position in [`PackTable::layers`].
    pub layer: u32,
    /// The path as the layer index spells it (no leading `/`).
    pub path: String,
    /// Size of the whole file (a reader checks it against its index).
    pub file_size: u64,
    pub offset: u64,
    pub len: u64,
}

impl PackTable {
    /// Checks what a reader relies on: chunks inside the blob and bounded, records inside
    /// their file and summing to their chunk, layers named.
    pub fn check(&self) -> Result<(), PackError> {
        let bad = |m: String| Err(PackError::Table(m));
        if self.chunks.len() > MAX_CHUNKS {
            return bad(format!("{} chunks (most {MAX_CHUNKS})", self.chunks.len()));
        }
        let records: usize = self.chunks.iter().map(|c| c.records.len()).sum();
        if records > MAX_RECORDS {
            return bad(format!("{records} records (most {MAX_RECORDS})"));
        }
        for (i, c) in self.chunks.iter().enumerate() {
            if c.offset.checked_add(c.length).is_none_or(|e| e > self.size) {
                return bad(format!(
                    "chunk {i} lies outside the {}-byte blob",
                    self.size
                ));
            }
            if c.uncompressed > MAX_CHUNK_BYTES {
                return bad(format!(
                    "chunk {i} inflates to {} bytes (most {MAX_CHUNK_BYTES})",
                    c.uncompressed
                ));
            }
            if c.sha256.len() != 64 || !c.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return bad(format!("chunk {i}: sha256 is not 64 hex digits"));
            }
            let mut sum = 0u64;
            for r in &c.records {
                if r.layer as usize >= self.layers.len() {
                    return bad(format!("chunk {i}: {} names layer {}", r.path, r.layer));
                }
                if r.offset.checked_add(r.len).is_none_or(|e| e > r.file_size) {
                    return bad(format!(
                        "chunk {i}: {} [{}, +{}) is past its {} bytes",
                        r.path, r.offset, r.len, r.file_size
                    ));
                }
                sum = sum.saturating_add(r.len);
            }
            if sum != c.uncompressed {
                return bad(format!(
                    "chunk {i}: records hold {sum} bytes, the chunk {}",
                    c.uncompressed
                ));
            }
        }
        Ok(())
    }

    /// Files (layer and path) with bytes in the pack.
    pub fn files(&self) -> usize {
        let mut seen = std::collections::HashSet::new();
        self.chunks
            .iter()
            .flat_map(|c| &c.records)
            .filter(|r| seen.insert((r.layer, r.path.as_str())))
            .count()
    }

    /// Uncompressed bytes of all chunks.
    pub fn bytes(&self) -> u64 {
        self.chunks.iter().map(|c| c.uncompressed).sum()
    }

    /// Verifies chunk `i`'s bytes against the table and inflates them (bounded by the
    /// table's size for it, which [`PackTable::check`] bounds).
    pub fn unpack_chunk(&self, i: usize, member: &[u8]) -> Result<Vec<u8>, PackError> {
        let mut out = Vec::new();
        self.unpack_chunk_into(i, member, &mut out)?;
        Ok(out)
    }

    /// [`PackTable::unpack_chunk`] into `out` (cleared first), so that a reader can reuse
    /// one buffer: a fresh megabyte is a fresh mapping to fault in, page by page.
    pub fn unpack_chunk_into(
        &self,
        i: usize,
        member: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), PackError> {
        match self.chunks.get(i) {
            Some(c) => c.unpack_into(self.compression, i, member, out),
            None => Err(PackError::Chunk {
                chunk: i,
                message: "not in the table".into(),
            }),
        }
    }
}

impl PackChunk {
    /// Verifies the chunk's bytes (chunk `i` of its table, for errors) and decompresses
    /// them into `out` (cleared first), writing at most one byte more than the table says.
    pub fn unpack_into(
        &self,
        compression: PackCompression,
        i: usize,
        member: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), PackError> {
        let err = |message: String| PackError::Chunk { chunk: i, message };
        let c = self;
        if member.len() as u64 != c.length {
            return Err(err(format!(
                "{} bytes, the table says {}",
                member.len(),
                c.length
            )));
        }
        let actual = hex::encode(Sha256::digest(member));
        if !actual.eq_ignore_ascii_case(&c.sha256) {
            return Err(err(format!("sha256 {actual}, the table says {}", c.sha256)));
        }
        out.clear();
        // Bounded by the table, which `check` bounds; one byte more shows a longer chunk.
        let limit = c.uncompressed.min(MAX_CHUNK_BYTES) + 1;
        let res = match compression {
            PackCompression::Gzip => flate2::read::GzDecoder::new(member)
                .take(limit)
                .read_to_end(out)
                .map(drop),
            // One call into a buffer of the table's size: no stream buffer to copy through.
            // A frame that needs more room fails here.
            PackCompression::Zstd => {
                out.reserve(c.uncompressed.min(MAX_CHUNK_BYTES) as usize);
                zstd::bulk::Decompressor::new()
                    .and_then(|mut d| d.decompress_to_buffer(member, out))
                    .map(drop)
            }
        };
        res.map_err(|e| err(format!("does not decompress: {e}")))?;
        if out.len() as u64 != c.uncompressed {
            return Err(err(format!(
                "decompresses to {} bytes, the table says {}",
                out.len(),
                c.uncompressed
            )));
        }
        Ok(())
    }
}

/// The ranges of a file to pack, given the ranges a start read (sorted, merged): the whole
/// file when it is small or three quarters read, else the ranges.
pub fn pack_ranges(file_size: u64, read: &[ByteRange]) -> Vec<ByteRange> {
    let read_bytes: u64 = read.iter().map(|r| r.len).sum();
    if file_size <= WHOLE_FILE_MAX || read_bytes.saturating_mul(4) >= file_size.saturating_mul(3) {
        return vec![ByteRange {
            offset: 0,
            len: file_size,
        }];
    }
    read.iter()
        .filter(|r| r.offset < file_size && r.len > 0)
        .map(|r| ByteRange {
            offset: r.offset,
            len: r.len.min(file_size - r.offset),
        })
        .collect()
}

/// Writes a pack: records in the order added, cut into chunks.
pub struct PackWriter {
    compression: PackCompression,
    layers: Vec<String>,
    blob: Vec<u8>,
    chunks: Vec<PackChunk>,
    current: Vec<u8>,
    records: Vec<PackRecord>,
}

impl PackWriter {
    /// A zstd pack (see [`PackCompression`]).
    pub fn new(layers: Vec<String>) -> Self {
        Self::with_compression(layers, PackCompression::Zstd)
    }

    pub fn with_compression(layers: Vec<String>, compression: PackCompression) -> Self {
        PackWriter {
            compression,
            layers,
            blob: Vec::new(),
            chunks: Vec::new(),
            current: Vec::new(),
            records: Vec::new(),
        }
    }

    /// Uncompressed bytes added so far.
    pub fn bytes(&self) -> u64 {
        self.chunks.iter().map(|c| c.uncompressed).sum::<u64>() + self.current.len() as u64
    }

    /// Adds `data`, the bytes of `path` (layer `layer`) from `offset`.
    pub fn add(
        &mut self,
        layer: u32,
        path: &str,
        file_size: u64,
        offset: u64,
        mut data: &[u8],
    ) -> Result<(), PackError> {
        let mut offset = offset;
        while !data.is_empty() {
            let room = (CHUNK_TARGET as usize).saturating_sub(self.current.len());
            if room == 0 {
                self.seal()?;
                continue;
            }
            let (now, rest) = data.split_at(room.min(data.len()));
            self.current.extend_from_slice(now);
            self.records.push(PackRecord {
                layer,
                path: path.to_string(),
                file_size,
                offset,
                len: now.len() as u64,
            });
            offset += now.len() as u64;
            data = rest;
        }
        Ok(())
    }

    fn seal(&mut self) -> Result<(), PackError> {
        if self.current.is_empty() {
            return Ok(());
        }
        let member = match self.compression {
            PackCompression::Gzip => {
                let mut gz =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                gz.write_all(&self.current)?;
                gz.finish()?
            }
            PackCompression::Zstd => zstd::bulk::compress(&self.current, ZSTD_LEVEL)?,
        };
        self.chunks.push(PackChunk {
            offset: self.blob.len() as u64,
            length: member.len() as u64,
            sha256: hex::encode(Sha256::digest(&member)),
            uncompressed: self.current.len() as u64,
            records: std::mem::take(&mut self.records),
        });
        self.blob.extend_from_slice(&member);
        self.current.clear();
        Ok(())
    }

    /// The table (with the blob's digest) and the blob.
    pub fn finish(mut self) -> Result<(PackTable, Bytes), PackError> {
        self.seal()?;
        let table = PackTable {
            digest: format!("sha256:{}", hex::encode(Sha256::digest(&self.blob))),
            size: self.blob.len() as u64,
            layers: self.layers,
            chunks: self.chunks,
            compression: self.compression,
        };
        Ok((table, Bytes::from(self.blob)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(offset: u64, len: u64) -> ByteRange {
        ByteRange { offset, len }
    }

    #[test]
    fn small_or_mostly_read_files_are_packed_whole() {
        assert_eq!(pack_ranges(10, &[r(2, 1)]), vec![r(0, 10)]);
        let big = 64 * WHOLE_FILE_MAX;
        assert_eq!(pack_ranges(big, &[r(0, big / 4 * 3)]), vec![r(0, big)]);
        assert_eq!(pack_ranges(big, &[r(0, big / 2)]), vec![r(0, big / 2)]);
        assert_eq!(
            pack_ranges(big, &[r(4096, 4096), r(big - 10, 100)]),
            vec![r(4096, 4096), r(big - 10, 10)],
            "a page of a big file, clipped at its end"
        );
    }

    fn data(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn round_trip_across_chunks() {
        for c in [PackCompression::Zstd, PackCompression::Gzip] {
            round_trip(c);
        }
    }

    fn round_trip(compression: PackCompression) {
        let layers = vec!["sha256:a".into(), "sha256:b".into()];
        let mut w = PackWriter::with_compression(layers, compression);
        let small = data(100, 1);
        let big = data(CHUNK_TARGET as usize * 2 + 5, 2);
        w.add(1, "etc/passwd", 100, 0, &small).unwrap();
        w.add(0, "usr/lib/big", 1 << 30, 4096, &big).unwrap();
        assert_eq!(w.bytes(), 100 + big.len() as u64);
        let (t, blob) = w.finish().unwrap();
        t.check().unwrap();
        assert_eq!(t.compression, compression);
        assert_eq!(t.size, blob.len() as u64);
        assert_eq!(t.chunks.len(), 3);
        assert!(t.chunks.iter().all(|c| c.uncompressed <= CHUNK_TARGET));
        // Records, in order, give back what was added.
        let mut got: Vec<(String, u64, Vec<u8>)> = Vec::new();
        for (i, c) in t.chunks.iter().enumerate() {
            let member = &blob[c.offset as usize..(c.offset + c.length) as usize];
            let bytes = t.unpack_chunk(i, member).unwrap();
            let mut at = 0usize;
            for rec in &c.records {
                let part = &bytes[at..at + rec.len as usize];
                match got.last_mut() {
                    Some((p, o, d)) if *p == rec.path && *o + d.len() as u64 == rec.offset => {
                        d.extend_from_slice(part)
                    }
                    _ => got.push((rec.path.clone(), rec.offset, part.to_vec())),
                }
                at += rec.len as usize;
            }
        }
        assert_eq!(got.len(), 2, "{compression:?}");
        assert_eq!(got[0], ("etc/passwd".into(), 0, small));
        assert_eq!(got[1], ("usr/lib/big".into(), 4096, big));
    }

    #[test]
    fn a_table_without_compression_is_a_gzip_pack() {
        let mut w = PackWriter::with_compression(vec!["sha256:a".into()], PackCompression::Gzip);
        w.add(0, "f", 3, 0, b"abc").unwrap();
        let (t, blob) = w.finish().unwrap();
        let mut json = serde_json::to_value(&t).unwrap();
        assert_eq!(json["compression"], "gzip");
        json.as_object_mut().unwrap().remove("compression");
        let old: PackTable = serde_json::from_value(json).unwrap();
        assert_eq!(old.compression, PackCompression::Gzip);
        assert_eq!(old.unpack_chunk(0, &blob).unwrap(), b"abc");
        assert_eq!(PackCompression::Zstd.media_type(), PACK_ZSTD_MEDIA_TYPE);
        // Read as zstd, gzip bytes are refused, not misread.
        let mut as_zstd = t.clone();
        as_zstd.compression = PackCompression::Zstd;
        let e = as_zstd.unpack_chunk(0, &blob).unwrap_err().to_string();
        assert!(e.contains("does not decompress"), "{e}");
    }

    #[test]
    fn lying_bytes_and_bad_tables_are_refused() {
        for c in [PackCompression::Zstd, PackCompression::Gzip] {
            lying_bytes_and_bad_tables(c);
        }
    }

    fn lying_bytes_and_bad_tables(compression: PackCompression) {
        let mut w = PackWriter::with_compression(vec!["sha256:a".into()], compression);
        w.add(0, "f", 3, 0, b"abc").unwrap();
        let (t, blob) = w.finish().unwrap();
        let mut wrong = blob.to_vec();
        let last = wrong.len() - 1;
        wrong[last] ^= 1;
        let e = t.unpack_chunk(0, &wrong).unwrap_err().to_string();
        assert!(e.contains("sha256"), "{e}");
        assert!(t.unpack_chunk(1, &blob).is_err(), "no such chunk");

        let mut outside = t.clone();
        outside.chunks[0].length += 1;
        assert!(outside.check().is_err(), "chunk past the blob");
        let mut past_file = t.clone();
        past_file.chunks[0].records[0].file_size = 2;
        assert!(past_file.check().is_err(), "record past its file");
        let mut sum = t.clone();
        sum.chunks[0].uncompressed = 4;
        assert!(sum.check().is_err(), "records do not add up");
        let mut layer = t.clone();
        layer.chunks[0].records[0].layer = 1;
        assert!(layer.check().is_err(), "unknown layer");
        let mut bomb = t.clone();
        bomb.chunks[0].uncompressed = MAX_CHUNK_BYTES + 1;
        bomb.chunks[0].records[0].len = MAX_CHUNK_BYTES + 1;
        bomb.chunks[0].records[0].file_size = MAX_CHUNK_BYTES + 1;
        assert!(bomb.check().is_err(), "chunk over the bound");
        // A member that decompresses to more than the table says is cut and refused.
        let mut short = t.clone();
        short.chunks[0].uncompressed = 2;
        short.chunks[0].records[0].len = 2;
        let e = short.unpack_chunk(0, &blob).unwrap_err().to_string();
        assert!(e.contains("decompresses to 3"), "{compression:?}: {e}");
    }
}
