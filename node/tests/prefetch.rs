//! Startup prefetch with the real registry and the real snapshotter over gRPC: at an
//! image's first layer Prepare the node fetches its plan's spans across all its layers, so
//! reads of the plan's files need no network; a read racing the prefetch waits for it
//! instead of fetching the same bytes again; an image with only a default artifact gets a
//! generic plan.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Client, Node, connect, http_get, metric, mount_at};
use talaria_artifact::build::{BuildOptions, Recorded, build};
use talaria_artifact::format::Profile;
use talaria_artifact::oci::registry::{RegistryClient, RegistryConfig, Repository};
use talaria_artifact::oci::store::{RegistryStore, Store};
use talaria_artifact::startup::StartupTrace;
use talaria_artifact::startup::plan::StartupPlan;
use talaria_node::proto::containerd::services::snapshots::v1 as pb;
use talaria_testenv::images::{self, ImageBuilder, LayerBuilder};
use talaria_testenv::registry::Registry;
use tonic::Code;

/// The tests share two cores with everything else: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Longest the tests wait for the node to report something.
const WAIT: Duration = Duration::from_secs(90);

/// A script whose body is incompressible: the shebang makes `/bin/sh` (busybox, in the
/// first layer) part of the plan too.
fn big_script(len: usize, seed: u64) -> Vec<u8> {
    let mut out = b"#!/bin/sh\nexit 0\n".to_vec();
    out.extend(images::noise(seed, len.saturating_sub(out.len())));
    out
}

/// busybox, then a layer with `/app/run` (the command, `len` bytes).
fn app_image(len: usize, seed: u64) -> (images::Image, Vec<u8>) {
    let script = big_script(len, seed);
    let app = LayerBuilder::new()
        .dir("app", 0o755)
        .file("app/run", script.clone(), 0o755)
        .file("app/unused.txt", "not in the plan\n", 0o644)
        .build()
        .expect("app layer");
    let image = ImageBuilder::new()
        .layer(images::busybox_layer().expect("busybox layer"))
        .layer(app)
        .cmd(&["/app/run"])
        .build()
        .expect("image");
    (image, script)
}

fn store_of(registry: &str, repo: &str) -> Arc<dyn Store> {
    // The shaped registry is not on loopback: plain HTTP by name.
    let client = RegistryClient::new(RegistryConfig {
        insecure_hosts: vec![registry.to_string()],
        ..RegistryConfig::default()
    })
    .expect("registry client");
    Arc::new(RegistryStore::new(
        client,
        Repository {
            registry: registry.to_string(),
            name: repo.to_string(),
        },
    ))
}

/// Builds the artifact of `profile` (its plan from `trace` when given); returns its plan.
async fn build_artifact_with(
    registry: &str,
    repo: &str,
    tag: &str,
    profile: Profile,
    trace: Option<StartupTrace>,
) -> Option<StartupPlan> {
    let store = store_of(registry, repo);
    let mut opts = BuildOptions {
        profile,
        // Finer spans (32 KiB) where the recorded start read.
        recorded: trace.map(|trace| {
            Arc::new(Recorded {
                trace,
                hot_span_size: 32 << 10,
                pack: false,
                budget: None,
            })
        }),
        ..BuildOptions::default()
    };
    // Small spans: files span several, and merging adjacent ones matters.
    opts.knobs.span_size = 256 << 10;
    let s = build(store.clone(), tag, None, &opts)
        .await
        .unwrap_or_else(|e| panic!("build artifact of {repo}:{tag}: {e}"));
    let plan = s.plan?;
    let bytes = store
        .get_blob(&plan.digest, 1 << 20)
        .await
        .expect("read the plan");
    Some(serde_json::from_slice(&bytes).expect("plan JSON"))
}

/// Size of the windows blob of `layer`'s index in the artifact just built: bytes a node
/// fetches for that layer besides the layer's own (one window per span it inflates).
async fn windows_bytes(registry: &str, repo: &str, tag: &str, layer: &str) -> u64 {
    let store = store_of(registry, repo);
    let platform = talaria_artifact::oci::Platform::host();
    let (raw, _) = talaria_artifact::build::resolve_image(store.as_ref(), tag, &platform)
        .await
        .expect("resolve the image");
    let art = talaria_artifact::discover::resolve(store.as_ref(), &raw.digest)
        .await
        .expect("resolve the artifact")
        .expect("an artifact");
    art.layers
        .iter()
        .find(|l| l.layer_digest == layer)
        .and_then(|l| l.windows.as_ref())
        .map_or(0, |w| w.size)
}

