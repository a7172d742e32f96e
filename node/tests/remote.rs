//! Remote (lazy) layers with the real registry, FUSE and containerd: layers Prepared with
//! the CRI plugin's labels are mounted from their Talaria artifact instead of downloaded,
//! and the tree seen through them equals what containerd's overlayfs snapshotter unpacks;
//! an image without an artifact falls back; a dead registry gives EIO within the read
//! timeout while cached layers keep reading; a restarted node brings its snapshots back.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Client, Node, connect, http_get, metric, mount_at, tree, tree_diff};
use talaria_artifact::build::{BuildOptions, build};
use talaria_artifact::format::Profile;
use talaria_artifact::oci::registry::{RegistryClient, RegistryConfig, Repository};
use talaria_artifact::oci::store::{RegistryStore, Store};
use talaria_node::proto::containerd::services::snapshots::v1 as pb;
use talaria_testenv::containerd::Containerd;
use talaria_testenv::images::{self, ImageBuilder, Layer, LayerBuilder};
use talaria_testenv::registry::Registry;
use tonic::Code;

const READ_TIMEOUT_SECS: u64 = 3;

/// A PAX extended header carrying `records` for the entry that follows.
fn pax(b: &mut tar::Builder<Vec<u8>>, records: &[(&str, &[u8])]) {
    let mut body = Vec::new();
    for (k, v) in records {
        let rest = k.len() + v.len() + 3; // ' ', '=', '\n'
        let mut len = rest + 1;
        while len != rest + len.to_string().len() {
            len = rest + len.to_string().len();
        }
        body.extend_from_slice(format!("{len} {k}=").as_bytes());
        body.extend_from_slice(v);
        body.push(b'\n');
    }
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::XHeader);
    h.set_size(body.len() as u64);
    h.set_mode(0o644);
    b.append_data(&mut h, "PaxHeaders/x", body.as_slice())
        .expect("pax header");
}

fn entry(
    b: &mut tar::Builder<Vec<u8>>,
    kind: tar::EntryType,
    path: &str,
    mode: u32,
    owner: u64,
    data: &[u8],
) {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(owner);
    h.set_gid(owner);
    h.set_mtime(1_700_000_000);
    h.set_size(data.len() as u64);
    b.append_data(&mut h, path, data).expect("tar entry");
}

/// A layer with what a generic builder cannot express: xattrs, devices, a fifo, owners.
fn rich_layer(seed: u64) -> Layer {
    use tar::EntryType as T;
    let mut b = tar::Builder::new(Vec::new());
    entry(&mut b, T::Directory, "srv/", 0o750, 1000, b"");
    pax(
        &mut b,
        &[
            ("SCHILY.xattr.user.talaria", b"lazy"),
            ("SCHILY.xattr.user.empty", b""),
        ],
    );
    entry(
        &mut b,
        T::Regular,
        "srv/xattr.txt",
        0o640,
        1000,
        b"has xattrs\n",
    );
    entry(
        &mut b,
        T::Regular,
        "srv/suid",
        0o4755,
        0,
        b"#!/bin/sh\necho suid\n",
    );
    entry(&mut b, T::Fifo, "srv/fifo", 0o600, 1000, b"");
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(T::Char);
    h.set_mode(0o666);
    h.set_device_major(1).expect("major");
    h.set_device_minor(3).expect("minor");
    h.set_size(0);
    b.append_data(&mut h, "srv/null", std::io::empty())
        .expect("char dev");
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(T::Link);
    h.set_mode(0o640);
    h.set_size(0);
    b.append_link(&mut h, "srv/xattr-link.txt", "srv/xattr.txt")
        .expect("hard link");
    entry(
        &mut b,
        T::Regular,
        "srv/big.bin",
        0o644,
        0,
        &big_content(seed),
    );
    Layer::from_tar(&b.into_inner().expect("tar")).expect("layer")
}

/// The test's registry process stopped (SIGSTOP) until dropped: a registry that hangs.
struct Paused(nix::unistd::Pid);

