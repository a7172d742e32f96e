//! talaria-node as containerd's proxy snapshotter, with the real containerd 1.6 and runc:
//! images unpack into it, containers run on it, the unpacked tree equals overlayfs', and
//! committed snapshots survive restarts and crashes of the snapshotter process.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Node, mount_at, tree, tree_diff};
use talaria_testenv::containerd::Containerd;
use talaria_testenv::images::{self, ImageBuilder, LayerBuilder};
use talaria_testenv::registry::Registry;

fn proxy_config(socket: &Path) -> String {
    format!(
        "[proxy_plugins.talaria]\n  type = \"snapshot\"\n  address = \"{}\"\n",
        socket.display()
    )
}

/// Imports an image built in the test into containerd, unpacking it for `snapshotter`.
fn import(
    ctd: &Containerd,
    image: &images::Image,
    dir: &Path,
    name: &str,
    snapshotter: &str,
) -> String {
    let layout = dir.join(format!("layout-{}", name.replace('/', "-")));
    if !layout.exists() {
        image.write_layout(&layout, "latest").expect("write layout");
    }
    let tar = dir.join(format!("{}-{snapshotter}.tar", name.replace('/', "-")));
    images::layout_to_tar(&layout, &tar).expect("layout tar");
    ctd.ctr(&[
        "images",
        "import",
        "--snapshotter",
        snapshotter,
        "--base-name",
        name,
        &tar.to_string_lossy(),
    ])
    .expect("ctr images import");
    format!("{name}:latest")
}

/// The committed snapshot no other snapshot of `snapshotter` has as parent (the image's top
/// layer when one image is unpacked).
fn leaf_snapshot(ctd: &Containerd, snapshotter: &str) -> String {
    let out = ctd
        .ctr_stdout(&["snapshots", "--snapshotter", snapshotter, "ls"])
        .expect("snapshots ls");
    let rows: Vec<Vec<&str>> = out
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    let parents: Vec<&str> = rows.iter().filter(|r| r.len() == 3).map(|r| r[1]).collect();
    let leaves: Vec<&str> = rows
        .iter()
        .filter(|r| r.last() == Some(&"Committed") && !parents.contains(&r[0]))
        .map(|r| r[0])
        .collect();
    assert_eq!(leaves.len(), 1, "one image per snapshotter: {out}");
    leaves[0].to_string()
}

/// The image's root filesystem as `snapshotter` presents it: a view of its top layer,
/// mounted here from the mounts the snapshotter returned (as containerd would mount them;
/// `ctr images mount` of 1.6 ignores --snapshotter, so it is not used).
fn image_tree(
    ctd: &Containerd,
    snapshotter: &str,
    dir: &Path,
) -> (Vec<serde_json::Value>, BTreeMap<String, String>) {
    let chain = leaf_snapshot(ctd, snapshotter);
    let key = format!("tree-{snapshotter}");
    let out = ctd
        .ctr_stdout(&[
            "snapshots",
            "--snapshotter",
            snapshotter,
            "view",
            "--mounts",
            &key,
            &chain,
        ])
        .expect("ctr snapshots view");
    let mounts: Vec<serde_json::Value> = serde_json::from_str(&out).expect("mounts JSON");
    assert_eq!(mounts.len(), 1, "{out}");
    let m = &mounts[0];
    let options: Vec<String> = m["Options"]
        .as_array()
        .expect("Options")
        .iter()
        .filter_map(|o| o.as_str().map(str::to_string))
        .collect();
    let target = dir.join(format!("mnt-{snapshotter}"));
    mount_at(
        m["Type"].as_str().expect("Type"),
        m["Source"].as_str().expect("Source"),
        &options,
        &target,
    );
    let tree = tree(&target);
    nix::mount::umount(&target).expect("umount");
    // containerd's garbage collector may have taken the unreferenced view already (ctr
    // creates it without a lease).
    if let Err(e) = ctd.ctr(&["snapshots", "--snapshotter", snapshotter, "rm", &key]) {
        assert!(e.to_string().contains("not found"), "remove the view: {e}");
    }
    (mounts, tree)
}

fn two_layer_image() -> images::Image {
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
        .cmd(&["/bin/sh"])
        .build()
        .expect("image")
}

/// `ctr snapshots ls` rows (KEY PARENT KIND), sorted; retried while containerd reconnects to a
/// restarted snapshotter (its gRPC client backs off up to a few seconds).
fn snapshot_rows(ctd: &Containerd) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match ctd.ctr_stdout(&["snapshots", "--snapshotter", "talaria", "ls"]) {
            Ok(out) => {
                let mut rows: Vec<String> = out
                    .lines()
                    .skip(1)
                    .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
                    .filter(|l| !l.is_empty())
                    .collect();
                rows.sort();
                return rows;
            }
            Err(e) => {
                assert!(Instant::now() < deadline, "snapshots ls kept failing: {e}");
                std::thread::sleep(Duration::from_millis(250));
            }
        }
    }
}

fn run_in(ctd: &Containerd, image: &str, id: &str, script: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match ctd.ctr_stdout(&[
            "run",
            "--snapshotter",
            "talaria",
            "--rm",
            image,
            id,
            "/bin/sh",
            "-c",
            script,
        ]) {
            Ok(out) => return out.lines().map(str::to_string).collect(),
            // Only a connection still coming back is retried; anything else is a failure.
            Err(e) if e.to_string().contains("Unavailable") && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(250));
            }
            Err(e) => panic!("ctr run {id}: {e}"),
        }
    }
}

