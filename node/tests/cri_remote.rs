//! Issue 7's acceptance: images pulled and run through CRI (containerd's CRI plugin, runc,
//! the real registry) with the talaria-node binary as containerd's proxy snapshotter.
//!
//! - An image with an accelerated artifact, one with only a default artifact and one with
//!   none: each runs, and the whole tree a container sees equals what the same image gives
//!   under containerd's own overlayfs snapshotter; the artifact-backed layers are FUSE mounts
//!   whose blobs containerd never downloaded, the other image fell back with its reason
//!   counted.
//! - The registry stopped mid-run: a read of a file never fetched fails with EIO within the
//!   node's read timeout, while a container of another, fully read image keeps reading and
//!   new containers start.
//! - The node killed and started again on its root: the committed snapshots are listed as
//!   before and new containers run from them (the registry down meanwhile).
//!
//! The tests share one lock: each starts a registry, the node and one or two containerds,
//! and the EIO deadline is asserted, so they do not compete for the machine's cores.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use talaria_artifact::build::BuildOptions;
use talaria_artifact::format::Profile;
use talaria_testenv::cri::{Cri, CriContainerd, CriOptions, CriSnapshotter, PodSandbox};
use talaria_testenv::images::{self, Image, ImageBuilder, Layer, LayerBuilder};
use talaria_testenv::registry::Registry;
use talaria_testenv::tree::{self, Tree};

mod common;
use common::agent::Agent as Node;
use common::{http_get, metric};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const RUN_TIMEOUT: Duration = Duration::from_secs(60);
const READ_TIMEOUT_SECS: u64 = 3;
/// What a failed read(2) may take beyond the read timeout (scheduling on a loaded machine).
const EIO_SLACK: Duration = Duration::from_secs(1);
/// The artifact's default span size: the big file spans several.
const SPAN: u64 = 4 << 20;
const BIG_LEN: usize = 9 << 20;
const SNAPSHOTTER: &str = "talaria";

// ---------------------------------------------------------------------------------------
// Images and artifacts

/// A tar entry with explicit owner and mode.
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
    h.set_gid(owner + 1);
    h.set_mtime(1_700_000_000);
    h.set_size(data.len() as u64);
    b.append_data(&mut h, path, data).expect("tar entry");
}

