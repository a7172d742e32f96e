//! Snapshot semantics of the library on a real filesystem, and what survives reopening.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use talaria_node::Error;
use talaria_node::snapshot::metadata::Kind;
use talaria_node::snapshot::{
    HookOutcome, Mount, PrepareHook, Snapshotter, TARGET_SNAPSHOT_REF_LABEL,
};

fn no_labels() -> BTreeMap<String, String> {
    BTreeMap::new()
}

fn fs_of(root: &Path, id: u64) -> String {
    root.join("snapshots")
        .join(id.to_string())
        .join("fs")
        .to_string_lossy()
        .into_owned()
}

fn index_off() -> Vec<String> {
    if Path::new("/sys/module/overlay/parameters/index").exists() {
        vec!["index=off".to_string()]
    } else {
        Vec::new()
    }
}

#[test]
fn mounts_follow_the_overlayfs_snapshotter() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let sn = Snapshotter::open(root).expect("open");

    // A first layer: a read-write bind of its own fs dir.
    let m = sn.prepare("a", "", no_labels()).expect("prepare a");
    assert_eq!(
        m,
        [Mount {
            kind: "bind".into(),
            source: fs_of(root, 1),
            options: vec!["rw".into(), "rbind".into()],
        }]
    );
    let work = root.join("snapshots/1/work");
    assert!(work.is_dir(), "active snapshots have a work dir");
    let mode = fs::metadata(root.join("snapshots/1/fs"))
        .expect("fs dir")
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o755);
    fs::write(root.join("snapshots/1/fs/hello"), "hi").expect("write into layer");
    sn.commit("A", "a", no_labels()).expect("commit a");
    assert!(matches!(sn.stat("a"), Err(Error::NotFound(_))));
    assert_eq!(sn.stat("A").expect("stat A").kind, Kind::Committed);

    // An active snapshot on one layer: overlay with upper, work and that one lower dir.
    let m = sn.prepare("b", "A", no_labels()).expect("prepare b");
    let mut opts = index_off();
    opts.push(format!(
        "workdir={}",
        root.join("snapshots/2/work").display()
    ));
    opts.push(format!("upperdir={}", fs_of(root, 2)));
    opts.push(format!("lowerdir={}", fs_of(root, 1)));
    assert_eq!(
        m,
        [Mount {
            kind: "overlay".into(),
            source: "overlay".into(),
            options: opts,
        }]
    );
    assert_eq!(
        sn.mounts("b").expect("mounts b"),
        m,
        "Mounts repeats Prepare"
    );

    // A view of one layer: a read-only bind of that layer, no dirs of its own used.
    let v = sn.view("v1", "A", no_labels()).expect("view");
    assert_eq!(
        v,
        [Mount {
            kind: "bind".into(),
            source: fs_of(root, 1),
            options: vec!["ro".into(), "rbind".into()],
        }]
    );
    assert!(
        !root.join("snapshots/3/work").exists(),
        "views have no work dir"
    );

    // A view of two layers: overlay with only lower dirs, nearest first.
    sn.commit("B", "b", no_labels()).expect("commit b");
    let v = sn.view("v2", "B", no_labels()).expect("view 2");
    let mut opts = index_off();
    opts.push(format!("lowerdir={}:{}", fs_of(root, 2), fs_of(root, 1)));
    assert_eq!(
        v,
        [Mount {
            kind: "overlay".into(),
            source: "overlay".into(),
            options: opts,
        }]
    );
    // A view with no parent is an empty read-only bind.
    let v = sn.view("empty", "", no_labels()).expect("empty view");
    assert_eq!(v[0].options, ["ro", "rbind"]);
}

#[test]
fn errors_are_the_ones_containerd_expects() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sn = Snapshotter::open(dir.path()).expect("open");
    sn.prepare("a", "", no_labels()).expect("prepare");
    assert!(matches!(
        sn.prepare("a", "", no_labels()),
        Err(Error::AlreadyExists(_))
    ));
    assert!(matches!(
        sn.prepare("x", "missing", no_labels()),
        Err(Error::NotFound(_))
    ));
    // Only committed snapshots can be parents.
    assert!(matches!(
        sn.prepare("x", "a", no_labels()),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(sn.mounts("nope"), Err(Error::NotFound(_))));
    sn.commit("A", "a", no_labels()).expect("commit");
    sn.prepare("b", "", no_labels()).expect("prepare b");
    assert!(matches!(
        sn.commit("A", "b", no_labels()),
        Err(Error::AlreadyExists(_))
    ));
    sn.view("v", "A", no_labels()).expect("view");
    assert!(matches!(
        sn.commit("V", "v", no_labels()),
        Err(Error::FailedPrecondition(_))
    ));
    // A parent with children stays; once the child is gone it can go.
    assert!(matches!(sn.remove("A"), Err(Error::FailedPrecondition(_))));
    sn.remove("v").expect("remove view");
    sn.remove("A").expect("remove A");
    assert!(matches!(sn.remove("A"), Err(Error::NotFound(_))));
    assert!(!dir.path().join("snapshots/1").exists(), "dir removed");
    // The failed commits left "b" as it was.
    assert_eq!(sn.stat("b").expect("stat b").kind, Kind::Active);
}

