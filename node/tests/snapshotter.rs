//! Snapshot semantics of the library on a real filesystem, and what survives reopening.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use talaria_node::Error;
use talaria_node::snapshot::metadata::Kind;
use talaria_node::snapshot::{
    HookError, LocatedLayer, Mount, PrepareHook, Snapshotter, TARGET_SNAPSHOT_REF_LABEL, Usage,
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

/// Stands in for the remote-layer hook: provides layers by writing a marker file, or fails
/// the mount when asked to.
struct ProvideRef {
    calls: AtomicUsize,
    fail_mount: bool,
    /// How each provided layer ended: Ok, or the error's message.
    outcomes: Mutex<Vec<Result<(), String>>>,
}

struct FakeLayer<'a> {
    hook: &'a ProvideRef,
}

impl LocatedLayer for FakeLayer<'_> {
    fn mount(&mut self, _id: u64, dir: &Path, fs_dir: &Path) -> Result<Usage, HookError> {
        assert!(dir.join("fs") == fs_dir, "fs_dir is the snapshot dir's fs");
        if self.hook.fail_mount {
            return Err("mount refused".into());
        }
        std::fs::write(fs_dir.join("marker"), b"remote")?;
        Ok(Usage { size: 6, inodes: 1 })
    }

    fn finish(self: Box<Self>, outcome: Result<(), HookError>) {
        self.hook
            .outcomes
            .lock()
            .unwrap()
            .push(outcome.map_err(|e| e.to_string()));
    }
}

impl PrepareHook for ProvideRef {
    fn locate<'a>(
        &'a self,
        _key: &str,
        _parent: &str,
        labels: &BTreeMap<String, String>,
    ) -> Option<Box<dyn LocatedLayer + 'a>> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        labels.get(TARGET_SNAPSHOT_REF_LABEL)?;
        Some(Box::new(FakeLayer { hook: self }))
    }
}

fn provide_ref(fail_mount: bool) -> Arc<ProvideRef> {
    Arc::new(ProvideRef {
        calls: AtomicUsize::new(0),
        fail_mount,
        outcomes: Mutex::new(Vec::new()),
    })
}

fn chain_labels() -> BTreeMap<String, String> {
    BTreeMap::from([(
        TARGET_SNAPSHOT_REF_LABEL.to_string(),
        "sha256:chain".to_string(),
    )])
}

#[test]
fn a_prepare_hook_can_provide_layers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hook = provide_ref(false);
    let sn = Snapshotter::open(dir.path())
        .expect("open")
        .with_hook(hook.clone());
    match sn.prepare("extract-1", "", chain_labels()) {
        Err(Error::AlreadyExists(name)) => assert_eq!(name, "sha256:chain"),
        other => panic!("expected AlreadyExists, got {other:?}"),
    }
    let info = sn.stat("sha256:chain").expect("stat");
    assert_eq!(info.kind, Kind::Committed);
    assert_eq!(
        info.labels
            .get(TARGET_SNAPSHOT_REF_LABEL)
            .map(String::as_str),
        Some("sha256:chain"),
        "committed under its target label"
    );
    let id = sn.id_of("sha256:chain").expect("id");
    assert_eq!(
        std::fs::read(sn.fs_path(id).join("marker")).expect("marker"),
        b"remote"
    );
    assert!(matches!(sn.stat("extract-1"), Err(Error::NotFound(_))));
    assert_eq!(*hook.outcomes.lock().unwrap(), [Ok(())]);
    // The same chain again: found by label, the hook is not asked.
    assert!(matches!(
        sn.prepare("extract-2", "", chain_labels()),
        Err(Error::AlreadyExists(_))
    ));
    assert_eq!(hook.calls.load(Ordering::Relaxed), 1);
    // Without the label the hook passes and an ordinary active snapshot is made.
    sn.prepare("rw", "sha256:chain", no_labels())
        .expect("prepare");
    assert_eq!(sn.stat("rw").expect("stat").kind, Kind::Active);
    assert_eq!(hook.calls.load(Ordering::Relaxed), 2);
}

#[test]
fn a_failed_remote_mount_unpacks_normally_and_leaves_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hook = provide_ref(true);
    let sn = Snapshotter::open(dir.path())
        .expect("open")
        .with_hook(hook.clone());
    sn.prepare("extract-1", "", chain_labels())
        .expect("an ordinary active snapshot");
    assert_eq!(sn.stat("extract-1").expect("stat").kind, Kind::Active);
    assert!(matches!(sn.stat("sha256:chain"), Err(Error::NotFound(_))));
    assert_eq!(
        *hook.outcomes.lock().unwrap(),
        [Err("mount refused".to_string())]
    );
    // Only the ordinary snapshot's directory is left (the half-made one was removed).
    let dirs: Vec<_> = std::fs::read_dir(dir.path().join("snapshots"))
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
}