async fn build_artifact(registry: &str, repo: &str, tag: &str, profile: Profile) {
    build_artifact_with(registry, repo, tag, profile, None).await;
}

/// Prepares layer `i` of `image` with the CRI plugin's labels; asserts the node provided it.
async fn prepare_layer(c: &mut Client, image_ref: &str, image: &images::Image, i: usize) {
    let chains = common::chain_ids(image);
    let parent = if i == 0 {
        String::new()
    } else {
        chains[i - 1].clone()
    };
    let labels = HashMap::from([
        ("containerd.io/snapshot.ref".to_string(), chains[i].clone()),
        (
            "containerd.io/snapshot/cri.image-ref".to_string(),
            image_ref.to_string(),
        ),
        (
            "containerd.io/snapshot/cri.manifest-digest".to_string(),
            image.manifest_digest.clone(),
        ),
        (
            "containerd.io/snapshot/cri.layer-digest".to_string(),
            image.layers[i].digest.clone(),
        ),
    ]);
    let res = c
        .prepare(pb::PrepareSnapshotRequest {
            snapshotter: "talaria".into(),
            key: format!("default/1/extract-{i}-{}", &chains[i][7..19]),
            parent,
            labels,
        })
        .await;
    match res {
        Err(e) if e.code() == Code::AlreadyExists => {}
        other => panic!("layer {i} was not provided lazily: {other:?}"),
    }
}