/// A PAX extended header (here: xattrs) for the entry that follows.
fn pax(b: &mut tar::Builder<Vec<u8>>, records: &[(&str, &[u8])]) {
    let mut body = Vec::new();
    for (k, v) in records {
        // "LEN key=value\n" where LEN counts itself.
        let rest = k.len() + v.len() + 3;
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
    h.set_mode(0o644);
    h.set_size(body.len() as u64);
    b.append_data(&mut h, "PaxHeaders/entry", body.as_slice())
        .expect("pax header");
}

/// The third layer: owners, set-id bits, xattrs, a hard link, a fifo, and two big files (one
/// read by the tree walks, one left unread for the dead-registry test).
fn rich_layer(seed: u64) -> Layer {
    use tar::EntryType as T;
    let mut b = tar::Builder::new(Vec::new());
    entry(&mut b, T::Directory, "srv/", 0o2750, 1000, b"");
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
    entry(&mut b, T::Regular, "srv/empty", 0o600, 65534, b"");
    entry(&mut b, T::Fifo, "srv/fifo", 0o600, 1000, b"");
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(T::Link);
    // A link header's attributes apply to the shared inode when unpacked: keep them.
    h.set_mode(0o640);
    h.set_uid(1000);
    h.set_gid(1001);
    h.set_size(0);
    b.append_link(&mut h, "srv/xattr-link.txt", "srv/xattr.txt")
        .expect("hard link");
    entry(
        &mut b,
        T::Regular,
        "srv/big.bin",
        0o644,
        0,
        &images::noise(seed, BIG_LEN),
    );
    entry(&mut b, T::Directory, "cold/", 0o755, 0, b"");
    entry(
        &mut b,
        T::Regular,
        "cold/unread.bin",
        0o644,
        0,
        &images::noise(seed + 1000, 6 << 20),
    );
    let tar = b.into_inner().expect("tar");
    Layer::from_tar(&tar).expect("layer")
}

/// Three layers: busybox plus a marker of the image (so no two test images share a layer
/// chain) and links; a layer with a whiteout and an opaque dir; the rich layer.
fn test_image(name: &str, seed: u64) -> Image {
    let base = images::busybox_layer_builder()
        .expect("busybox layer")
        .file("etc/talaria-image", format!("{name}\n"), 0o644)
        .dir("data", 0o750)
        .file("data/a.txt", "alpha\n", 0o600)
        .hardlink("data/a-link.txt", "data/a.txt")
        .symlink("data/rel", "a.txt")
        .symlink("data/abs", "/etc/talaria-image")
        .dir("data/old", 0o755)
        .file("data/old/gone.txt", "hidden by an opaque dir\n", 0o644)
        .file("data/doomed.txt", "removed by a whiteout\n", 0o644)
        .build()
        .expect("base layer");
    let middle = LayerBuilder::new()
        // Its own content too: containerd's content store is shared by digest across images.
        .file("msg.txt", format!("layer two of {name}\n"), 0o644)
        .whiteout("data/doomed.txt")
        .dir("data", 0o750)
        .file("data/b.sh", "#!/bin/sh\necho b\n", 0o4755)
        .dir("data/old", 0o700)
        .opaque_dir("data/old")
        .file("data/old/new.txt", "after the opaque marker\n", 0o640)
        .build()
        .expect("middle layer");
    ImageBuilder::new()
        .layer(base)
        .layer(middle)
        .layer(rich_layer(seed))
        .cmd(&["/bin/sh"])
        .build()
        .expect("image")
}

/// As [`common::build_artifact`], whose default span size the big file must span several of.
async fn build_artifact(registry: &str, repo: &str, tag: &str, profile: Profile) {
    assert_eq!(
        BuildOptions::default().knobs.span_size,
        SPAN,
        "the big file must span several spans"
    );
    common::build_artifact(registry, repo, tag, profile).await;
}

// ---------------------------------------------------------------------------------------
// CRI helpers

fn talaria_cri(node: &Node, registry: &str) -> CriContainerd {
    let env = CriContainerd::start(CriOptions {
        snapshotter: CriSnapshotter::Proxy {
            name: SNAPSHOTTER.into(),
            socket: node.socket.clone(),
        },
        ..CriOptions::default()
    })
    .expect("start containerd with CRI on talaria");
    env.allow_plain_http(registry).expect("plain-HTTP registry");
    env
}

/// `ctr -n k8s.io ARGS` (bounded by ctr's own timeout), stdout as text.
fn ctr_k8s(env: &CriContainerd, args: &[&str]) -> Result<String, String> {
    let mut c = env.ctr_k8s_command().expect("ctr");
    c.arg("--timeout").arg("30s").args(args);
    let out = c.output().map_err(|e| format!("running ctr: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "ctr {args:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// What the image's container prints: its marker, a file behind the opaque dir, the file
/// the whiteout removed (absent) and the size of the big file.
const PROBE: &str = "cat /etc/talaria-image /data/old/new.txt; \
                     test -e /data/doomed.txt && echo doomed-present; \
                     test -e /data/old/gone.txt && echo gone-present; \
                     wc -c < /srv/big.bin";

fn probe_output(name: &str) -> String {
    format!("{name}\nafter the opaque marker\n{BIG_LEN}\n")
}

async fn run_probe(cri: &Cri, pod: &PodSandbox, cname: &str, image: &str, name: &str) {
    let run = cri
        .run_to_exit(pod, cname, image, &["sh", "-c", PROBE], RUN_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("run {cname} of {image}: {e}"));
    assert_eq!(
        (run.exit_code, run.stdout.as_str(), run.stderr.as_str()),
        (0, probe_output(name).as_str(), ""),
        "{cname} of {image}"
    );
}

/// The image's tree as a long-running container of it sees it, without the runtime's mounts.
fn container_tree(pid: u32) -> Tree {
    let skip = tree::container_mount_points(pid).expect("container mounts");
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    tree::summarize(&root, &skip).unwrap_or_else(|e| panic!("walk {}: {e}", root.display()))
}

/// Reads `len` bytes at `offset` of a file seen inside a container.
fn pread(pid: u32, path: &str, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let f = fs::File::open(format!("/proc/{pid}/root/{path}"))?;
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

fn assert_image_specifics(t: &Tree, name: &str) {
    assert!(
        t.len() > 250,
        "busybox gives hundreds of entries: {}",
        t.len()
    );
    let get = |k: &str| t.get(k).map(String::as_str).unwrap_or("<absent>");
    assert!(get("etc/talaria-image").starts_with("file "), "{name}");
    assert!(
        !t.contains_key("data/doomed.txt"),
        "{name}: whiteout applied"
    );
    assert!(
        !t.contains_key("data/old/gone.txt"),
        "{name}: opaque dir applied"
    );
    assert!(get("data/old").contains("mode=700"), "{}", get("data/old"));
    assert!(
        get("srv/xattr.txt").contains("user.talaria=lazy"),
        "{}",
        get("srv/xattr.txt")
    );
    assert!(
        get("srv/xattr.txt").contains("uid=1000 gid=1001"),
        "{}",
        get("srv/xattr.txt")
    );
    assert!(
        get("srv/xattr.txt").contains("links=[srv/xattr-link.txt|srv/xattr.txt]"),
        "{}",
        get("srv/xattr.txt")
    );
    assert!(
        get("data/a.txt").contains("links=[data/a-link.txt|data/a.txt]"),
        "{}",
        get("data/a.txt")
    );
    assert!(get("srv/suid").contains("mode=4755"), "{}", get("srv/suid"));
    assert!(get("srv").contains("mode=2750"), "{}", get("srv"));
    assert!(get("srv/fifo").starts_with("fifo "), "{}", get("srv/fifo"));
    assert!(
        get("data/rel").starts_with("symlink -> a.txt "),
        "{}",
        get("data/rel")
    );
    assert!(
        get("srv/big.bin").starts_with(&format!("file {BIG_LEN} ")),
        "{}",
        get("srv/big.bin")
    );
}

// ---------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_pulls_and_runs_images_with_and_without_artifacts() {
    let _serial = SERIAL.lock().await;
    let t0 = Instant::now();
    talaria_artifact::oci::registry::install_crypto_provider();
    let dir = tempfile::Builder::new()
        .prefix("tlr-cri-remote-")
        .tempdir()
        .expect("tempdir");
    let registry = Registry::start().expect("start registry");
    let host = registry.host();

    // (name, seed of its noise, image, artifact profile)
    let cases = [
        ("accelerated", 1, Some(Profile::StartupLocalV1)),
        ("default", 2, Some(Profile::Default)),
        ("plain", 3, None),
    ]
    .map(|(name, seed, profile)| (name, seed, test_image(name, seed), profile));
    for (name, _, image, profile) in &cases {
        let repo = format!("talaria/{name}");
        image.push(&host, &repo, "v1").expect("push image");
        if let Some(p) = profile {
            build_artifact(&host, &repo, "v1", *p).await;
        }
    }
    eprintln!("images and artifacts pushed in {:?}", t0.elapsed());

    let metrics_addr = format!(
        "127.0.0.1:{}",
        talaria_testenv::free_port().expect("free port")
    );
    let node = Node::start(
        dir.path(),
        &[
            "--insecure-registry".into(),
            host.clone(),
            "--metrics-addr".into(),
            metrics_addr.clone(),
        ],
    );
    let env = talaria_cri(&node, &host);
    let cri = env.client().await.expect("CRI client (talaria)");
    let overlay = CriContainerd::start(CriOptions::default())
        .expect("start containerd with CRI on overlayfs");
    overlay
        .allow_plain_http(&host)
        .expect("plain-HTTP registry");
    let ocri = overlay.client().await.expect("CRI client (overlayfs)");
    let pod = cri
        .run_pod("remote")
        .await
        .expect("RunPodSandbox (talaria)");
    let opod = ocri
        .run_pod("overlay")
        .await
        .expect("RunPodSandbox (overlayfs)");
    eprintln!("node and both containerds up at {:?}", t0.elapsed());

    for (name, seed, _, _) in &cases {
        let image_ref = format!("{host}/talaria/{name}:v1");
        let t = Instant::now();
        cri.pull_image(&image_ref)
            .await
            .expect("PullImage through talaria");
        let pulled = t.elapsed();
        run_probe(&cri, &pod, &format!("probe-{name}"), &image_ref, name).await;
        eprintln!(
            "{name}: pulled in {pulled:?}, first output after {:?}",
            t.elapsed()
        );

        let ours = cri
            .start_container(
                &pod,
                &format!("sleep-{name}"),
                &image_ref,
                &["sleep", "3600"],
            )
            .await
            .expect("start a long-running container (talaria)");
        // A ranged read straddling the first span boundary of the big file's layer bytes
        // (the file starts a few KiB into its layer, so 4 MiB into the file crosses it).
        let expected = images::noise(*seed, BIG_LEN);
        let at = SPAN - (256 << 10);
        let got = pread(ours.pid, "srv/big.bin", at, 1 << 20).expect("ranged read across spans");
        let at_us = usize::try_from(at).expect("offset");
        assert!(
            got == expected[at_us..at_us + (1 << 20)],
            "{name}: bytes across the span boundary differ"
        );
        let t = Instant::now();
        let ours_tree = container_tree(ours.pid);
        eprintln!(
            "{name}: container tree walked in {:?} ({} entries)",
            t.elapsed(),
            ours_tree.len()
        );

        ocri.pull_image(&image_ref)
            .await
            .expect("PullImage on overlayfs");
        let theirs = ocri
            .start_container(
                &opod,
                &format!("sleep-{name}"),
                &image_ref,
                &["sleep", "3600"],
            )
            .await
            .expect("start a long-running container (overlayfs)");
        let theirs_tree = container_tree(theirs.pid);
        assert_image_specifics(&ours_tree, name);
        let diff = tree::diff("talaria", &ours_tree, "overlayfs", &theirs_tree);
        assert!(
            diff.is_empty(),
            "{name}: trees differ:\n{}",
            diff.join("\n")
        );
    }

    // The artifact-backed images' layers are FUSE mounts of the node, their blobs never
    // downloaded by containerd; the plain image's layers were unpacked from its blobs.
    let fuse = node.fuse_mounts();
    assert_eq!(
        fuse.len(),
        6,
        "3 layers each of two images:\n{}",
        fuse.join("\n")
    );
    let content = ctr_k8s(&env, &["content", "ls", "-q"]).expect("ctr content ls");
    for (name, _, image, profile) in &cases {
        for l in &image.layers {
            assert_eq!(
                content.contains(&l.digest),
                profile.is_none(),
                "{name}: layer {} in containerd's content store:\n{content}",
                l.digest
            );
        }
    }
    let m = http_get(&metrics_addr, "/metrics");
    assert_eq!(metric(&m, "talaria_node_remote_mounts "), 6.0, "{m}");
    // Each of the plain image's layers, and only those, fell back for want of an artifact.
    assert_eq!(
        metric(&m, "talaria_node_fallbacks_total{reason=\"no_artifact\"}"),
        3.0,
        "{m}"
    );
    assert!(metric(&m, "talaria_node_mount_seconds_count") >= 6.0, "{m}");
    assert!(
        metric(&m, "talaria_node_fetched_on_demand_bytes_total")
            + metric(&m, "talaria_node_prefetched_bytes_total")
            > (2 * BIG_LEN) as f64,
        "the big files were fetched through the node:\n{m}"
    );
    assert_eq!(metric(&m, "talaria_node_read_errors_total"), 0.0, "{m}");
    eprintln!("total {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_registry_gives_eio_within_the_timeout_and_other_images_keep_running() {
    let _serial = SERIAL.lock().await;
    let t0 = Instant::now();
    talaria_artifact::oci::registry::install_crypto_provider();
    let dir = tempfile::Builder::new()
        .prefix("tlr-cri-dead-")
        .tempdir()
        .expect("tempdir");
    let mut registry = Registry::start().expect("start registry");
    let host = registry.host();
    let full = test_image("full", 11);
    let cold = test_image("cold", 12);
    for (name, image) in [("full", &full), ("cold", &cold)] {
        let repo = format!("talaria/{name}");
        image.push(&host, &repo, "v1").expect("push image");
        build_artifact(&host, &repo, "v1", Profile::Default).await;
    }
    let metrics_addr = format!(
        "127.0.0.1:{}",
        talaria_testenv::free_port().expect("free port")
    );
    let node = Node::start(
        dir.path(),
        &[
            "--insecure-registry".into(),
            host.clone(),
            "--metrics-addr".into(),
            metrics_addr.clone(),
            "--read-timeout".into(),
            format!("{READ_TIMEOUT_SECS}s"),
            // Nothing may fetch the cold file behind the test's back.
            "--no-prefetch".into(),
        ],
    );
    let env = talaria_cri(&node, &host);
    let cri = env.client().await.expect("CRI client");
    let pod = cri.run_pod("dead-registry").await.expect("RunPodSandbox");
    let full_ref = format!("{host}/talaria/full:v1");
    let cold_ref = format!("{host}/talaria/cold:v1");
    cri.pull_image(&full_ref).await.expect("pull full");
    cri.pull_image(&cold_ref).await.expect("pull cold");
    assert_eq!(node.fuse_mounts().len(), 6, "both images mounted lazily");

    let full_c = cri
        .start_container(&pod, "full", &full_ref, &["sleep", "3600"])
        .await
        .expect("start full");
    let full_tree = container_tree(full_c.pid);
    let cold_c = cri
        .start_container(&pod, "cold", &cold_ref, &["sleep", "3600"])
        .await
        .expect("start cold");
    eprintln!("containers running at {:?}", t0.elapsed());

    registry.stop();
    // Three readers at once (the kernel's retries of failed readaheads included): each
    // read(2) fails within the read timeout, plus slack for a loaded machine, not once
    // per retry or per reader waiting on the same spans.
    let unread = format!("/proc/{}/root/cold/unread.bin", cold_c.pid);
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let path = unread.clone();
            std::thread::spawn(move || {
                let t = Instant::now();
                (fs::read(&path), t.elapsed())
            })
        })
        .collect();
    for r in readers {
        let (res, took) = r.join().expect("reader thread");
        let err = match res {
            Ok(data) => panic!("read {} unfetched bytes with the registry down", data.len()),
            Err(e) => e,
        };
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
        assert!(
            took < Duration::from_secs(READ_TIMEOUT_SECS) + EIO_SLACK,
            "EIO after {took:?}, read timeout {READ_TIMEOUT_SECS}s"
        );
        eprintln!("EIO after {took:?} (read timeout {READ_TIMEOUT_SECS}s)");
    }
    // Inside the container too: the read fails, the process gets an error, not a hang.
    let exec = cri
        .exec_sync(
            &cold_c.id,
            &["sh", "-c", "cat /cold/unread.bin > /dev/null"],
            RUN_TIMEOUT,
        )
        .await
        .expect("exec in the cold container");
    assert_ne!(
        exec.exit_code, 0,
        "reading uncached data with the registry down"
    );
    assert!(
        String::from_utf8_lossy(&exec.stderr).contains("Input/output error"),
        "{}",
        String::from_utf8_lossy(&exec.stderr)
    );

    // The snapshotter keeps serving: the fully read image still reads, whole, and new
    // containers of both pulled images start and print.
    assert_eq!(
        container_tree(full_c.pid),
        full_tree,
        "full image while the registry is down"
    );
    run_probe(&cri, &pod, "probe-full", &full_ref, "full").await;
    let run = cri
        .run_to_exit(
            &pod,
            "echo-cold",
            &cold_ref,
            &["echo", "still starts"],
            RUN_TIMEOUT,
        )
        .await
        .expect("a new container of the cold image");
    assert_eq!((run.exit_code, run.stdout.as_str()), (0, "still starts\n"));
    let m = http_get(&metrics_addr, "/metrics");
    assert!(metric(&m, "talaria_node_read_errors_total") >= 1.0, "{m}");
    assert!(
        metric(&m, "talaria_node_from_cache_bytes_total") > 0.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "talaria_node_prefetched_bytes_total"),
        0.0,
        "{m}"
    );

    // The registry back: once the failure is no longer remembered (one read timeout), the
    // same read fetches and succeeds.
    registry.start_again().expect("registry back");
    tokio::time::sleep(Duration::from_secs(READ_TIMEOUT_SECS) + Duration::from_millis(100)).await;
    let t = Instant::now();
    let data = fs::read(&unread).expect("read once the registry is back");
    eprintln!(
        "read {} bytes after the registry came back in {:?}",
        data.len(),
        t.elapsed()
    );
    assert!(
        data == images::noise(12 + 1000, 6 << 20),
        "cold/unread.bin read back wrong ({} bytes)",
        data.len()
    );
    let exec = cri
        .exec_sync(
            &cold_c.id,
            &["sh", "-c", "cat /cold/unread.bin > /dev/null"],
            RUN_TIMEOUT,
        )
        .await
        .expect("exec in the cold container");
    assert_eq!(
        exec.exit_code,
        0,
        "reading in the container once the registry is back: {}",
        String::from_utf8_lossy(&exec.stderr)
    );
    eprintln!("total {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_snapshots_survive_a_snapshotter_restart() {
    let _serial = SERIAL.lock().await;
    let t0 = Instant::now();
    talaria_artifact::oci::registry::install_crypto_provider();
    let dir = tempfile::Builder::new()
        .prefix("tlr-cri-restart-")
        .tempdir()
        .expect("tempdir");
    let mut registry = Registry::start().expect("start registry");
    let host = registry.host();
    let lazy = test_image("lazy", 21);
    let plain = test_image("plain", 22);
    lazy.push(&host, "talaria/lazy", "v1").expect("push lazy");
    build_artifact(&host, "talaria/lazy", "v1", Profile::StartupLocalV1).await;
    plain
        .push(&host, "talaria/plain", "v1")
        .expect("push plain");
    let mut node = Node::start(dir.path(), &["--insecure-registry".into(), host.clone()]);
    let env = talaria_cri(&node, &host);
    let cri = env.client().await.expect("CRI client");
    let pod = cri.run_pod("restart").await.expect("RunPodSandbox");
    let lazy_ref = format!("{host}/talaria/lazy:v1");
    let plain_ref = format!("{host}/talaria/plain:v1");
    cri.pull_image(&lazy_ref).await.expect("pull lazy");
    cri.pull_image(&plain_ref).await.expect("pull plain");
    let c = cri
        .start_container(&pod, "before", &lazy_ref, &["sleep", "3600"])
        .await
        .expect("start lazy");
    // Reads everything, so the restarted node can serve it from its span cache alone.
    let lazy_tree = container_tree(c.pid);
    let snapshots = |env: &CriContainerd| {
        let out = ctr_k8s(env, &["snapshots", "--snapshotter", SNAPSHOTTER, "ls"])?;
        let mut rows: Vec<String> = out
            .lines()
            .skip(1)
            .filter(|l| l.split_whitespace().last() == Some("Committed"))
            .map(str::to_string)
            .collect();
        rows.sort();
        Ok::<_, String>(rows)
    };
    let before = snapshots(&env).expect("snapshots before");
    // sandbox image (1 layer) + two 3-layer images.
    assert_eq!(before.len(), 7, "{before:#?}");
    cri.stop_container(&c.id, Duration::from_secs(1))
        .await
        .expect("stop the container");
    cri.remove_container(&c.id)
        .await
        .expect("remove the container");

    let status = node.kill();
    assert!(!status.success(), "SIGKILL: {status}");
    registry.stop();
    node.spawn();
    eprintln!("node restarted at {:?}", t0.elapsed());
    assert_eq!(
        node.fuse_mounts().len(),
        3,
        "the lazy image's layers remounted"
    );

    // containerd reconnects to the restarted snapshotter with a backoff: bounded retries.
    let deadline = Instant::now() + Duration::from_secs(60);
    let after = loop {
        match snapshots(&env) {
            Ok(rows) if !rows.is_empty() => break rows,
            other => assert!(
                Instant::now() < deadline,
                "snapshots after the restart: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(after, before, "committed snapshots after the restart");
    for (name, image_ref) in [("lazy", &lazy_ref), ("plain", &plain_ref)] {
        let status = cri
            .image_status(image_ref)
            .await
            .expect("ImageStatus")
            .unwrap_or_else(|| panic!("{name} still known to CRI"));
        assert!(status.id.starts_with("sha256:"));
        run_probe(&cri, &pod, &format!("after-{name}"), image_ref, name).await;
    }
    let c = cri
        .start_container(&pod, "after", &lazy_ref, &["sleep", "3600"])
        .await
        .expect("start lazy after the restart");
    let diff = tree::diff("after", &container_tree(c.pid), "before", &lazy_tree);
    assert!(
        diff.is_empty(),
        "tree after the restart differs:\n{}",
        diff.join("\n")
    );
    eprintln!("total {:?}", t0.elapsed());
}
