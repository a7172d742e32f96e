//! Hostile and broken input: every case fails with a clear error, never a panic or a hang,
//! and never serves unverified bytes.

mod index_common;

use std::sync::Arc;

use bytes::Bytes;
use index_common::*;
use talaria_artifact::index::indexer::{IndexError, IndexOptions, index_layer};
use talaria_artifact::index::reader::{LayerReader, MemorySpanCache, ReadError};
use talaria_artifact::index::{Compression, LayerIndex};
use talaria_artifact::source::{BoxFuture, MemorySource, RangeSource, SourceError};

fn try_index(blob: &[u8], c: Compression) -> Result<(), IndexError> {
    index_layer(blob, c, &IndexOptions { span_size: 4096 }).map(|_| ())
}

fn small_tar() -> Vec<u8> {
    let mut t = RawTar::default();
    // Lowercase letters from a xorshift generator: compresses ~2x, so many spans.
    let mut x = 0x2545f4914f6cdd1du64;
    for i in 0..40 {
        let data: Vec<u8> = (0..3000 + i * 100)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b'a' + (x % 16) as u8
            })
            .collect();
        t.file(&format!("dir/file-{i}"), &data);
    }
    t.finish()
}

#[test]
fn truncated_gzip_fails() {
    let blob = gzip_cmd(&small_tar());
    for cut in [
        0,
        1,
        5,
        10,
        11,
        blob.len() / 3,
        blob.len() / 2,
        blob.len() - 9,
        blob.len() - 4,
        blob.len() - 1,
    ] {
        let err = try_index(&blob[..cut], Compression::Gzip).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(
                err,
                IndexError::TruncatedGzip { .. } | IndexError::Gzip { .. }
            ),
            "cut at {cut}: {msg}"
        );
    }
}

#[test]
fn garbage_after_gzip_fails() {
    let blob = gzip_cmd(&small_tar());
    for tail in [
        &b"garbage"[..],
        &[0u8; 512][..],
        &[0x1f][..],
        &[0x1f, 0x8b, 0x08][..],
        &[0x1f, 0x00, 0, 0, 0, 0, 0, 0, 0, 0][..],
    ] {
        let mut b = blob.clone();
        b.extend_from_slice(tail);
        let err = try_index(&b, Compression::Gzip).unwrap_err();
        assert!(
            matches!(
                err,
                IndexError::TrailingGarbage { .. } | IndexError::TruncatedGzip { .. }
            ),
            "{tail:?}: {err}"
        );
    }
}

#[test]
fn corrupt_gzip_data_fails() {
    let blob = gzip_cmd(&small_tar());
    // Flip bytes in the deflate data and in the CRC trailer: zlib or the CRC check catches it.
    for pos in [20, blob.len() / 2, blob.len() - 6] {
        let mut b = blob.clone();
        b[pos] ^= 0x55;
        assert!(try_index(&b, Compression::Gzip).is_err(), "flip at {pos}");
    }
}

#[test]
fn concatenated_gzip_members_are_indexed() {
    let t = small_tar();
    // Split mid-entry, with an empty member in between, like `cat a.gz b.gz c.gz`.
    let cut = t.len() / 3 + 17;
    let mut blob = gzip_cmd(&t[..cut]);
    blob.extend_from_slice(&gzip_cmd(b""));
    blob.extend_from_slice(&gzip_flate2(&t[cut..], 6));
    let out = index(&blob, Compression::Gzip, 4096);
    assert_eq!(out.diff_id, sha256_str(&t));
    assert_eq!(out.compressed_digest, sha256_str(&blob));
    assert_eq!(out.index.uncompressed_size, t.len() as u64);
    let ix = LayerIndex::decode(&out.index.encode()).unwrap();
    let r = reader(ix, &blob);
    block_on(async {
        for (path, data) in tar_files(&t) {
            let e = r.index().find(&path).unwrap().clone();
            assert_eq!(
                &r.read_file(&e, 0, e.size).await.unwrap()[..],
                &data[..],
                "{path}"
            );
        }
        let all = r.read_at(0, t.len() as u64).await.unwrap();
        assert_eq!(&all[..], &t[..]);
    });
}

