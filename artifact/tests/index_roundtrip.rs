//! Golden round trips on real layers built from this machine's files: every regular file and
//! random ranges read back through the index equal the original bytes.

mod index_common;

use std::sync::Arc;

use index_common::*;
use sha2::{Digest, Sha256};
use talaria_artifact::index::{Compression, EntryKind, LayerIndex};
use talaria_artifact::source::MemorySource;

const SPAN: u64 = 64 * 1024;

/// /etc, part of /usr/share/doc and libc (binary, ~2 MB): ~10 MB.
fn real_tar() -> Vec<u8> {
    let mut args: Vec<String> = vec!["etc".into(), "usr/lib/x86_64-linux-gnu/libc.so.6".into()];
    let mut docs: Vec<String> = std::fs::read_dir("/usr/share/doc")
        .unwrap()
        .map(|d| d.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.as_bytes()[0] <= b'c')
        .map(|n| format!("usr/share/doc/{n}"))
        .collect();
    docs.sort();
    args.extend(docs);
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    tar_cmd(&args)
}

fn check_layer(tar_bytes: &[u8], blob: &[u8], compression: Compression, min_spans: usize) {
    let out = index(blob, compression, SPAN);
    let ix = &out.index;
    assert_eq!(out.compressed_digest, sha256_str(blob));
    assert_eq!(out.diff_id, sha256_str(tar_bytes));
    assert_eq!(out.compressed_size, blob.len() as u64);
    assert_eq!(ix.uncompressed_size, tar_bytes.len() as u64);
    assert!(ix.spans.len() >= min_spans, "only {} spans", ix.spans.len());
    if compression == Compression::Gzip && min_spans > 1 {
        // Most checkpoints fall inside a byte: the inflatePrime path is exercised.
        assert!(ix.spans.iter().filter(|s| s.bits != 0).count() > min_spans / 2);
        assert!(ix.spans.iter().skip(1).all(|s| s.window_len == 32 * 1024));
    }

    // Spans tile the stream and their digests match the data.
    let mut off = 0;
    for s in &ix.spans {
        assert_eq!(s.uncompressed_offset, off);
        let d: [u8; 32] =
            Sha256::digest(&tar_bytes[off as usize..(off + s.uncompressed_size) as usize]).into();
        assert_eq!(d, s.digest);
        off += s.uncompressed_size;
    }
    assert_eq!(off, tar_bytes.len() as u64);

    // The encoding round-trips.
    let enc = ix.encode();
    let dec = LayerIndex::decode(&enc).expect("decode");
    assert_eq!(&dec, ix);

    // Version 2: the windows move to their own blob and come back intact.
    let (split, windows) = ix.split();
    let enc2 = split.encode();
    let dec2 = LayerIndex::decode(&enc2).expect("decode version 2");
    assert_eq!(dec2, split);
    assert_eq!(dec2.with_windows(&windows).expect("windows fit"), *ix);
    let has_windows = ix.spans.iter().any(|s| s.window_len > 0);
    assert_eq!(split.windows.is_some(), has_windows);
    if compression == Compression::Gzip && min_spans > 1 {
        // The windows are most of an index's bytes: the index a node mounts from shrinks.
        let inline: usize = ix.spans.iter().map(|s| s.window.len()).sum();
        assert_eq!(windows.len(), inline);
        assert!(
            enc2.len() * 3 < enc.len(),
            "{} of {} bytes",
            enc2.len(),
            enc.len()
        );
    }

    // Every regular file reads back exactly, through the decoded index.
    let files = tar_files(tar_bytes);
    assert!(files.len() > 50);
    let r = reader(dec, blob);
    block_on(async {
        for (path, data) in &files {
            let e = r
                .index()
                .find(path)
                .unwrap_or_else(|| panic!("{path} not indexed"));
            assert_eq!(e.kind, EntryKind::File);
            assert_eq!(e.size, data.len() as u64);
            let got = r.read_file(e, 0, e.size).await.unwrap();
            assert_eq!(&got[..], &data[..], "{path}");
            if data.len() > 10 {
                let got = r.read_file(e, 3, 5).await.unwrap();
                assert_eq!(&got[..], &data[3..8]);
            }
            // Reads past the end are cut short.
            let got = r.read_file(e, e.size, 10).await.unwrap();
            assert!(got.is_empty());
        }
        // Random ranges of the raw stream, with a fresh cache.
        let r2 = reader(ix.clone(), blob);
        let mut rng = 0x9e3779b97f4a7c15u64;
        for _ in 0..200 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let off = rng % tar_bytes.len() as u64;
            let len = (rng >> 20) % (3 * SPAN).min(tar_bytes.len() as u64 - off);
            let got = r2.read_at(off, len).await.unwrap();
            assert_eq!(&got[..], &tar_bytes[off as usize..(off + len) as usize]);
        }
        assert!(r2.read_at(tar_bytes.len() as u64, 1).await.is_err());
        // The same files through the version 2 index, its windows read by range.
        let r3 = reader(dec2.clone(), blob).with_windows(Arc::new(MemorySource(windows.clone())));
        for (path, data) in &files {
            let e = r3.index().find(path).unwrap();
            let got = r3.read_file(e, 0, e.size).await.unwrap();
            assert_eq!(&got[..], &data[..], "{path} (version 2)");
        }
    });
    // Each span was fetched at most once (spans holding only headers are never needed);
    // the cache served the rest.
    let st = r.stats();
    assert!(st.spans_fetched <= ix.spans.len() as u64);
    assert!(st.spans_fetched * 2 >= ix.spans.len() as u64);
    assert!(st.cache_hits > 0);
}