impl Paused {
    fn new(registry: &Registry) -> Paused {
        // Found by its config path, unique to this registry's temp dir.
        let config = registry.dir().join("config.yml");
        let config = config.to_string_lossy();
        let pid = std::fs::read_dir("/proc")
            .expect("/proc")
            .filter_map(|e| {
                let e = e.ok()?;
                let pid: i32 = e.file_name().to_str()?.parse().ok()?;
                let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
                cmd.split(|b| *b == 0)
                    .any(|a| a == config.as_bytes())
                    .then_some(pid)
            })
            .next()
            .unwrap_or_else(|| panic!("no registry process serving {config}"));
        let pid = nix::unistd::Pid::from_raw(pid);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP registry");
        Paused(pid)
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(self.0, nix::sys::signal::Signal::SIGCONT);
    }
}

/// `srv/big.bin` of `rich_layer(seed)`: large enough for several spans of a small span
/// size, incompressible.
fn big_content(seed: u64) -> Vec<u8> {
    images::noise(seed, 3 << 20)
}

/// Two layers: busybox plus extras, then a layer with a whiteout, an opaque dir and more.
fn lazy_image() -> images::Image {
    let base = images::busybox_layer_builder()
        .expect("busybox layer")
        .dir("data", 0o750)
        .file("data/a.txt", "alpha\n", 0o600)
        .hardlink("data/a-link.txt", "data/a.txt")
        .symlink("data/rel", "a.txt")
        .dir("data/old", 0o755)
        .file("data/old/gone.txt", "hidden by an opaque dir\n", 0o644)
        .build()
        .expect("base layer");
    let top = LayerBuilder::new()
        .file("msg.txt", "from layer two\n", 0o644)
        .whiteout("etc/group")
        .dir("data", 0o750)
        .file("data/b.sh", "#!/bin/sh\necho b\n", 0o4755)
        .dir("data/old", 0o700)
        .opaque_dir("data/old")
        .file("data/old/new.txt", "after the opaque marker\n", 0o640)
        .build()
        .expect("top layer");
    ImageBuilder::new()
        .layer(base)
        .layer(top)
        .layer(rich_layer(1))
        .cmd(&["/bin/sh"])
        .build()
        .expect("image")
}

fn single_layer_image(layer: Layer) -> images::Image {
    ImageBuilder::new()
        .layer(layer)
        .cmd(&["/bin/sh"])
        .build()
        .expect("image")
}

/// Builds and pushes the Talaria artifact of `registry/repo:tag`, as `talaria build` does.
async fn build_artifact(registry: &str, repo: &str, tag: &str, profile: Profile) {
    let client = RegistryClient::new(RegistryConfig::default()).expect("registry client");
    let store: Arc<dyn Store> = Arc::new(RegistryStore::new(
        client,
        Repository {
            registry: registry.to_string(),
            name: repo.to_string(),
        },
    ));
    let mut opts = BuildOptions {
        profile,
        ..BuildOptions::default()
    };
    // Small spans: the 3 MiB file spans several, so reads fetch only parts of it.
    opts.knobs.span_size = 256 << 10;
    let summary = build(store, tag, None, &opts)
        .await
        .unwrap_or_else(|e| panic!("build artifact of {repo}:{tag}: {e}"));
    assert!(
        summary.layers.iter().all(|l| l.index.is_some()),
        "every layer indexed: {:?}",
        summary.layers
    );
}

