//! Mounting layers one after another, some unmounted between (as a node does), keeps the
//! process small: fuser's 16 MiB request buffers (three a mount) must stay mapped and
//! untouched, not come zero-filled from the heap (~30 MiB resident a mount).

mod common;

use std::sync::Arc;

use talaria_artifact::index::reader::{LayerReader, MemorySpanCache};
use talaria_artifact::source::FileSource;
use talaria_node::metrics::Metrics;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .expect("/proc/self/status")
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

#[test]
fn mounting_many_layers_keeps_the_buffers_out_of_memory() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o644);
    h.set_size(3);
    h.set_entry_type(tar::EntryType::Regular);
    b.append_data(&mut h, "a", &b"abc"[..]).expect("tar entry");
    let tar = b.into_inner().expect("tar");
    let (reader, blob) = common::tar_layer_reader(tmp.path(), &tar);
    let index = reader.index().clone();
    let rt = common::runtime(1);
    let metrics = Arc::new(Metrics::new());
    let before = rss_kib();
    let mut live = Vec::new();
    for i in 0..12 {
        let reader = Arc::new(LayerReader::new(
            index.clone(),
            Arc::new(FileSource::open(&blob).expect("open blob")),
            Arc::new(MemorySpanCache::new(1 << 20)),
        ));
        let fs_ = common::layer_fs(reader, &rt, metrics.clone());
        let mnt = tmp.path().join(format!("mnt{i}"));
        std::fs::create_dir_all(&mnt).expect("mountpoint");
        live.push(fs_.mount(&mnt).expect("mount FUSE"));
        assert_eq!(std::fs::read(mnt.join("a")).expect("read"), b"abc");
        if i % 3 == 2 {
            live.remove(0).unmount().expect("unmount");
        }
    }
    let grown = rss_kib().saturating_sub(before);
    for s in live {
        s.unmount().expect("unmount");
    }
    // 8 mounts alive: ~250 MiB if their buffers were zero-filled heap blocks.
    assert!(
        grown < 16 * 1024,
        "resident memory grew {grown} KiB over 12 mounts"
    );
}
