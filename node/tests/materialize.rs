//! A layer mounted with real FUSE serves a materialized file from local disk: reading it
//! needs no byte of the layer blob, so it still reads when the blob cannot be read at all,
//! while a file that is not materialized fails with EIO.

mod common;

use std::fs;
use std::path::Path;
use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use talaria_node::content::materialize::Materializer;
use talaria_node::metrics::Metrics;

fn content(seed: u8, n: usize) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
}

fn layer_tar(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_mtime(1);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, path, *data).expect("tar entry");
    }
    b.into_inner().expect("tar")
}

fn read_err(path: &Path) -> Option<i32> {
    fs::read(path).err().and_then(|e| e.raw_os_error())
}

#[test]
fn materialized_file_reads_without_the_blob() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let hot = content(1, 3000);
    let cold = content(2, 200_000);
    let tar = layer_tar(&[("app/hot.conf", &hot), ("app/cold.bin", &cold)]);
    let (reader, blob) = common::tar_layer_reader(tmp.path(), &tar);
    let digest = reader.index().compressed_digest_string();

    let m = Arc::new(
        Materializer::open(&tmp.path().join("materialized"), 1 << 20, 16, 64 * 1024)
            .expect("materializer"),
    );
    assert!(m.put(&digest, "/app/hot.conf", &hot).expect("put"));

    let rt = common::runtime(2);
    let metrics = Arc::new(Metrics::new());
    let read_bytes = Counter::default();
    let fs_ = common::layer_fs(reader.clone(), &rt, metrics.clone())
        .with_materialized(m.clone(), digest.clone())
        .with_read_bytes_counter(read_bytes.clone());
    let mnt = tmp.path().join("mnt");
    fs::create_dir_all(&mnt).expect("mountpoint");
    let session = fs_.mount(&mnt).expect("mount FUSE");

    // The blob is gone: every span read from it fails from now on.
    fs::OpenOptions::new()
        .write(true)
        .open(&blob)
        .and_then(|f| f.set_len(0))
        .expect("truncate blob");

    assert_eq!(fs::read(mnt.join("app/hot.conf")).expect("read hot"), hot);
    assert_eq!(
        reader.stats().compressed_bytes_fetched,
        0,
        "nothing fetched for a materialized file"
    );
    if metrics.passthrough_opens.get() == 1 {
        // The kernel took passthrough: it read the local copy, this process saw no read.
        assert_eq!(read_bytes.get(), 0, "no read came to the FUSE server");
    } else {
        assert_eq!(
            read_bytes.get(),
            hot.len() as u64,
            "bytes returned to the kernel"
        );
    }

    assert_eq!(read_err(&mnt.join("app/cold.bin")), Some(libc::EIO));
    assert!(metrics.read_errors.get() >= 1);

    // Without the local copy the same file goes through the span path, and fails too.
    m.remove_layer(&digest);
    session.unmount().expect("unmount");
    let fs2 = common::layer_fs(reader, &rt, metrics).with_materialized(m, digest);
    let session = fs2.mount(&mnt).expect("mount FUSE again");
    assert_eq!(read_err(&mnt.join("app/hot.conf")), Some(libc::EIO));
    session.unmount().expect("unmount");
}