/// Prepares every layer of `image` as containerd's CRI plugin does (remote-snapshot
/// labels); returns, per layer, whether the node provided it (AlreadyExists) or handed out
/// an active snapshot for a normal unpack.
async fn prepare_layers(c: &mut Client, image_ref: &str, image: &images::Image) -> Vec<bool> {
    let chains = common::chain_ids(image);
    let mut provided = Vec::new();
    for (i, (l, chain)) in image.layers.iter().zip(&chains).enumerate() {
        let parent = if i == 0 {
            String::new()
        } else {
            chains[i - 1].clone()
        };
        let labels = HashMap::from([
            ("containerd.io/snapshot.ref".to_string(), chain.clone()),
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
                l.digest.clone(),
            ),
        ]);
        let key = format!("default/1/extract-{i}-{}", &chain[7..19]);
        let res = c
            .prepare(pb::PrepareSnapshotRequest {
                snapshotter: "talaria".into(),
                key: key.clone(),
                parent: parent.clone(),
                labels,
            })
            .await;
        match res {
            Err(e) if e.code() == Code::AlreadyExists => {
                let info = stat(c, chain).await.expect("provided snapshot exists");
                assert_eq!(info.kind, pb::Kind::Committed as i32);
                assert_eq!(info.parent, parent);
                assert_eq!(
                    info.labels.get("containerd.io/snapshot.ref"),
                    Some(chain),
                    "containerd's metadata finds it by this label"
                );
                provided.push(true);
            }
            Ok(_) => {
                // Fallback: unpack as containerd would (here: nothing), then clean up.
                c.remove(pb::RemoveSnapshotRequest {
                    snapshotter: "talaria".into(),
                    key,
                })
                .await
                .expect("remove the fallback's active snapshot");
                provided.push(false);
            }
            Err(e) => panic!("prepare layer {i}: {e}"),
        }
    }
    provided
}

async fn stat(c: &mut Client, key: &str) -> Option<pb::Info> {
    c.stat(pb::StatSnapshotRequest {
        snapshotter: "talaria".into(),
        key: key.into(),
    })
    .await
    .ok()
    .and_then(|r| r.into_inner().info)
}

/// Mounts a view of committed `parent` at `target`; returns the view's key.
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
    assert_eq!(r.mounts.len(), 1, "{:?}", r.mounts);
    let m = &r.mounts[0];
    mount_at(&m.r#type, &m.source, &m.options, target);
}

async fn unmount_view(c: &mut Client, key: &str, target: &Path) {
    nix::mount::umount(target).expect("umount view");
    c.remove(pb::RemoveSnapshotRequest {
        snapshotter: "talaria".into(),
        key: key.into(),
    })
    .await
    .expect("remove view");
}

