//! Lazy-layer numbers with the real registry and FUSE: time to Prepare (resolve, mount,
//! commit) a remote layer, and read throughput of a large file through the mount, cold
//! (spans fetched from the registry) and warm (page cache dropped, spans from the span cache).
//!
//! `cargo bench -p talaria-node --bench lazy_read` (root, FUSE). `TALARIA_BENCH_MIB` sets the
//! file size (default 256).

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use common::{Node, connect, mount_at};
use talaria_artifact::build::{BuildOptions, build};
use talaria_artifact::format::Profile;
use talaria_artifact::oci::registry::{RegistryClient, RegistryConfig, Repository};
use talaria_artifact::oci::store::{RegistryStore, Store};
use talaria_node::proto::containerd::services::snapshots::v1 as pb;
use talaria_testenv::images::{ImageBuilder, LayerBuilder};
use talaria_testenv::registry::Registry;

fn drop_page_cache() {
    // Best effort: without it the warm number includes the page cache.
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

fn main() {
    let mib: usize = std::env::var("TALARIA_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(mib));
}

async fn run(mib: usize) {
    talaria_artifact::oci::registry::install_crypto_provider();
    let dir = tempfile::Builder::new()
        .prefix("tlr-bench-")
        .tempdir()
        .expect("tempdir");
    let registry = Registry::start().expect("registry");
    let host = registry.host();
    // Half-compressible content, like binaries.
    let mut data = Vec::with_capacity(mib << 20);
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    while data.len() < mib << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes()[..4]);
        data.extend_from_slice(&[0u8; 4]);
    }
    let layer = LayerBuilder::new()
        .file("big.bin", data, 0o644)
        .build()
        .expect("layer");
    let image = ImageBuilder::new()
        .layer(layer)
        .cmd(&["/big.bin"])
        .build()
        .expect("image");
    image.push(&host, "bench/big", "v1").expect("push");
    let store: Arc<dyn Store> = Arc::new(RegistryStore::new(
        RegistryClient::new(RegistryConfig::default()).expect("client"),
        Repository {
            registry: host.clone(),
            name: "bench/big".into(),
        },
    ));
    let t = Instant::now();
    build(
        store,
        "v1",
        None,
        &BuildOptions {
            profile: Profile::Default,
            ..BuildOptions::default()
        },
    )
    .await
    .expect("build");
    println!("artifact build: {:?}", t.elapsed());

    let socket = dir.path().join("sn.sock");
    let _node = Node::start(
        &dir.path().join("root"),
        &socket,
        &dir.path().join("node.log"),
        &["--no-prefetch".into()],
    );
    let mut c = connect(socket).await;
    let l = &image.layers[0];
    let labels = HashMap::from([
        ("containerd.io/snapshot.ref".to_string(), l.diff_id.clone()),
        (
            "containerd.io/snapshot/cri.image-ref".to_string(),
            format!("{host}/bench/big:v1"),
        ),
        (
            "containerd.io/snapshot/cri.manifest-digest".to_string(),
            image.manifest_digest.clone(),
        ),
        (
            "containerd.io/snapshot/cri.layer-digest".to_string(),
            l.digest.clone(),
        ),
    ]);
    let t = Instant::now();
    let e = c
        .prepare(pb::PrepareSnapshotRequest {
            snapshotter: "talaria".into(),
            key: "extract".into(),
            parent: String::new(),
            labels,
        })
        .await
        .expect_err("provided");
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e}");
    println!("prepare (resolve + mount + commit): {:?}", t.elapsed());
    let v = c
        .view(pb::ViewSnapshotRequest {
            snapshotter: "talaria".into(),
            key: "view".into(),
            parent: l.diff_id.clone(),
            labels: HashMap::new(),
        })
        .await
        .expect("view")
        .into_inner();
    let m = &v.mounts[0];
    let mnt = dir.path().join("mnt");
    mount_at(&m.r#type, &m.source, &m.options, &mnt);
    let path = mnt.join("big.bin");
    for pass in ["cold (registry)", "warm (span cache)"] {
        drop_page_cache();
        let t = Instant::now();
        let n = std::fs::read(&path).expect("read").len();
        let s = t.elapsed().as_secs_f64();
        println!(
            "read {pass}: {} MiB in {s:.2}s = {:.0} MiB/s",
            n >> 20,
            (n >> 20) as f64 / s
        );
    }
    nix::mount::umount(&mnt).expect("umount");
}