#[test]
fn gzip_cmd_layer_round_trips() {
    let t = real_tar();
    check_layer(&t, &gzip_cmd(&t), Compression::Gzip, 20);
}

#[test]
fn flate2_layer_round_trips_at_several_levels() {
    let t = real_tar();
    check_layer(&t, &gzip_flate2(&t, 9), Compression::Gzip, 20);
    // zlib-rs level 1 (zlib-ng's "quick" strategy) writes one huge deflate block: a
    // checkpoint can only sit between blocks, so there are few, large spans, still correct.
    check_layer(&t, &gzip_flate2(&t, 1), Compression::Gzip, 1);
}

#[test]
fn uncompressed_layer_round_trips() {
    let t = real_tar();
    check_layer(&t, &t, Compression::None, 20);
    let out = index(&t, Compression::None, SPAN);
    assert!(out.index.spans.iter().all(|s| s.window_len == 0));
    assert_eq!(out.compressed_digest, out.diff_id);
}

#[test]
fn toc_matches_gnu_tar_listing() {
    let t = tar_cmd(&["etc"]);
    let out = index(&gzip_cmd(&t), Compression::Gzip, SPAN);
    let listing = String::from_utf8(pipe("tar", &["-tf", "-"], &t)).unwrap();
    let names: Vec<String> = listing
        .lines()
        .map(|l| l.trim_end_matches('/').to_string())
        .collect();
    let paths: Vec<&str> = out.index.entries.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, names);
    // Symlinks of /etc keep their targets; directories are directories.
    for e in &out.index.entries {
        let meta = std::fs::symlink_metadata(format!("/{}", e.path));
        let Ok(meta) = meta else { continue };
        if meta.file_type().is_symlink() {
            assert_eq!(e.kind, EntryKind::Symlink);
            let target = std::fs::read_link(format!("/{}", e.path)).unwrap();
            assert_eq!(e.link_target.as_deref(), Some(target.to_str().unwrap()));
        } else if meta.is_dir() {
            assert_eq!(e.kind, EntryKind::Dir);
        }
    }
}

#[test]
fn one_file_read_fetches_only_its_spans() {
    let t = real_tar();
    let blob = gzip_cmd(&t);
    let out = index(&blob, Compression::Gzip, SPAN);
    let ix = out.index;
    // The largest file: it spans several checkpoints.
    let e = ix
        .entries
        .iter()
        .filter(|e| e.kind == EntryKind::File)
        .max_by_key(|e| e.size)
        .unwrap()
        .clone();
    assert!(e.size > 2 * SPAN, "largest file is only {} bytes", e.size);
    let first = ix.span_for(e.offset);
    let last = ix.span_for(e.offset + e.size - 1);
    let want_bytes = ix.compressed_range(last).1 - ix.compressed_range(first).0;
    let r = reader(ix, &blob);
    let got = block_on(r.read_file(&e, 0, e.size)).unwrap();
    assert_eq!(
        &got[..],
        &t[e.offset as usize..(e.offset + e.size) as usize]
    );
    let st = r.stats();
    assert_eq!(st.spans_fetched, (last - first + 1) as u64);
    assert_eq!(st.compressed_bytes_fetched, want_bytes);
    // Again: all from the cache.
    block_on(r.read_file(&e, 0, e.size)).unwrap();
    assert_eq!(r.stats().spans_fetched, (last - first + 1) as u64);
    assert_eq!(r.stats().cache_hits, (last - first + 1) as u64);
}

