//! Layer-index benchmark (run through `hack/bench-index.sh`, release build).
//!
//! Usage: bench_index <layer.tar.gz> [span_size]
//! Prints: indexing throughput vs `gzip -dc > /dev/null` on the same blob, the indexer's peak
//! RSS, the encoded index size relative to the blob, and the cost of reading one 1 MiB file
//! at ~80% of the layer through the index vs decompressing up to it.

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use talaria_artifact::index::indexer::{IndexOptions, index_layer};
use talaria_artifact::index::reader::{LayerReader, MemorySpanCache};
use talaria_artifact::index::{Compression, EntryKind, LayerIndex};
use talaria_artifact::source::FileSource;

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|v| v.parse().unwrap_or(0)))
        })
        .unwrap_or(0)
}

fn gzip_dc_seconds(path: &str) -> f64 {
    let t = Instant::now();
    let ok = Command::new("gzip")
        .args(["-dc", path])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "gzip -dc failed");
    t.elapsed().as_secs_f64()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(path) = args.get(1) else {
        eprintln!("usage: bench_index <layer.tar.gz> [span_size]");
        std::process::exit(2);
    };
    let span_size: u64 = args
        .get(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(4 * 1024 * 1024);
    let blob_size = std::fs::metadata(path).expect("stat blob").len();

    // Indexing first, so the peak RSS below is the indexer's.
    let t = Instant::now();
    let file = std::fs::File::open(path).expect("open blob");
    let out = index_layer(file, Compression::Gzip, &IndexOptions { span_size }).expect("index");
    let index_secs = t.elapsed().as_secs_f64();
    let rss_mib = peak_rss_kib() as f64 / 1024.0;
    let ix = out.index;
    let usize_mib = ix.uncompressed_size as f64 / (1024.0 * 1024.0);

    // gzip -dc on the same blob, best of two runs (the machine is shared).
    let gzip_secs = gzip_dc_seconds(path).min(gzip_dc_seconds(path));

    let enc = ix.encode();
    let t = Instant::now();
    let decoded = LayerIndex::decode(&enc).expect("decode");
    let decode_ms = t.elapsed().as_secs_f64() * 1000.0;
    assert!(decoded == ix);

    println!("layer: {path}");
    println!(
        "  compressed {:.1} MiB, uncompressed {usize_mib:.1} MiB, {} entries, {} spans (span {} KiB)",
        blob_size as f64 / 1048576.0,
        ix.entries.len(),
        ix.spans.len(),
        span_size / 1024
    );
    println!(
        "indexing: {index_secs:.2} s = {:.0} MiB/s uncompressed; gzip -dc: {gzip_secs:.2} s = {:.0} MiB/s; ratio {:.0}% of gzip -dc",
        usize_mib / index_secs,
        usize_mib / gzip_secs,
        100.0 * gzip_secs / index_secs
    );
    println!("indexer peak RSS: {rss_mib:.1} MiB");
    let windows: usize = ix.spans.iter().map(|s| s.window.len()).sum();
    println!(
        "index: {} bytes = {:.3}% of the compressed blob (windows {} bytes), decode {decode_ms:.1} ms",
        enc.len(),
        100.0 * enc.len() as f64 / blob_size as f64,
        windows
    );

    // One file of >= 1 MiB closest to 80% of the layer; read 1 MiB of it.
    let target = ix.uncompressed_size / 10 * 8;
    let Some(entry) = ix
        .entries
        .iter()
        .filter(|e| e.kind == EntryKind::File && e.size >= 1 << 20)
        .min_by_key(|e| e.offset.abs_diff(target))
        .cloned()
    else {
        println!("no file of 1 MiB or more in the layer");
        return;
    };
    let ix = Arc::new(ix);
    let reader = LayerReader::new(
        ix.clone(),
        Arc::new(FileSource::open(std::path::Path::new(path)).expect("open source")),
        Arc::new(MemorySpanCache::new(256 << 20)),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let t = Instant::now();
    let data = rt
        .block_on(reader.read_file(&entry, 0, 1 << 20))
        .expect("read file");
    let read_ms = t.elapsed().as_secs_f64() * 1000.0;
    let st = reader.stats();
    let first = ix.span_for(entry.offset);
    let last = ix.span_for(entry.offset + (1 << 20) - 1);
    println!(
        "read 1 MiB of {} at {:.0}% of the layer: {read_ms:.1} ms, {} compressed bytes fetched ({} spans {first}..={last}, all verified)",
        entry.path,
        100.0 * entry.offset as f64 / ix.uncompressed_size as f64,
        st.compressed_bytes_fetched,
        st.spans_fetched
    );

    // Without an index: decompress from the start up to the end of that megabyte.
    let t = Instant::now();
    let mut dec = flate2::read::GzDecoder::new(std::fs::File::open(path).expect("open blob"));
    let mut left = entry.offset + (1 << 20);
    let mut buf = vec![0u8; 1 << 20];
    let mut last_chunk = Vec::new();
    while left > 0 {
        let n = dec
            .read(&mut buf[..(left.min(1 << 20)) as usize])
            .expect("inflate");
        assert!(n > 0);
        left -= n as u64;
        if left < 1 << 20 {
            last_chunk.extend_from_slice(&buf[..n]);
        }
    }
    let full_ms = t.elapsed().as_secs_f64() * 1000.0;
    let tail = &last_chunk[last_chunk.len().saturating_sub(data.len())..];
    assert_eq!(
        tail,
        &data[..],
        "index read differs from sequential decompression"
    );
    let compressed_needed = ix.compressed_range(last).1;
    println!(
        "  vs full decompression to reach it: {full_ms:.1} ms, {compressed_needed} compressed bytes ({:.1}x more bytes, {:.1}x slower)",
        compressed_needed as f64 / st.compressed_bytes_fetched.max(1) as f64,
        full_ms / read_ms
    );
}