#[test]
fn escaping_paths_fail() {
    for name in ["../etc/passwd", "a/../../b", "ok/../.."] {
        let mut t = RawTar::default();
        t.file("fine", b"x").file(name, b"evil");
        let err = try_index(&gzip_cmd(&t.finish()), Compression::Gzip).unwrap_err();
        assert!(err.to_string().contains(".."), "{name}: {err}");
    }
    // A hardlink pointing outside.
    let mut t = RawTar::default();
    t.entry(
        &H {
            name: b"h",
            typeflag: b'1',
            link: b"../../etc/shadow",
            ..H::default()
        },
        b"",
    );
    assert!(try_index(&t.finish(), Compression::None).is_err());
    // A file written through a symlink of the same layer.
    let mut t = RawTar::default();
    t.entry(
        &H {
            name: b"evil",
            typeflag: b'2',
            link: b"/etc",
            ..H::default()
        },
        b"",
    )
    .file("evil/passwd", b"root::0:0::/:/bin/sh");
    let err = try_index(&t.finish(), Compression::None).unwrap_err();
    assert!(err.to_string().contains("symlink"), "{err}");
}

#[test]
fn absolute_names_are_normalized() {
    let mut t = RawTar::default();
    t.file("/etc/hosts", b"127.0.0.1")
        .file("./././usr//bin/x", b"y");
    let out = index(&t.finish(), Compression::None, 4096);
    let paths: Vec<&str> = out.index.entries.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["etc/hosts", "usr/bin/x"]);
}