#[test]
fn concurrent_reads_fetch_each_span_once() {
    let t = real_tar();
    let blob = gzip_cmd(&t);
    let ix = index(&blob, Compression::Gzip, SPAN).index;
    let e = ix
        .entries
        .iter()
        .filter(|e| e.kind == EntryKind::File)
        .max_by_key(|e| e.size)
        .unwrap()
        .clone();
    let spans = (ix.span_for(e.offset + e.size - 1) - ix.span_for(e.offset) + 1) as u64;
    let r = reader(ix, &blob);
    let want = &t[e.offset as usize..(e.offset + e.size) as usize];
    block_on(async {
        // Overlapping reads of the same file at once: each span is fetched by one of them.
        let reads = (0..8u64).map(|k| r.read_file(&e, k * 1000, e.size));
        for (k, got) in futures::future::join_all(reads)
            .await
            .into_iter()
            .enumerate()
        {
            assert_eq!(&got.unwrap()[..], &want[k * 1000..]);
        }
    });
    assert_eq!(r.stats().spans_fetched, spans);
}

/// Hot regions (what a recorded start read) get fine spans; elsewhere spans stay coarse, and
/// the index still tiles the stream and reads back, gzip and plain alike.
#[test]
fn hot_regions_get_fine_spans_and_the_rest_stays_coarse() {
    use talaria_artifact::index::indexer::{HotRegions, IndexOptions, index_layer_hot};
    const COARSE: u64 = 1 << 20;
    const FINE: u64 = 64 << 10;
    let tar_bytes = real_tar();
    let plain = index(&tar_bytes, Compression::None, COARSE).index;
    let libc = plain
        .find("usr/lib/x86_64-linux-gnu/libc.so.6")
        .expect("libc in the tar")
        .clone();
    // Two pieces of libc read at startup.
    let hot_a = (libc.offset + 4096, libc.offset + 300_000);
    let hot_b = (libc.offset + 1_200_000, libc.offset + 1_250_000);
    let hot = HotRegions::new([hot_b, hot_a], FINE);
    // Each region starts 128 KiB early (a checkpoint overshoots its target by a block).
    assert_eq!(
        hot.bytes(),
        (hot_a.1 - hot_a.0) + (hot_b.1 - hot_b.0) + 2 * (128 << 10)
    );
    let gz = gzip_cmd(&tar_bytes);
    for (blob, c) in [(&gz, Compression::Gzip), (&tar_bytes, Compression::None)] {
        let ix = index_layer_hot(
            blob.as_slice(),
            c,
            &IndexOptions { span_size: COARSE },
            &hot,
        )
        .expect("index")
        .index;
        assert_eq!(ix.span_size, COARSE);
        let coarse = index(blob, c, COARSE).index;
        assert!(
            ix.spans.len() > coarse.spans.len(),
            "{c:?}: fine spans added ({} vs {})",
            ix.spans.len(),
            coarse.spans.len()
        );
        // A span starting inside a hot region is fine, give or take a deflate block (a
        // checkpoint needs a block boundary; gzip -6 blocks of libc hold ~90-150 KB).
        for s in &ix.spans {
            let start = s.uncompressed_offset;
            if [hot_a, hot_b].iter().any(|h| start >= h.0 && start < h.1) {
                assert!(
                    s.uncompressed_size <= 4 * FINE,
                    "{c:?}: span at {start} in a hot region is {} bytes",
                    s.uncompressed_size
                );
            }
        }
        // The bytes of a hot region are covered by few spans, far from the coarse size.
        let (first, last) = (ix.span_for(hot_b.0), ix.span_for(hot_b.1 - 1));
        let covered: u64 = ix.spans[first..=last]
            .iter()
            .map(|s| s.uncompressed_size)
            .sum();
        assert!(
            covered < COARSE / 2,
            "{c:?}: hot region b of 50 KB costs {covered} bytes of spans"
        );
        // Spans tile the stream; the encoding round-trips; libc reads back whole.
        let mut off = 0;
        for s in &ix.spans {
            assert_eq!(s.uncompressed_offset, off);
            off += s.uncompressed_size;
        }
        assert_eq!(off, tar_bytes.len() as u64);
        let dec = LayerIndex::decode(&ix.encode()).expect("decode");
        assert_eq!(dec, ix);
        let r = reader(dec, blob);
        let e = r.index().find(&libc.path).expect("libc").clone();
        let got = block_on(r.read_file(&e, 0, e.size)).expect("read libc");
        let want = &tar_bytes[libc.offset as usize..(libc.offset + libc.size) as usize];
        assert!(got[..] == want[..], "{c:?}: libc reads back");
    }
}