/// The tree of the image containerd's overlayfs snapshotter unpacked (the only image there).
fn overlayfs_tree(ctd: &Containerd, top_chain: &str, dir: &Path) -> BTreeMap<String, String> {
    let out = ctd
        .ctr_stdout(&[
            "snapshots",
            "--snapshotter",
            "overlayfs",
            "view",
            "--mounts",
            "tree-overlayfs",
            top_chain,
        ])
        .expect("ctr snapshots view");
    let mounts: Vec<serde_json::Value> = serde_json::from_str(&out).expect("mounts JSON");
    let m = &mounts[0];
    let options: Vec<String> = m["Options"]
        .as_array()
        .expect("Options")
        .iter()
        .filter_map(|o| o.as_str().map(str::to_string))
        .collect();
    let target = dir.join("mnt-overlayfs");
    mount_at(
        m["Type"].as_str().expect("Type"),
        m["Source"].as_str().expect("Source"),
        &options,
        &target,
    );
    let t = tree(&target);
    nix::mount::umount(&target).expect("umount");
    // containerd's garbage collector may have taken the unreferenced view already.
    if let Err(e) = ctd.ctr(&[
        "snapshots",
        "--snapshotter",
        "overlayfs",
        "rm",
        "tree-overlayfs",
    ]) {
        assert!(e.to_string().contains("not found"), "remove the view: {e}");
    }
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_layers_mount_lazily_and_fall_back_safely() {
    talaria_artifact::oci::registry::install_crypto_provider();
    let dir = tempfile::Builder::new()
        .prefix("tlr-remote-")
        .tempdir()
        .expect("tempdir");
    let mut registry = Registry::start().expect("start registry");
    let host = registry.host();

    // Images: A (3 layers, accelerated artifact), B (default artifact), C (none), D (default
    // artifact, never read before the registry goes away).
    let a = lazy_image();
    a.push(&host, "talaria/lazy", "v1").expect("push A");
    build_artifact(&host, "talaria/lazy", "v1", Profile::StartupLocalV1).await;
    let b = single_layer_image(
        LayerBuilder::new()
            .dir("b", 0o755)
            .file("b/data.txt", vec![b'b'; 200_000], 0o644)
            .build()
            .expect("layer B"),
    );
    b.push(&host, "talaria/b", "v1").expect("push B");
    build_artifact(&host, "talaria/b", "v1", Profile::Default).await;
    let c_img = single_layer_image(
        LayerBuilder::new()
            .file("c.txt", "no artifact\n", 0o644)
            .build()
            .expect("layer C"),
    );
    c_img.push(&host, "talaria/c", "v1").expect("push C");
    // Its own content: spans are cached by digest across images.
    let d = single_layer_image(rich_layer(2));
    d.push(&host, "talaria/d", "v1").expect("push D");
    build_artifact(&host, "talaria/d", "v1", Profile::Default).await;

    let root = dir.path().join("root");
    let socket = dir.path().join("sn.sock");
    let metrics_addr = format!(
        "127.0.0.1:{}",
        talaria_testenv::free_port().expect("free port")
    );
    let mut node = Node::start(
        &root,
        &socket,
        &dir.path().join("node.log"),
        &[
            "--read-timeout".into(),
            format!("{READ_TIMEOUT_SECS}s"),
            "--metrics-addr".into(),
            metrics_addr.clone(),
            // Reads must find D uncached when the registry stops.
            "--no-prefetch".into(),
        ],
    );
    let ctd = Containerd::start_with_config(&format!(
        "[proxy_plugins.talaria]\n  type = \"snapshot\"\n  address = \"{}\"\n",
        socket.display()
    ))
    .expect("start containerd");
    let mut c = connect(socket.clone()).await;

    // A: every layer provided lazily; the tree equals containerd's own unpack.
    let a_ref = format!("{host}/talaria/lazy:v1");
    let t0 = Instant::now();
    assert_eq!(prepare_layers(&mut c, &a_ref, &a).await, [true, true, true]);
    eprintln!("A: 3 layers prepared lazily in {:?}", t0.elapsed());
    let a_chains = common::chain_ids(&a);
    let a_top = a_chains.last().expect("top").clone();
    let mnt = dir.path().join("mnt-a");
    mount_view(&mut c, &a_top, "view-a", &mnt).await;
    let t1 = Instant::now();
    let ours = tree(&mnt);
    eprintln!("A: tree read cold through FUSE in {:?}", t1.elapsed());
    let t2 = Instant::now();
    let again = tree(&mnt);
    eprintln!("A: tree read warm in {:?}", t2.elapsed());
    assert_eq!(ours, again);
    unmount_view(&mut c, "view-a", &mnt).await;
    ctd.ctr(&[
        "images",
        "pull",
        "--plain-http",
        "--snapshotter",
        "overlayfs",
        &a_ref,
    ])
    .expect("ctr pull (overlayfs)");
    let theirs = overlayfs_tree(&ctd, &a_top, dir.path());
    assert!(ours.len() > 100, "busybox has hundreds of entries");
    assert!(ours.contains_key("data/old/new.txt") && !ours.contains_key("data/old/gone.txt"));
    assert!(!ours.contains_key("etc/group"), "whiteout applied");
    assert!(
        ours.get("srv/xattr.txt")
            .is_some_and(|v| v.contains("user.talaria=lazy")),
        "{:?}",
        ours.get("srv/xattr.txt")
    );
    let diff = tree_diff(&ours, &theirs);
    assert!(diff.is_empty(), "trees differ:\n{}", diff.join("\n"));

    // C: no artifact → the layer is unpacked normally, the fallback counted; a plain pull
    // through the snapshotter works.
    let c_ref = format!("{host}/talaria/c:v1");
    assert_eq!(prepare_layers(&mut c, &c_ref, &c_img).await, [false]);
    let m = http_get(&metrics_addr, "/metrics");
    assert!(
        metric(&m, "talaria_node_fallbacks_total{reason=\"no_artifact\"}") >= 1.0,
        "{m}"
    );
    ctd.ctr(&[
        "images",
        "pull",
        "--plain-http",
        "--snapshotter",
        "talaria",
        &c_ref,
    ])
    .expect("ctr pull (talaria) of an image without artifact");
    assert!(http_get(&metrics_addr, "/healthz").ends_with("ok\n"));

    // B read completely (cached), D mounted but unread.
    let b_ref = format!("{host}/talaria/b:v1");
    assert_eq!(prepare_layers(&mut c, &b_ref, &b).await, [true]);
    let b_chain = common::chain_ids(&b).remove(0);
    let mnt_b = dir.path().join("mnt-b");
    mount_view(&mut c, &b_chain, "view-b", &mnt_b).await;
    let b_tree = tree(&mnt_b);
    unmount_view(&mut c, "view-b", &mnt_b).await;
    let d_ref = format!("{host}/talaria/d:v1");
    assert_eq!(prepare_layers(&mut c, &d_ref, &d).await, [true]);
    let d_chain = common::chain_ids(&d).remove(0);

    // The registry hangs (SIGSTOP: connections are accepted, nothing answers): the read
    // timeout itself ends the read, and the kernel's retry of it does not wait again.
    let mnt_d = dir.path().join("mnt-d");
    mount_view(&mut c, &d_chain, "view-d", &mnt_d).await;
    let paused = Paused::new(&registry);
    let t = Instant::now();
    let err = match std::fs::read(mnt_d.join("srv/big.bin")) {
        Ok(data) => panic!("read {} bytes with the registry hanging", data.len()),
        Err(e) => e,
    };
    let took = t.elapsed();
    drop(paused);
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(
        took < Duration::from_secs(READ_TIMEOUT_SECS) + Duration::from_secs(1),
        "EIO after {took:?} from a hanging registry, timeout {READ_TIMEOUT_SECS}s"
    );
    eprintln!("D: EIO after {took:?} (registry hanging)");
    // Past the hold, so the next read meets the stopped registry afresh.
    tokio::time::sleep(Duration::from_secs(READ_TIMEOUT_SECS) + Duration::from_millis(100)).await;

    // The registry goes away: an uncached read fails with EIO within the timeout, B still
    // reads from the span cache.
    registry.stop();
    let t = Instant::now();
    let err = match std::fs::read(mnt_d.join("srv/big.bin")) {
        Ok(data) => panic!("read {} bytes with the registry down", data.len()),
        Err(e) => e,
    };
    let took = t.elapsed();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    // Within the read timeout plus slack for a loaded machine: the kernel's retry of the
    // failed readahead must not wait through the registry's retries again.
    assert!(
        took < Duration::from_secs(READ_TIMEOUT_SECS) + Duration::from_secs(1),
        "EIO after {took:?}, timeout {READ_TIMEOUT_SECS}s"
    );
    eprintln!("D: EIO after {took:?}");
    // The registry back: once the failure is no longer remembered (one read timeout), the
    // same read succeeds; then it goes away again for the rest of the test.
    registry.start_again().expect("registry back");
    tokio::time::sleep(Duration::from_secs(READ_TIMEOUT_SECS) + Duration::from_millis(100)).await;
    let data = std::fs::read(mnt_d.join("srv/big.bin")).expect("D read once the registry is back");
    assert!(
        data == big_content(2),
        "D's big.bin read back wrong ({} bytes)",
        data.len()
    );
    registry.stop();
    unmount_view(&mut c, "view-d", &mnt_d).await;
    mount_view(&mut c, &b_chain, "view-b", &mnt_b).await;
    assert_eq!(
        tree(&mnt_b),
        b_tree,
        "cached layer reads while the registry is down"
    );
    unmount_view(&mut c, "view-b", &mnt_b).await;
    let m = http_get(&metrics_addr, "/metrics");
    assert!(metric(&m, "talaria_node_read_errors_total") >= 1.0, "{m}");
    assert!(
        metric(&m, "talaria_node_from_cache_bytes_total") > 0.0,
        "{m}"
    );
    assert!(metric(&m, "talaria_node_span_cache_bytes") > 0.0, "{m}");
    assert!(metric(&m, "talaria_node_mount_seconds_count") >= 5.0, "{m}");
    // The trees above were walked through FUSE: lookups and reads were counted by op.
    for op in ["lookup", "getattr", "open", "read", "readdir", "readlink"] {
        let line = format!("talaria_node_fuse_requests_total{{op=\"{op}\"}}");
        assert!(metric(&m, &line) >= 1.0, "no {op} counted:\n{m}");
    }

    // Restart (registry still down): every snapshot is back and the cached layers read.
    let before: Vec<String> = list(&mut c).await;
    drop(c);
    let status = node.signal("TERM");
    assert!(status.success(), "exit after SIGTERM: {status}");
    node.restart();
    let mut c = connect(socket.clone()).await;
    assert_eq!(list(&mut c).await, before, "snapshots after a restart");
    mount_view(&mut c, &b_chain, "view-b", &mnt_b).await;
    assert_eq!(
        tree(&mnt_b),
        b_tree,
        "remounted from the index kept on disk"
    );
    unmount_view(&mut c, "view-b", &mnt_b).await;

    // A crash too: stale FUSE mounts are detached and remounted. D's kept index is damaged
    // meanwhile: D cannot come back and, unused, is removed rather than left empty.
    drop(c);
    let status = node.signal("KILL");
    assert!(!status.success());
    let d_dir = std::fs::read_dir(root.join("snapshots"))
        .expect("snapshots dir")
        .map(|e| e.expect("entry").path())
        .find(|p| {
            std::fs::read_to_string(p.join("remote.json")).is_ok_and(|r| r.contains("talaria/d:v1"))
        })
        .expect("D's snapshot dir");
    std::fs::write(d_dir.join("layer.index"), b"damaged").expect("damage D's index");
    registry.start_again().expect("registry back");
    node.restart();
    let mut c = connect(socket.clone()).await;
    let without_d: Vec<String> = before
        .iter()
        .filter(|r| !r.starts_with(&d_chain))
        .cloned()
        .collect();
    assert_eq!(before.len(), without_d.len() + 1, "{before:?}");
    assert_eq!(list(&mut c).await, without_d, "snapshots after a crash");
    let m = http_get(&metrics_addr, "/metrics");
    assert_eq!(
        metric(&m, "talaria_node_fallbacks_total{reason=\"restore_error\"}"),
        1.0,
        "{m}"
    );
    mount_view(&mut c, &a_top, "view-a", &mnt).await;
    assert_eq!(tree(&mnt), ours, "A after a crash and remount");
    unmount_view(&mut c, "view-a", &mnt).await;

    // Removing a layer unmounts it; nothing else stays mounted under the root.
    c.remove(pb::RemoveSnapshotRequest {
        snapshotter: "talaria".into(),
        key: b_chain.clone(),
    })
    .await
    .expect("remove B");
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let ours_mounted = mountinfo
        .lines()
        .filter(|l| l.contains(&*root.to_string_lossy()))
        .count();
    assert_eq!(
        ours_mounted, 3,
        "A's three layers stay mounted:\n{mountinfo}"
    );
    drop(ctd);
    drop(node);
}

async fn list(c: &mut Client) -> Vec<String> {
    let mut s = c
        .list(pb::ListSnapshotsRequest {
            snapshotter: "talaria".into(),
            filters: vec![],
        })
        .await
        .expect("list")
        .into_inner();
    let mut out = Vec::new();
    while let Some(r) = s.message().await.expect("list stream") {
        out.extend(
            r.info
                .into_iter()
                .map(|i| format!("{} {} {}", i.name, i.parent, i.kind)),
        );
    }
    out.sort();
    out
}