/// Waits until the snapshot dirs on disk are exactly `n` (containerd removes snapshots from
/// a proxy snapshotter in its garbage collector, shortly after the metadata says so).
fn wait_for_dirs(root: &Path, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let dirs = snapshot_dirs(root);
        if dirs.len() == n && dirs.iter().all(|d| d.parse::<u64>().is_ok()) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "expected {n} snapshot dirs: {dirs:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Snapshot dirs on disk.
fn snapshot_dirs(root: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(root.join("snapshots"))
        .expect("read snapshots dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn containerd_unpacks_runs_and_survives_restarts() {
    let dir = tempfile::Builder::new()
        .prefix("tlr-node-")
        .tempdir()
        .expect("tempdir");
    let root = dir.path().join("root");
    let socket = dir.path().join("sn.sock");
    let mut node = Node::start(&root, &socket, &dir.path().join("node.log"), &[]);
    let ctd = Containerd::start_with_config(&proxy_config(&socket)).expect("start containerd");
    let plugins = ctd.ctr_stdout(&["plugins", "ls"]).expect("plugins ls");
    assert!(
        plugins.lines().any(|l| l.contains("talaria")
            && l.contains("io.containerd.snapshotter.v1")
            && l.contains("ok")),
        "{plugins}"
    );

    // A multi-layer image with whiteouts, an opaque dir, hard links, symlinks and odd modes.
    let image = two_layer_image();
    let name = import(&ctd, &image, dir.path(), "docker.io/talaria/two", "talaria");
    let rows = snapshot_rows(&ctd);
    assert_eq!(rows.len(), 2, "two committed layers: {rows:?}");
    assert!(rows.iter().all(|r| r.ends_with(" Committed")), "{rows:?}");

    let out = run_in(
        &ctd,
        &name,
        "run-1",
        "cat /msg.txt; test -e /etc/group || echo group-gone; ls /data/old; echo hi > /tmp/w; cat /tmp/w; echo $((6*7))",
    );
    assert_eq!(
        out,
        ["from layer two", "group-gone", "new.txt", "hi", "42"],
        "container output"
    );
    // `--rm` removed the container's active snapshot, and its directory with it.
    assert_eq!(snapshot_rows(&ctd), rows);
    wait_for_dirs(&root, 2);

    // The same image unpacked by containerd's own overlayfs snapshotter looks the same.
    import(
        &ctd,
        &image,
        dir.path(),
        "docker.io/talaria/two",
        "overlayfs",
    );
    let (our_mounts, ours) = image_tree(&ctd, "talaria", dir.path());
    let (_, theirs) = image_tree(&ctd, "overlayfs", dir.path());
    // Our view of two layers is an overlay of our own dirs, not containerd's.
    assert_eq!(our_mounts[0]["Type"], "overlay", "{our_mounts:?}");
    let opts = our_mounts[0]["Options"].to_string();
    let ours_lower = format!("lowerdir={}", root.join("snapshots").display());
    assert!(opts.contains(&ours_lower), "{opts}");
    assert!(
        ours.len() > 100,
        "busybox has hundreds of entries: {}",
        ours.len()
    );
    assert!(ours.contains_key("data/old/new.txt") && !ours.contains_key("data/old/gone.txt"));
    assert!(!ours.contains_key("etc/group"), "whiteout applied");
    let diff = tree_diff(&ours, &theirs);
    assert!(diff.is_empty(), "trees differ:\n{}", diff.join("\n"));
    // The views are gone again.
    assert_eq!(snapshot_rows(&ctd), rows);
    wait_for_dirs(&root, 2);

    // Graceful stop: SIGTERM ends the process cleanly and removes the socket.
    let status = node.signal("TERM");
    assert!(status.success(), "exit after SIGTERM: {status}");
    assert!(!socket.exists(), "socket removed on shutdown");
    node.restart();
    assert_eq!(
        snapshot_rows(&ctd),
        rows,
        "committed snapshots after restart"
    );
    let out = run_in(&ctd, &name, "run-2", "cat /data/a-link.txt");
    assert_eq!(out, ["alpha"]);

    // A crash (SIGKILL) loses nothing committed either, and a container still runs.
    let status = node.signal("KILL");
    assert!(!status.success());
    node.restart();
    assert_eq!(
        snapshot_rows(&ctd),
        rows,
        "committed snapshots after a crash"
    );
    let out = run_in(&ctd, &name, "run-3", "/data/b.sh; cat /msg.txt");
    assert_eq!(out, ["b", "from layer two"]);

    // A single-layer image pulled from a registry: its container runs on a read-write bind
    // mount, no overlay.
    let registry = Registry::start().expect("start registry");
    images::busybox_image()
        .expect("busybox")
        .push(&registry.host(), "talaria/busybox", "latest")
        .expect("push busybox");
    let bb = format!("{}/talaria/busybox:latest", registry.host());
    ctd.ctr(&[
        "images",
        "pull",
        "--plain-http",
        "--snapshotter",
        "talaria",
        &bb,
    ])
    .expect("ctr pull");
    let out = run_in(&ctd, &bb, "run-4", "echo single-layer");
    assert_eq!(out, ["single-layer"]);
    let after = snapshot_rows(&ctd);
    assert_eq!(after.len(), 3, "{after:?}");
    wait_for_dirs(&root, 3);

    // Nothing containerd asked for failed unexpectedly (NotFound/AlreadyExists are routine
    // answers and logged at debug level).
    let log = node.log_text();
    let bad: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    assert!(
        bad.is_empty(),
        "warnings in the node log:\n{}",
        bad.join("\n")
    );
    assert!(log.contains("committed snapshot"), "debug log present");
}