#[test]
fn sizes_beyond_the_stream_fail() {
    let mut t = RawTar::default();
    t.file("a", b"fine");
    let mut b = t.buf.clone();
    b.extend_from_slice(&header(&H {
        name: b"big",
        size: 10 * 1024 * 1024,
        ..H::default()
    }));
    b.extend_from_slice(&[1u8; 1000]);
    for c in [Compression::None, Compression::Gzip] {
        let blob = if c == Compression::Gzip {
            gzip_cmd(&b)
        } else {
            b.clone()
        };
        let err = try_index(&blob, c).unwrap_err();
        assert!(err.to_string().contains("past the end"), "{err}");
    }
    // A header cut short, and an absurd base-256 size.
    assert!(try_index(&b[..700], Compression::None).is_err());
    let mut h = header(&H {
        name: b"huge",
        ..H::default()
    });
    h[124..136].copy_from_slice(&[
        0x80, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    ]);
    h[148..156].fill(b' ');
    let sum: u64 = h.iter().map(|&x| u64::from(x)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    assert!(try_index(&h, Compression::None).is_err());
}

#[test]
fn not_a_tar_fails() {
    let mut b = small_tar();
    b[5] ^= 1; // breaks the first header's checksum
    let err = try_index(&b, Compression::None).unwrap_err();
    assert!(err.to_string().contains("checksum"), "{err}");
    assert!(try_index(&[1u8; 4096], Compression::None).is_err());
}

#[test]
fn zstd_and_mislabeled_blobs_are_not_indexable() {
    let t = small_tar();
    let z = pipe("zstd", &["-q", "-c"], &t);
    for (blob, c) in [
        (&t[..], Compression::Zstd),
        (&z[..], Compression::Gzip),
        (&z[..], Compression::None),
        (&gzip_cmd(&t)[..], Compression::None),
    ] {
        let err = try_index(blob, c).unwrap_err();
        assert!(matches!(err, IndexError::NotIndexable(_)), "{c:?}: {err}");
    }
    assert!(matches!(
        try_index(&t, Compression::Gzip).unwrap_err(),
        IndexError::Gzip { .. }
    ));
    assert!(try_index(b"", Compression::Gzip).is_err());
    assert!(
        index_layer(&t[..], Compression::Gzip, &IndexOptions { span_size: 10 }).is_err(),
        "absurd span size"
    );
}

/// A source that flips one byte of every range it serves.
struct LyingSource(Bytes);

impl RangeSource for LyingSource {
    fn read_range(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Bytes, SourceError>> {
        let mut v = self
            .0
            .slice(offset as usize..(offset + len) as usize)
            .to_vec();
        let mid = v.len() / 2;
        v[mid] ^= 0x01;
        Box::pin(async move { Ok(Bytes::from(v)) })
    }
}

/// A source that serves a different number of bytes than asked.
struct ShortSource(Bytes);

impl RangeSource for ShortSource {
    fn read_range(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Bytes, SourceError>> {
        let end = (offset + len.saturating_sub(3)) as usize;
        let b = self.0.slice(offset as usize..end);
        Box::pin(async move { Ok(b) })
    }
}

#[test]
fn wrong_bytes_from_the_source_are_never_served() {
    let t = small_tar();
    for (blob, c) in [
        (gzip_cmd(&t), Compression::Gzip),
        (t.clone(), Compression::None),
    ] {
        let ix = Arc::new(index(&blob, c, 4096).index);
        let cache = Arc::new(MemorySpanCache::new(1 << 20));
        for src in [
            Arc::new(LyingSource(Bytes::from(blob.clone()))) as Arc<dyn RangeSource>,
            Arc::new(ShortSource(Bytes::from(blob.clone()))),
        ] {
            let r = LayerReader::new(ix.clone(), src, cache.clone());
            let err = block_on(r.read_at(0, t.len() as u64)).unwrap_err();
            assert!(
                matches!(err, ReadError::Span { .. } | ReadError::ShortRead { .. }),
                "{c:?}: {err}"
            );
        }
        // Nothing unverified reached the cache.
        assert_eq!(cache.size(), 0);
        // The honest source still works with the same cache.
        let r = LayerReader::new(ix.clone(), Arc::new(MemorySource(Bytes::from(blob))), cache);
        assert_eq!(&block_on(r.read_at(0, t.len() as u64)).unwrap()[..], &t[..]);
    }
}

#[test]
fn an_index_for_another_blob_fails_verification() {
    let t = small_tar();
    let blob = gzip_cmd(&t);
    let mut other = t.clone();
    let n = other.len();
    other[n / 2] ^= 0xff;
    let ix = index(&gzip_cmd(&other), Compression::Gzip, 4096).index;
    let r = reader(ix, &blob);
    assert!(block_on(r.read_at(0, t.len() as u64)).is_err());
}

#[test]
fn corrupted_encoded_index_is_rejected_without_panic() {
    let t = small_tar();
    let blob = gzip_cmd(&t);
    let ix = index(&blob, Compression::Gzip, 4096).index;
    assert!(
        ix.spans.len() > 2,
        "{} spans of {:?}",
        ix.spans.len(),
        ix.spans
            .iter()
            .map(|s| s.uncompressed_size)
            .collect::<Vec<_>>()
    );
    let enc = ix.encode();
    // Truncations fail (all short ones, then a sample).
    let stride = (enc.len() / 1500).max(1);
    for len in (0..200.min(enc.len())).chain((0..enc.len()).step_by(stride)) {
        assert!(
            LayerIndex::decode(&enc[..len]).is_err(),
            "truncated to {len}"
        );
    }
    // Appended bytes fail.
    let mut longer = enc.clone();
    longer.push(0);
    assert!(LayerIndex::decode(&longer).is_err());
    // Byte flips either fail or (in digests) decode to an index whose reads fail verification.
    let mut accepted = 0;
    for pos in (0..enc.len()).step_by(stride) {
        for bit in [0x01u8, 0x80] {
            let mut b = enc.clone();
            b[pos] ^= bit;
            if let Ok(bad) = LayerIndex::decode(&b) {
                accepted += 1;
                if bad == ix {
                    // The flip hit bits that carry no information (deflate padding).
                    continue;
                }
                let r = reader(bad.clone(), &blob);
                let res = block_on(r.read_at(0, bad.uncompressed_size));
                if let Ok(data) = res {
                    // Only possible when the flip hit metadata that is not read back.
                    assert_eq!(&data[..], &t[..bad.uncompressed_size as usize]);
                }
            }
        }
    }
    eprintln!("{accepted} flips decoded");
    // Absurd counts are rejected before allocating.
    let mut b = b"TLIX\x01\x01".to_vec();
    for _ in 0..3 {
        b.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
    }
    b.extend_from_slice(&[0u8; 64]);
    b.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]);
    assert!(LayerIndex::decode(&b).is_err());
    assert!(LayerIndex::decode(b"").is_err());
    assert!(LayerIndex::decode(b"TLIX\x09").is_err());
    // Spans past the knob's maximum (a read inflates a whole span) are refused both ways.
    let mut huge = ix.clone();
    huge.span_size = talaria_artifact::index::MAX_SPAN_SIZE + 1;
    assert!(LayerIndex::decode(&huge.encode()).is_err(), "span size");
    assert!(
        index_layer(
            &t[..],
            Compression::None,
            &IndexOptions {
                span_size: talaria_artifact::index::MAX_SPAN_SIZE * 2
            }
        )
        .is_err(),
        "the indexer makes no span the decoder refuses"
    );
}

#[test]
fn a_version_2_index_and_its_windows_blob_are_checked() {
    let t = small_tar();
    let blob = gzip_cmd(&t);
    let ix = index(&blob, Compression::Gzip, 4096).index;
    let (split, windows) = ix.split();
    assert!(split.windows.is_some() && !windows.is_empty());
    let enc = split.encode();
    assert_eq!(enc[4], 2, "written as version 2");
    for len in 0..enc.len() {
        assert!(
            LayerIndex::decode(&enc[..len]).is_err(),
            "truncated to {len}"
        );
    }
    let mut longer = enc.clone();
    longer.push(0);
    assert!(LayerIndex::decode(&longer).is_err());
    // Flips either fail to decode or give an index whose reads fail or are right.
    for pos in 0..enc.len() {
        let mut b = enc.clone();
        b[pos] ^= 0x01;
        if let Ok(bad) = LayerIndex::decode(&b) {
            let r =
                reader(bad.clone(), &blob).with_windows(Arc::new(MemorySource(windows.clone())));
            if let Ok(data) = block_on(r.read_at(0, bad.uncompressed_size)) {
                assert_eq!(
                    &data[..],
                    &t[..bad.uncompressed_size as usize],
                    "flip at {pos}"
                );
            }
        }
    }
    // A windows blob other than the one the index names is refused whole.
    let mut wrong = windows.to_vec();
    wrong[windows.len() / 2] ^= 0x01;
    assert!(split.with_windows(&wrong).is_err());
    assert!(split.with_windows(&windows[..windows.len() - 1]).is_err());

    // Without a windows source, reads that need a window fail clearly.
    let r = reader(split.clone(), &blob);
    let err = block_on(r.read_at(0, t.len() as u64)).unwrap_err();
    assert!(matches!(err, ReadError::NoWindows(_)), "{err}");
    // A lying or short windows source never gets a wrong span served or cached.
    let cache = Arc::new(MemorySpanCache::new(1 << 20));
    for w in [
        Arc::new(LyingSource(windows.clone())) as Arc<dyn RangeSource>,
        Arc::new(ShortSource(windows.clone())),
    ] {
        let r = LayerReader::new(
            Arc::new(split.clone()),
            Arc::new(MemorySource(Bytes::from(blob.clone()))),
            cache.clone(),
        )
        .with_windows(w);
        let err = block_on(r.read_at(0, t.len() as u64)).unwrap_err();
        assert!(
            matches!(err, ReadError::Span { .. } | ReadError::ShortRead { .. }),
            "{err}"
        );
    }
    assert_eq!(cache.size(), 0);
    let r = reader(split, &blob).with_windows(Arc::new(MemorySource(windows)));
    assert_eq!(&block_on(r.read_at(0, t.len() as u64)).unwrap()[..], &t[..]);
}
