//! talaria-node behind containerd's CRI plugin (the way kubelet pulls): an image with an
//! artifact is pulled without downloading its layers and its containers run on the lazily
//! mounted layers; an image without one is unpacked normally and runs too.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Node, http_get, metric};
use sha2::{Digest, Sha256};
use talaria_artifact::build::{BuildOptions, build};
use talaria_artifact::format::Profile;
use talaria_artifact::oci::registry::{RegistryClient, RegistryConfig, Repository};
use talaria_artifact::oci::store::{RegistryStore, Store};
use talaria_testenv::cri::{CriContainerd, CriOptions, CriSnapshotter};
use talaria_testenv::images::{self, ImageBuilder, LayerBuilder};
use talaria_testenv::registry::Registry;

const T: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_pulls_lazily_and_runs_containers() {
    talaria_artifact::oci::registry::install_crypto_provider();
    let dir = tempfile::Builder::new()
        .prefix("tlr-node-cri-")
        .tempdir()
        .expect("tempdir");
    let registry = Registry::start().expect("start registry");
    let host = registry.host();
    let payload: Vec<u8> = (0..2_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let lazy = ImageBuilder::new()
        .layer(images::busybox_layer().expect("busybox"))
        .layer(
            LayerBuilder::new()
                .dir("app", 0o755)
                .file("app/hello.txt", "served lazily\n", 0o644)
                .file("app/payload.bin", payload.clone(), 0o644)
                .build()
                .expect("app layer"),
        )
        .cmd(&["/bin/sh"])
        .build()
        .expect("image");
    lazy.push(&host, "talaria/cri-lazy", "v1").expect("push");
    let client = RegistryClient::new(RegistryConfig::default()).expect("client");
    let store: Arc<dyn Store> = Arc::new(RegistryStore::new(
        client,
        Repository {
            registry: host.clone(),
            name: "talaria/cri-lazy".into(),
        },
    ));
    let opts = BuildOptions {
        profile: Profile::Default,
        ..BuildOptions::default()
    };
    build(store, "v1", None, &opts)
        .await
        .expect("build artifact");
    // Shares busybox with the lazy image; its own layer has no artifact.
    ImageBuilder::new()
        .layer(images::busybox_layer().expect("busybox"))
        .layer(
            LayerBuilder::new()
                .file("plain.txt", "unpacked\n", 0o644)
                .build()
                .expect("plain layer"),
        )
        .cmd(&["/bin/sh"])
        .build()
        .expect("plain image")
        .push(&host, "talaria/plain", "v1")
        .expect("push plain");

    let socket = dir.path().join("sn.sock");
    let addr = format!(
        "127.0.0.1:{}",
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .port()
    );
    let node = Node::start(
        &dir.path().join("root"),
        &socket,
        &dir.path().join("node.log"),
        &["--metrics-addr".into(), addr.clone()],
    );
    let env = CriContainerd::start(CriOptions {
        snapshotter: CriSnapshotter::Proxy {
            name: "talaria".into(),
            socket: socket.clone(),
        },
        ..CriOptions::default()
    })
    .expect("start containerd with CRI");
    env.allow_plain_http(&host).expect("plain http");
    let cri = env.client().await.expect("CRI client");

    // With an artifact: both layers mounted lazily; the blobs are never downloaded.
    let image = format!("{host}/talaria/cri-lazy:v1");
    cri.pull_image(&image).await.expect("PullImage (lazy)");
    let m = http_get(&addr, "/metrics");
    assert_eq!(
        metric(&m, "talaria_node_mount_seconds_count"),
        2.0,
        "both layers mounted lazily:\n{m}\n{}",
        node.log_text()
    );
    let pod = cri.run_pod("lazy").await.expect("pod");
    let out = cri
        .run_to_exit(
            &pod,
            "hello",
            &image,
            &[
                "sh",
                "-c",
                "cat /app/hello.txt; sha256sum /app/payload.bin; ls /bin | wc -l",
            ],
            T,
        )
        .await
        .expect("run on lazy layers");
    assert_eq!(out.exit_code, 0, "{out:?}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.first(), Some(&"served lazily"), "{out:?}");
    let want = hex::encode(Sha256::digest(&payload));
    assert!(
        lines.get(1).is_some_and(|l| l.starts_with(&want)),
        "{out:?}"
    );
    assert!(
        lines
            .get(2)
            .and_then(|n| n.trim().parse::<u32>().ok())
            .is_some_and(|n| n > 100),
        "busybox applets: {out:?}"
    );
    let m = http_get(&addr, "/metrics");
    // Fetched on demand or by the background fetch, whichever came first.
    assert!(
        metric(&m, "talaria_node_fetched_on_demand_bytes_total")
            + metric(&m, "talaria_node_prefetched_bytes_total")
            > 0.0,
        "{m}"
    );

    // Without an artifact: the fallback unpacks it and it runs just the same.
    let plain = format!("{host}/talaria/plain:v1");
    cri.pull_image(&plain).await.expect("PullImage (fallback)");
    let out = cri
        .run_to_exit(&pod, "plain", &plain, &["cat", "/plain.txt"], T)
        .await
        .expect("run on unpacked layers");
    assert_eq!(out.stdout, "unpacked\n", "{out:?}");
    let m = http_get(&addr, "/metrics");
    assert!(
        metric(&m, "talaria_node_fallbacks_total{reason=\"no_artifact\"}") >= 1.0,
        "{m}"
    );
    // busybox was not mounted again: the snapshot of its chain is shared.
    assert_eq!(metric(&m, "talaria_node_mount_seconds_count"), 2.0, "{m}");
    let log = node.log_text();
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains(" WARN ")).collect();
    assert!(warnings.is_empty(), "{}", warnings.join("\n"));
    cri.remove_pod(&pod).await.expect("remove pod");
    drop(env);
    drop(node);
}