#[test]
fn commit_records_usage_and_labels_update_by_mask() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sn = Snapshotter::open(dir.path()).expect("open");
    sn.prepare("a", "", no_labels()).expect("prepare");
    let fs_dir = dir.path().join("snapshots/1/fs");
    fs::write(fs_dir.join("big"), vec![7u8; 100_000]).expect("write");
    fs::hard_link(fs_dir.join("big"), fs_dir.join("big2")).expect("link");
    let live = sn.usage("a").expect("usage active");
    assert_eq!(live.inodes, 2, "fs dir + one file (hard link counted once)");
    assert!(live.size >= 100_000, "{live:?}");
    let labels = BTreeMap::from([("k1".to_string(), "v1".to_string())]);
    sn.commit("A", "a", labels.clone()).expect("commit");
    assert_eq!(sn.usage("A").expect("usage committed"), live);
    assert_eq!(sn.stat("A").expect("stat").labels, labels);

    // "labels.K" touches one label (and removes it when absent); "labels" replaces all.
    let new = BTreeMap::from([("k2".to_string(), "v2".to_string())]);
    let i = sn
        .update("A", new.clone(), &["labels.k2".to_string()])
        .expect("update k2");
    assert_eq!(i.labels.len(), 2);
    let i = sn
        .update("A", BTreeMap::new(), &["labels.k1".to_string()])
        .expect("drop k1");
    assert_eq!(i.labels, new);
    let i = sn.update("A", labels.clone(), &[]).expect("replace");
    assert_eq!(i.labels, labels);
    assert!(i.updated.secs >= i.created.secs);
    assert!(matches!(
        sn.update("A", labels, &["parent".to_string()]),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn committed_snapshots_survive_reopening_and_leftovers_are_cleaned() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    {
        let sn = Snapshotter::open(root).expect("open");
        sn.prepare("a", "", no_labels()).expect("prepare");
        fs::write(root.join("snapshots/1/fs/f"), "content").expect("write");
        sn.commit("A", "a", no_labels()).expect("commit");
        sn.prepare("b", "A", no_labels()).expect("prepare b");
    }
    // What a crash can leave: a half-built temp dir, a renamed but unrecorded id, and a
    // half-removed dir.
    for d in ["new-123", "99", "rm-7"] {
        fs::create_dir_all(root.join("snapshots").join(d).join("fs")).expect("leftover");
    }
    let sn = Snapshotter::open(root).expect("reopen");
    let mut names: Vec<_> = sn
        .list()
        .expect("list")
        .into_iter()
        .map(|i| i.name)
        .collect();
    names.sort();
    assert_eq!(names, ["A", "b"]);
    assert_eq!(
        fs::read_to_string(root.join("snapshots/1/fs/f")).expect("layer content"),
        "content"
    );
    let mut dirs: Vec<_> = fs::read_dir(root.join("snapshots"))
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    dirs.sort();
    assert_eq!(dirs, ["1", "2"]);
    // Ids are never reused, even after removals.
    sn.remove("b").expect("remove b");
    sn.prepare("c", "A", no_labels()).expect("prepare c");
    assert!(root.join("snapshots/3").is_dir());
    // Cleanup on a clean root removes nothing.
    assert_eq!(sn.cleanup().expect("cleanup"), 0);
    // A second process on the same root is refused (the database is locked).
    assert!(Snapshotter::open(root).is_err());
}

/// Stands in for the remote-layer logic to come: provides the layer under its ref name.
struct ProvideRef {
    calls: AtomicUsize,
}

impl PrepareHook for ProvideRef {
    fn prepare(
        &self,
        sn: &Snapshotter,
        key: &str,
        parent: &str,
        labels: &BTreeMap<String, String>,
    ) -> talaria_node::Result<HookOutcome> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let Some(name) = labels.get(TARGET_SNAPSHOT_REF_LABEL) else {
            return Ok(HookOutcome::Unpack);
        };
        let tmp = format!("{key}-remote");
        sn.prepare_plain(&tmp, parent, BTreeMap::new())?;
        sn.commit(name, &tmp, labels.clone())?;
        Ok(HookOutcome::Provided { name: name.clone() })
    }
}

#[test]
fn a_prepare_hook_can_provide_layers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hook = Arc::new(ProvideRef {
        calls: AtomicUsize::new(0),
    });
    let sn = Snapshotter::open(dir.path())
        .expect("open")
        .with_hook(hook.clone());
    let labels = BTreeMap::from([(
        TARGET_SNAPSHOT_REF_LABEL.to_string(),
        "sha256:chain".to_string(),
    )]);
    match sn.prepare("extract-1", "", labels) {
        Err(Error::AlreadyExists(name)) => assert_eq!(name, "sha256:chain"),
        other => panic!("expected AlreadyExists, got {other:?}"),
    }
    assert_eq!(sn.stat("sha256:chain").expect("stat").kind, Kind::Committed);
    assert!(matches!(sn.stat("extract-1"), Err(Error::NotFound(_))));
    // Without the label the hook passes and an ordinary active snapshot is made.
    sn.prepare("rw", "sha256:chain", no_labels())
        .expect("prepare");
    assert_eq!(sn.stat("rw").expect("stat").kind, Kind::Active);
    assert_eq!(hook.calls.load(Ordering::Relaxed), 2);
}