async fn mount_view(c: &mut Client, parent: &str, key: &str, target: &Path) {
    let r = c
        .view(pb::ViewSnapshotRequest {
            snapshotter: "talaria".into(),
            key: key.into(),
            parent: parent.into(),
            labels: HashMap::new(),
        })
        .await
        .unwrap_or_else(|e| panic!("view {parent}: {e}"))
        .into_inner();
    let m = &r.mounts[0];
    mount_at(&m.r#type, &m.source, &m.options, target);
}

/// Polls /metrics until `metric_name` reaches `at_least` (bounded by [`WAIT`]).
fn wait_metric(node: &Node, addr: &str, metric_name: &str, at_least: f64) -> String {
    let t0 = Instant::now();
    loop {
        let m = http_get(addr, "/metrics");
        if metric(&m, metric_name) >= at_least {
            return m;
        }
        assert!(
            t0.elapsed() < WAIT,
            "{metric_name} did not reach {at_least} within {WAIT:?}:\n{m}\n{}",
            node.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits (bounded) for the startup prefetch's trace line containing `what`.
fn wait_log(node: &Node, what: &str) {
    let t0 = Instant::now();
    loop {
        let log = node.log_text();
        if log
            .lines()
            .any(|l| l.contains("startup prefetch done") && l.contains(what))
        {
            return;
        }
        assert!(t0.elapsed() < WAIT, "no trace with {what}:\n{log}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The `layer_bytes` series of one image's layer.
fn layer_bytes(m: &str, image: &str, layer: &str, kind: &str) -> f64 {
    metric(
        m,
        &format!(
            "talaria_node_layer_bytes_total{{image=\"{image}\",layer=\"{layer}\",kind=\"{kind}\"}}"
        ),
    )
}

fn start_node(dir: &Path, extra: &[&str]) -> (Node, String) {
    let addr = format!(
        "127.0.0.1:{}",
        talaria_testenv::free_port().expect("free port")
    );
    let mut args = vec!["--metrics-addr".to_string(), addr.clone()];
    args.extend(extra.iter().map(|s| s.to_string()));
    let node = Node::start(
        &dir.join("root"),
        &dir.join("sn.sock"),
        &dir.join("node.log"),
        &args,
    );
    (node, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_prepare_prefetches_the_plan_of_all_layers_and_plan_reads_need_no_network() {
    let _serial = SERIAL.lock().await;
    talaria_artifact::oci::registry::install_crypto_provider();
    let dir = tempfile::Builder::new()
        .prefix("tlr-prefetch-")
        .tempdir()
        .expect("tempdir");
    let registry = Registry::start().expect("start registry");
    let host = registry.host();
    let (image, script) = app_image(3 << 20, 1);
    image.push(&host, "talaria/app", "v1").expect("push");
    build_artifact(&host, "talaria/app", "v1", Profile::StartupLocalV1).await;
    let (mut node, addr) = start_node(dir.path(), &[]);
    let mut c = connect(node.socket.clone()).await;
    let image_ref = format!("{host}/talaria/app:v1");

    // Only the first layer prepared: the startup prefetch covers the second one too.
    prepare_layer(&mut c, &image_ref, &image, 0).await;
    let m = wait_metric(&node, &addr, "talaria_node_startup_prefetches_total", 1.0);
    let app_layer = &image.layers[1].digest;
    let startup_app = layer_bytes(&m, &image_ref, app_layer, "startup");
    assert!(
        startup_app > (3 << 20) as f64 * 0.9,
        "the plan's script in the unprepared layer was prefetched ({startup_app} bytes):\n{m}"
    );
    assert!(
        layer_bytes(&m, &image_ref, &image.layers[0].digest, "startup") > 0.0,
        "and busybox (its interpreter) in the first layer:\n{m}"
    );
    assert!(
        metric(&m, "talaria_node_startup_prefetch_spans_total") >= 12.0,
        "{m}"
    );
    assert!(
        metric(&m, "talaria_node_startup_prefetch_requests_total") >= 2.0,
        "{m}"
    );
    assert!(
        metric(&m, "talaria_node_startup_prefetch_seconds_count") >= 1.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "talaria_node_fetched_on_demand_bytes_total"),
        0.0,
        "{m}"
    );
    wait_log(&node, "accelerated");
    // Its small files (busybox's /etc files) were copied to local disk.
    assert!(
        metric(&m, "talaria_node_materialized_files_total") >= 1.0,
        "{m}"
    );

    // The rest of the image, then the plan's files read through FUSE: no network.
    prepare_layer(&mut c, &image_ref, &image, 1).await;
    let top = common::chain_ids(&image).pop().expect("top");
    let mnt = dir.path().join("mnt");
    mount_view(&mut c, &top, "view", &mnt).await;
    let got = std::fs::read(mnt.join("app/run")).expect("read the script");
    assert!(got == script, "the script reads back intact");
    let sh = std::fs::read(mnt.join("bin/sh")).expect("read /bin/sh");
    assert_eq!(&sh[..4], b"\x7fELF");
    let m = http_get(&addr, "/metrics");
    assert_eq!(
        metric(&m, "talaria_node_fetched_on_demand_bytes_total"),
        0.0,
        "reads of plan files fetched nothing:\n{m}"
    );
    assert_eq!(layer_bytes(&m, &image_ref, app_layer, "on_demand"), 0.0);
    assert!(
        layer_bytes(&m, &image_ref, app_layer, "cache") >= script.len() as f64,
        "the script's bytes came from the cache, counted as read:\n{m}"
    );
    // A file outside the plan is fetched on demand.
    assert_eq!(
        std::fs::read_to_string(mnt.join("app/unused.txt")).expect("read"),
        "not in the plan\n"
    );
    nix::mount::umount(&mnt).expect("umount");
    // Stopped cleanly, the node unmounts its layers (a killed one leaves them mounted).
    assert!(node.signal("TERM").success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_racing_the_prefetch_waits_for_it_instead_of_fetching_again() {
    let _serial = SERIAL.lock().await;
    talaria_artifact::oci::registry::install_crypto_provider();
    let dir = tempfile::Builder::new()
        .prefix("tlr-prefetch-race-")
        .tempdir()
        .expect("tempdir");
    // Slow enough that the script's fetch is still running when the read comes.
    let registry = Registry::start_shaped(20, 5).expect("start shaped registry");
    let host = registry.host();
    let (image, script) = app_image(8 << 20, 2);
    image.push(&host, "talaria/race", "v1").expect("push");
    build_artifact(&host, "talaria/race", "v1", Profile::StartupLocalV1).await;
    let (mut node, addr) = start_node(dir.path(), &["--insecure-registry", &host]);
    let mut c = connect(node.socket.clone()).await;
    let image_ref = format!("{host}/talaria/race:v1");

    prepare_layer(&mut c, &image_ref, &image, 0).await;
    prepare_layer(&mut c, &image_ref, &image, 1).await;
    let top = common::chain_ids(&image).pop().expect("top");
    let mnt = dir.path().join("mnt");
    mount_view(&mut c, &top, "view", &mnt).await;
    let got = std::fs::read(mnt.join("app/run")).expect("read the script");
    assert!(got == script, "the script reads back intact");
    let m = wait_metric(&node, &addr, "talaria_node_startup_prefetches_total", 1.0);
    assert!(
        metric(&m, "talaria_node_read_wait_seconds_count") >= 1.0,
        "the read waited for the network:\n{m}"
    );
    let layer = &image.layers[1].digest;
    // The layer's bytes and its spans' windows (incompressible data: 32 KiB a span).
    let windows = windows_bytes(&host, "talaria/race", "v1", layer).await as f64;
    let blob = image.layers[1].blob.len() as f64 + windows;
    let fetched = layer_bytes(&m, &image_ref, layer, "startup")
        + layer_bytes(&m, &image_ref, layer, "on_demand");
    assert!(
        layer_bytes(&m, &image_ref, layer, "startup") > 0.0,
        "the prefetch fetched the script (or part of it):\n{m}"
    );
    assert!(
        fetched >= blob * 0.9 && fetched <= blob + (256 << 10) as f64,
        "the app layer ({blob} bytes with its windows) was fetched once by the prefetch and the read together, not twice ({fetched}):\n{m}"
    );
    assert!(
        metric(&m, "talaria_node_startup_read_waits_total") >= 1.0,
        "counted as a wait during the startup prefetch:\n{m}"
    );
    // The trace follows the metrics by a moment.
    let t0 = Instant::now();
    let done = loop {
        let log = node.log_text();
        if let Some(l) = log.lines().find(|l| l.contains("startup prefetch done")) {
            break l.to_string();
        }
        assert!(t0.elapsed() < WAIT, "no trace of the prefetch:\n{log}");
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!("{done}");
    let waits: u64 = done
        .split_whitespace()
        .find_map(|f| f.strip_prefix("read_waits="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no read_waits in {done}"));
    assert!(waits >= 1, "the trace counts the read that waited: {done}");
    nix::mount::umount(&mnt).expect("umount");
    // Stopped cleanly, the node unmounts its layers (a killed one leaves them mounted).
    assert!(node.signal("TERM").success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_with_only_a_default_artifact_gets_a_generic_plan() {
    let _serial = SERIAL.lock().await;
    talaria_artifact::oci::registry::install_crypto_provider();
    let dir = tempfile::Builder::new()
        .prefix("tlr-prefetch-generic-")
        .tempdir()
        .expect("tempdir");
    let registry = Registry::start().expect("start registry");
    let host = registry.host();
    let image = ImageBuilder::new()
        .layer(images::busybox_layer().expect("busybox layer"))
        .layer(
            LayerBuilder::new()
                .file("etc/motd", "generic\n", 0o644)
                .build()
                .expect("layer"),
        )
        .cmd(&["/bin/sh", "-c", "cat /etc/motd"])
        .build()
        .expect("image");
    image.push(&host, "talaria/generic", "v1").expect("push");
    build_artifact(&host, "talaria/generic", "v1", Profile::Default).await;
    let (mut node, addr) = start_node(dir.path(), &[]);
    let mut c = connect(node.socket.clone()).await;
    let image_ref = format!("{host}/talaria/generic:v1");

    prepare_layer(&mut c, &image_ref, &image, 0).await;
    let m = wait_metric(&node, &addr, "talaria_node_startup_prefetches_total", 1.0);
    assert!(
        metric(&m, "talaria_node_startup_prefetch_spans_total") >= 1.0,
        "{m}"
    );
    wait_log(&node, "plan=\"generic\"");
    // The entrypoint (busybox, on PATH) was in the generic plan.
    prepare_layer(&mut c, &image_ref, &image, 1).await;
    let top = common::chain_ids(&image).pop().expect("top");
    let mnt = dir.path().join("mnt");
    mount_view(&mut c, &top, "view", &mnt).await;
    let sh = std::fs::read(mnt.join("bin/sh")).expect("read /bin/sh");
    assert_eq!(&sh[..4], b"\x7fELF");
    let m = http_get(&addr, "/metrics");
    assert_eq!(
        metric(&m, "talaria_node_fetched_on_demand_bytes_total"),
        0.0,
        "{m}"
    );
    nix::mount::umount(&mnt).expect("umount");
    // Stopped cleanly, the node unmounts its layers (a killed one leaves them mounted).
    assert!(node.signal("TERM").success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_start_becomes_a_plan_of_the_pages_read_in_read_order() {
    use std::os::unix::fs::FileExt;
    let _serial = SERIAL.lock().await;
    talaria_artifact::oci::registry::install_crypto_provider();
    let dir = tempfile::Builder::new()
        .prefix("tlr-prefetch-record-")
        .tempdir()
        .expect("tempdir");
    let registry = Registry::start().expect("start registry");
    let host = registry.host();
    let (image, script) = app_image(3 << 20, 3);
    image.push(&host, "talaria/rec", "v1").expect("push");
    build_artifact(&host, "talaria/rec", "v1", Profile::Default).await;
    let image_ref = format!("{host}/talaria/rec:v1");

    // The recording start: no prefetch, so every byte read comes through FUSE on demand.
    let (mut node, addr) = start_node(dir.path(), &["--no-prefetch"]);
    let mut c = connect(node.socket.clone()).await;
    prepare_layer(&mut c, &image_ref, &image, 0).await;
    prepare_layer(&mut c, &image_ref, &image, 1).await;
    let top = common::chain_ids(&image).pop().expect("top");
    let mnt = dir.path().join("mnt");
    mount_view(&mut c, &top, "view", &mnt).await;
    // One page in the middle of the 3 MiB script, then a small file.
    let f = std::fs::File::open(mnt.join("app/run")).expect("open the script");
    let mut page = [0u8; 4096];
    f.read_exact_at(&mut page, 2 << 20).expect("read a page");
    assert!(page[..] == script[2 << 20..(2 << 20) + 4096]);
    drop(f);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(
        std::fs::read_to_string(mnt.join("app/unused.txt")).expect("read"),
        "not in the plan\n"
    );
    let resp = http_get(&addr, "/startup-trace");
    let body = resp.split_once("\r\n\r\n").expect("HTTP body").1;
    let trace = StartupTrace::from_json(body.as_bytes()).expect("a trace");
    nix::mount::umount(&mnt).expect("umount");
    assert!(node.signal("TERM").success());
    drop(c);

    let app = trace
        .layers
        .iter()
        .find(|l| l.digest == image.layers[1].digest)
        .unwrap_or_else(|| panic!("the app layer's reads are in the trace: {trace:?}"));
    let paths: Vec<&str> = app.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(paths, ["app/run", "app/unused.txt"], "in first-read order");
    let read: u64 = app.files[0].ranges.iter().map(|r| r.len).sum();
    assert!(
        app.files[0]
            .ranges
            .iter()
            .any(|r| r.offset <= 2 << 20 && r.offset + r.len >= (2 << 20) + 4096),
        "the page read is recorded: {:?}",
        app.files[0].ranges
    );
    assert!(
        read < 1 << 20,
        "a page and the kernel's readahead, not the file ({read} bytes)"
    );

    // The plan built from it holds the spans of what was read, not of the whole script.
    let plan = build_artifact_with(
        &host,
        "talaria/rec",
        "v1",
        Profile::StartupLocalV1,
        Some(trace.clone()),
    )
    .await
    .expect("a plan");
    let run = plan
        .entries
        .iter()
        .position(|e| e.path == "/app/run")
        .unwrap_or_else(|| panic!("the script is planned: {plan:?}"));
    let unused = plan
        .entries
        .iter()
        .position(|e| e.path == "/app/unused.txt")
        .expect("the small file is planned");
    assert!(run < unused, "plan order is read order: {plan:?}");
    let spans = &plan.entries[run].spans;
    assert!(
        !spans.is_empty() && spans.len() <= 8,
        "a page's (and readahead's) spans of 32 KiB, not the script's 12+ of 256 KiB: {spans:?}"
    );
    assert!(plan.entries.iter().all(|e| e.reason == "recorded"));

    // A new node's startup prefetch of the recorded plan brings just those spans.
    let dir2 = tempfile::Builder::new()
        .prefix("tlr-prefetch-record2-")
        .tempdir()
        .expect("tempdir");
    let (mut node, addr) = start_node(dir2.path(), &[]);
    let mut c = connect(node.socket.clone()).await;
    prepare_layer(&mut c, &image_ref, &image, 0).await;
    let m = wait_metric(&node, &addr, "talaria_node_startup_prefetches_total", 1.0);
    wait_log(&node, "accelerated");
    // Background fetch is counted apart ("background"): only the plan's spans are "startup".
    let startup = layer_bytes(&m, &image_ref, &image.layers[1].digest, "startup");
    assert!(
        startup > 0.0 && startup <= f64::from(3 * (256 << 10) + (64 << 10)),
        "the recorded spans of the app layer, not its {} bytes ({startup}):\n{m}",
        image.layers[1].blob.len()
    );
    drop(c);
    assert!(node.signal("TERM").success());
}

/// A fresh node that has pulled `image` (its startup prefetch done, with `marker` in the
/// trace line) and mounted its top snapshot.
struct PackRun {
    _dir: tempfile::TempDir,
    node: Node,
    addr: String,
    _client: Client,
    mnt: std::path::PathBuf,
}

impl PackRun {
    async fn start(prefix: &str, image_ref: &str, image: &images::Image, marker: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .expect("tempdir");
        let (node, addr) = start_node(dir.path(), &[]);
        let mut c = connect(node.socket.clone()).await;
        prepare_layer(&mut c, image_ref, image, 0).await;
        prepare_layer(&mut c, image_ref, image, 1).await;
        wait_metric(&node, &addr, "talaria_node_startup_prefetches_total", 1.0);
        wait_log(&node, marker);
        let top = common::chain_ids(image).pop().expect("top");
        let mnt = dir.path().join("mnt");
        mount_view(&mut c, &top, "view", &mnt).await;
        PackRun {
            _dir: dir,
            node,
            addr,
            _client: c,
            mnt,
        }
    }

    /// Reads the recorded page of `/app/run` and `/app/unused.txt`, checking their bytes;
    /// returns the open script.
    fn read_both(&self, script: &[u8]) -> std::fs::File {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(self.mnt.join("app/run")).expect("open the script");
        let mut page = [0u8; 4096];
        f.read_exact_at(&mut page, 2 << 20).expect("read the page");
        assert!(page[..] == script[2 << 20..(2 << 20) + 4096]);
        assert_eq!(
            std::fs::read_to_string(self.mnt.join("app/unused.txt")).expect("read"),
            "not in the plan\n"
        );
        f
    }

    fn stop(mut self) {
        nix::mount::umount(&self.mnt).expect("umount");
        assert!(self.node.signal("TERM").success());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_plan_with_a_pack_serves_the_reads_from_it() {
    use std::os::unix::fs::FileExt;
    let _serial = SERIAL.lock().await;
    talaria_artifact::oci::registry::install_crypto_provider();
    let registry = Registry::start().expect("start registry");
    let host = registry.host();
    let (image, script) = app_image(3 << 20, 5);
    image.push(&host, "talaria/pack", "v1").expect("push");
    build_artifact(&host, "talaria/pack", "v1", Profile::Default).await;
    let image_ref = format!("{host}/talaria/pack:v1");
    // As a node records it: one page of the 3 MiB script, then the small file.
    let app_layer = &image.layers[1].digest;
    let trace = StartupTrace::from_json(
        serde_json::json!({
            "version": 1,
            "layers": [{
                "digest": app_layer,
                "files": [
                    {"path": "app/run", "first_ms": 1, "ranges": [{"offset": 2 << 20, "len": 4096}]},
                    {"path": "app/unused.txt", "first_ms": 2, "ranges": [{"offset": 0, "len": 4}]}
                ]
            }]
        })
        .to_string()
        .as_bytes(),
    )
    .expect("trace");
    let store = store_of(&host, "talaria/pack");
    let mut opts = BuildOptions {
        profile: Profile::StartupLocalV1,
        recorded: Some(Arc::new(Recorded {
            trace,
            hot_span_size: 0,
            pack: true,
            budget: None,
        })),
        ..BuildOptions::default()
    };
    opts.knobs.span_size = 256 << 10;
    let s = build(store.clone(), "v1", None, &opts)
        .await
        .expect("build");
    let plan_blob = store
        .get_blob(&s.plan.expect("a plan").digest, 1 << 20)
        .await
        .expect("read the plan");
    let plan: StartupPlan = serde_json::from_slice(&plan_blob).expect("plan JSON");
    let pack = plan.pack.expect("the recorded plan has a pack");
    assert_eq!(
        pack.compression,
        talaria_artifact::startup::pack::PackCompression::Zstd,
        "new packs are zstd"
    );
    let records: Vec<(&str, u64, u64)> = pack
        .chunks
        .iter()
        .flat_map(|c| &c.records)
        .map(|r| (r.path.as_str(), r.offset, r.len))
        .collect();
    assert_eq!(
        records,
        [("app/run", 2 << 20, 4096), ("app/unused.txt", 0, 16)],
        "the page of the big file, the small file whole, in read order"
    );

    // A fresh node: the startup prefetch brings the pack (one chunk), then the reads.
    let run = PackRun::start("tlr-prefetch-pack-", &image_ref, &image, "pack_chunks=1").await;
    let f = run.read_both(&script);
    let m = http_get(&run.addr, "/metrics");
    for kind in ["startup", "on_demand", "cache"] {
        assert_eq!(
            layer_bytes(&m, &image_ref, app_layer, kind),
            0.0,
            "no span of the app layer was needed ({kind}):\n{m}"
        );
    }
    // The page of the partly packed script came through this process's read; the small file,
    // all here, was opened with kernel passthrough to its local copy.
    assert!(metric(&m, "talaria_node_fuse_read_bytes_total") >= 4096.0);
    assert!(
        metric(&m, "talaria_node_passthrough_opens_total") >= 1.0,
        "the packed small file is read by the kernel from its local copy:\n{m}"
    );
    // A page the start did not read goes through spans, as before.
    let mut page = [0u8; 4096];
    f.read_exact_at(&mut page, 1 << 20)
        .expect("read an unpacked page");
    assert!(page[..] == script[1 << 20..(1 << 20) + 4096]);
    let m = http_get(&run.addr, "/metrics");
    assert!(
        layer_bytes(&m, &image_ref, app_layer, "on_demand")
            + layer_bytes(&m, &image_ref, app_layer, "cache")
            > 0.0,
        "the unpacked page came through spans:\n{m}"
    );
    drop(f);
    run.stop();

    // A registry that serves wrong pack bytes: the chunk fails its SHA-256, the node says
    // so, and the reads still get the right bytes, through spans.
    let hex = pack.digest.trim_start_matches("sha256:");
    let data = registry.storage_dir().join(format!(
        "docker/registry/v2/blobs/sha256/{}/{hex}/data",
        &hex[..2]
    ));
    let mut bytes = std::fs::read(&data).expect("the stored pack blob");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&data, bytes).expect("corrupt the pack blob");
    let run = PackRun::start(
        "tlr-prefetch-pack-bad-",
        &image_ref,
        &image,
        "pack_chunks=0",
    )
    .await;
    let m = http_get(&run.addr, "/metrics");
    assert!(
        metric(&m, "talaria_node_prefetch_errors_total{stage=\"pack\"}") >= 1.0,
        "the bad chunk is counted:\n{m}"
    );
    let log = run.node.log_text();
    assert!(
        log.contains("startup pack: some chunks failed") && log.contains("the table says"),
        "the log names the failed digest check:\n{log}"
    );
    drop(run.read_both(&script));
    run.stop();
}
