//! The snapshotter: containerd's overlayfs snapshotter semantics on our own root.
//!
//! Layout under `root`: `metadata.redb` and `snapshots/<id>/{fs,work}`. `fs` is the layer's
//! content (the upper dir of an active snapshot), `work` the overlayfs work dir of active
//! snapshots. Directories are built under `snapshots/new-*` and renamed into place inside the
//! metadata transaction; removed ones are renamed to `snapshots/rm-*` and deleted. Whatever a
//! crash leaves behind is not in the metadata and is deleted by [`Snapshotter::cleanup`].
//!
//! What containerd 1.6 sends (seen in the integration tests): keys are namespaced by its
//! metadata layer (`<namespace>/<seq>/<name>`); layer unpacks Prepare
//! `.../extract-<n>-<rand> <chainID>` and Commit it as `.../<chainID>`; a removed container's
//! snapshot is removed here only later, by containerd's garbage collector, followed by Cleanup.

pub mod metadata;
pub mod service;

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::{debug, info, warn};

use crate::error::{Error, Result};
use metadata::{Kind, LabelUpdate, Metadata, Record, Snapshot};

/// Label containerd's unpacker puts on layer Prepares: the chain id it will commit to.
/// A remote snapshotter that can provide the layer commits it under this name itself and
/// answers AlreadyExists, so containerd downloads nothing.
pub const TARGET_SNAPSHOT_REF_LABEL: &str = "containerd.io/snapshot.ref";
/// Labels the CRI plugin adds to layer Prepares when remote snapshotters are in use
/// (`snapshotter_annotations`): image reference, manifest digest, layer digest, and the
/// comma-separated digests of the image's layers. Remote-layer hooks key on these.
pub const CRI_IMAGE_REF_LABEL: &str = "containerd.io/snapshot/cri.image-ref";
pub const CRI_MANIFEST_DIGEST_LABEL: &str = "containerd.io/snapshot/cri.manifest-digest";
pub const CRI_LAYER_DIGEST_LABEL: &str = "containerd.io/snapshot/cri.layer-digest";
pub const CRI_IMAGE_LAYERS_LABEL: &str = "containerd.io/snapshot/cri.image-layers";

/// A mount as containerd's Mount message carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

/// Public view of a snapshot (containerd's snapshots.Info).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    pub name: String,
    pub parent: String,
    pub kind: Kind,
    pub created: crate::snapshot::metadata::Time,
    pub updated: crate::snapshot::metadata::Time,
    pub labels: BTreeMap<String, String>,
}

/// Disk usage as containerd counts it: allocated blocks of distinct inodes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub size: i64,
    pub inodes: i64,
}

/// An error of a remote layer, as the hook reports it (the hook counts and logs it).
pub type HookError = Box<dyn std::error::Error + Send + Sync>;

/// Seam for remote (lazy) layers. The snapshotter owns the snapshot's life: on a Prepare it
/// asks the hook once whether it can provide the layer, creates the snapshot, has the hook
/// mount the layer into it, and commits it. The hook never calls back into the snapshotter.
/// A failure never fails the pull: the snapshot is removed and the layer unpacked normally.
pub trait PrepareHook: Send + Sync {
    /// Called on every Prepare (a layer's or a container's) before anything is created:
    /// the remote layer to mount for it, or `None` to unpack normally.
    fn locate<'a>(
        &'a self,
        key: &str,
        parent: &str,
        labels: &BTreeMap<String, String>,
    ) -> Option<Box<dyn LocatedLayer + 'a>>;

    /// Called when snapshot `id` was removed from the metadata, before its directory is
    /// deleted (e.g. to unmount what the hook mounted there).
    fn removing(&self, _id: u64, _fs_dir: &Path) {}
}

/// A remote layer a [`PrepareHook`] located for one Prepare.
pub trait LocatedLayer {
    /// Mounts the layer at `fs_dir` of the new active snapshot `id` (whose directory is
    /// `dir`); returns the usage its unpacked copy would have.
    fn mount(
        &mut self,
        id: u64,
        dir: &Path,
        fs_dir: &Path,
    ) -> std::result::Result<Usage, HookError>;

    /// How providing the layer ended: committed (`Ok`), or failed at the mount or the
    /// snapshot step (then the snapshot was removed and the layer is unpacked normally).
    fn finish(self: Box<Self>, outcome: std::result::Result<(), HookError>);
}

pub struct Snapshotter {
    root: PathBuf,
    store: Metadata,
    hook: Option<Arc<dyn PrepareHook>>,
    /// The overlay module knows `index=`; containerd then passes `index=off`.
    index_off: bool,
}

fn info_of(key: &str, rec: &Record) -> Info {
    Info {
        name: key.to_string(),
        parent: rec.parent.clone(),
        kind: rec.kind,
        created: rec.created,
        updated: rec.updated,
        labels: rec.labels.clone(),
    }
}

fn mkdir_mode(path: &Path, mode: u32) -> Result<()> {
    fs::create_dir(path).map_err(Error::io(format!("creating {}", path.display())))?;
    // Explicitly, so the umask does not decide.
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(Error::io(format!("setting the mode of {}", path.display())))
}

fn sync_dir(path: &Path) -> Result<()> {
    fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(Error::io(format!("syncing {}", path.display())))
}

/// Usage of the tree at `path`: blocks × 512 of each distinct inode (hard links once),
/// the root included. Iterative, so deep trees cannot overflow the stack.
pub fn disk_usage(path: &Path) -> Result<Usage> {
    let mut seen = HashSet::new();
    let mut size: i64 = 0;
    let mut stack = vec![path.to_path_buf()];
    while let Some(p) = stack.pop() {
        let md = fs::symlink_metadata(&p).map_err(Error::io(format!("stat {}", p.display())))?;
        if seen.insert((md.dev(), md.ino())) {
            size = size
                .saturating_add(i64::try_from(md.blocks().saturating_mul(512)).unwrap_or(i64::MAX));
        }
        if md.is_dir() {
            for entry in fs::read_dir(&p).map_err(Error::io(format!("reading {}", p.display())))? {
                let entry = entry.map_err(Error::io(format!("reading {}", p.display())))?;
                stack.push(entry.path());
            }
        }
    }
    Ok(Usage {
        size,
        inodes: i64::try_from(seen.len()).unwrap_or(i64::MAX),
    })
}

impl Snapshotter {
    /// Opens the snapshotter at `root` (created if missing) and removes leftovers of
    /// interrupted creations and removals.
    pub fn open(root: &Path) -> Result<Snapshotter> {
        fs::create_dir_all(root).map_err(Error::io(format!("creating {}", root.display())))?;
        let snaps = root.join("snapshots");
        if !snaps.exists() {
            mkdir_mode(&snaps, 0o700)?;
        }
        let store = Metadata::open(&root.join("metadata.redb"))?;
        let sn = Snapshotter {
            root: root.to_path_buf(),
            store,
            hook: None,
            index_off: Path::new("/sys/module/overlay/parameters/index").exists(),
        };
        let removed = sn.cleanup()?;
        if removed > 0 {
            info!(removed, "removed leftover snapshot directories");
        }
        Ok(sn)
    }

    /// Installs the Prepare hook (remote layers).
    pub fn with_hook(mut self, hook: Arc<dyn PrepareHook>) -> Snapshotter {
        self.hook = Some(hook);
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn snapshots_dir(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    fn dir_of(&self, id: u64) -> PathBuf {
        self.snapshots_dir().join(id.to_string())
    }

    /// The content dir of snapshot `id`.
    pub fn fs_path(&self, id: u64) -> PathBuf {
        self.dir_of(id).join("fs")
    }

    fn work_path(&self, id: u64) -> PathBuf {
        self.dir_of(id).join("work")
    }

    /// Mounts exactly as containerd's overlayfs snapshotter builds them.
    fn mounts_of(&self, snap: &Snapshot) -> Vec<Mount> {
        let rec = &snap.record;
        if snap.parent_ids.is_empty() {
            let ro = if rec.kind == Kind::View { "ro" } else { "rw" };
            return vec![Mount {
                kind: "bind".into(),
                source: self.fs_path(rec.id).to_string_lossy().into_owned(),
                options: vec![ro.into(), "rbind".into()],
            }];
        }
        let mut options = Vec::new();
        if self.index_off {
            options.push("index=off".to_string());
        }
        if rec.kind == Kind::Active {
            options.push(format!("workdir={}", self.work_path(rec.id).display()));
            options.push(format!("upperdir={}", self.fs_path(rec.id).display()));
        } else if let [only] = snap.parent_ids.as_slice() {
            return vec![Mount {
                kind: "bind".into(),
                source: self.fs_path(*only).to_string_lossy().into_owned(),
                options: vec!["ro".into(), "rbind".into()],
            }];
        }
        let lower: Vec<String> = snap
            .parent_ids
            .iter()
            .map(|id| self.fs_path(*id).to_string_lossy().into_owned())
            .collect();
        options.push(format!("lowerdir={}", lower.join(":")));
        vec![Mount {
            kind: "overlay".into(),
            source: "overlay".into(),
            options,
        }]
    }

    fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        let snaps = self.snapshots_dir();
        let snap = self
            .store
            .create(key, parent, kind, labels, |id, parent_ids| {
                // Built under a temp name and renamed, so a half-made dir never has an id's name.
                let tmp = tempfile::Builder::new()
                    .prefix("new-")
                    .tempdir_in(&snaps)
                    .map_err(Error::io(format!(
                        "creating a temp dir in {}",
                        snaps.display()
                    )))?;
                let fs_dir = tmp.path().join("fs");
                mkdir_mode(&fs_dir, 0o755)?;
                if kind == Kind::Active {
                    mkdir_mode(&tmp.path().join("work"), 0o711)?;
                }
                if let Some(parent_id) = parent_ids.first() {
                    // The upper dir's owner follows the layer below, as overlayfs' snapshotter does.
                    let p = self.fs_path(*parent_id);
                    let md =
                        fs::metadata(&p).map_err(Error::io(format!("stat {}", p.display())))?;
                    std::os::unix::fs::chown(&fs_dir, Some(md.uid()), Some(md.gid()))
                        .map_err(Error::io(format!("chown {}", fs_dir.display())))?;
                }
                let target = self.dir_of(id);
                if target.exists() {
                    // Only a crash between rename and commit leaves this; the id was never
                    // recorded, so nothing refers to it.
                    fs::remove_dir_all(&target)
                        .map_err(Error::io(format!("removing stale {}", target.display())))?;
                }
                fs::rename(tmp.path(), &target).map_err(Error::io(format!(
                    "renaming {} to {}",
                    tmp.path().display(),
                    target.display()
                )))?;
                let _ = tmp.keep();
                sync_dir(&snaps)
            })?;
        debug!(key, parent, id = snap.record.id, ?kind, "created snapshot");
        Ok(self.mounts_of(&snap))
    }

    /// Creates an active snapshot `key` on committed `parent` ("" for none).
    pub fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        if let Some(hook) = &self.hook {
            if let Some(target) = labels
                .get(TARGET_SNAPSHOT_REF_LABEL)
                .filter(|t| !t.is_empty())
                && self.provided(target, parent)
            {
                // Another image with this chain has it: containerd finds it by label.
                return Err(Error::AlreadyExists(target.clone()));
            }
            if let Some(layer) = hook.locate(key, parent, &labels)
                && let Some(name) = self.provide(layer, key, parent, &labels)
            {
                info!(key, name, "prepare hook provided the snapshot");
                return Err(Error::AlreadyExists(name));
            }
        }
        self.create(Kind::Active, key, parent, labels)
    }

    /// Whether committed snapshot `target` on `parent` is there with its target label.
    fn provided(&self, target: &str, parent: &str) -> bool {
        self.stat(target).is_ok_and(|info| {
            info.kind == Kind::Committed
                && info.parent == parent
                && info
                    .labels
                    .get(TARGET_SNAPSHOT_REF_LABEL)
                    .map(String::as_str)
                    == Some(target)
        })
    }

    /// Creates active `key`, has `layer` mount into it and commits it under its target
    /// label: `Some(target)` when done. On failure the snapshot is removed (the hook
    /// unmounts through `removing`) and `layer` is told why.
    fn provide(
        &self,
        mut layer: Box<dyn LocatedLayer + '_>,
        key: &str,
        parent: &str,
        labels: &BTreeMap<String, String>,
    ) -> Option<String> {
        let target = labels.get(TARGET_SNAPSHOT_REF_LABEL)?.clone();
        let mut created = false;
        let mut steps = || -> std::result::Result<(), HookError> {
            self.create(Kind::Active, key, parent, labels.clone())?;
            created = true;
            let id = self.id_of(key)?;
            let usage = layer.mount(id, &self.dir_of(id), &self.fs_path(id))?;
            // Committed under the target with its label: containerd's metadata finds it by
            // both. Its usage comes from the index: the tree is not walked (each stat would
            // be a FUSE round trip during the pull) nor synced (it is read-only).
            let mut commit_labels = labels.clone();
            commit_labels.insert(TARGET_SNAPSHOT_REF_LABEL.to_string(), target.clone());
            self.record_commit(&target, key, commit_labels, usage)?;
            Ok(())
        };
        let outcome = steps();
        if outcome.is_err()
            && created
            && let Err(re) = self.remove(key)
        {
            warn!(key, error = %re, "removing the half-made remote snapshot failed");
        }
        let done = outcome.is_ok();
        layer.finish(outcome);
        done.then_some(target)
    }

    /// Creates a read-only view `key` of committed `parent`.
    pub fn view(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        self.create(Kind::View, key, parent, labels)
    }

    /// The mounts of an existing snapshot.
    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let snap = self.store.get(key)?;
        if snap.record.kind == Kind::Committed {
            // containerd only mounts active snapshots and views.
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key} is committed; mount a view or active snapshot of it"
            )));
        }
        Ok(self.mounts_of(&snap))
    }

    /// Commits active `key` as `name`, recording its disk usage.
    pub fn commit(&self, name: &str, key: &str, labels: BTreeMap<String, String>) -> Result<()> {
        let snap = self.active(key)?;
        let fs_dir = self.fs_path(snap.record.id);
        let usage = disk_usage(&fs_dir)?;
        // The unpacker writes without fsync; flush the layer before recording it committed so
        // a power loss cannot leave a committed snapshot with missing content.
        fs::File::open(&fs_dir)
            .and_then(|f| nix::unistd::syncfs(&f).map_err(std::io::Error::from))
            .map_err(Error::io(format!("syncfs {}", fs_dir.display())))?;
        self.record_commit(name, key, labels, usage)
    }

    /// Snapshot `key`, which must be active.
    fn active(&self, key: &str) -> Result<crate::snapshot::metadata::Snapshot> {
        let snap = self.store.get(key)?;
        if snap.record.kind != Kind::Active {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key} is not active"
            )));
        }
        Ok(snap)
    }

    fn record_commit(
        &self,
        name: &str,
        key: &str,
        labels: BTreeMap<String, String>,
        usage: Usage,
    ) -> Result<()> {
        let done = self
            .store
            .commit(name, key, labels, usage.size, usage.inodes)?;
        debug!(
            name,
            key,
            id = done.record.id,
            size = usage.size,
            "committed snapshot"
        );
        Ok(())
    }

    /// Removes `key` (refused while it has children) and deletes its directory.
    pub fn remove(&self, key: &str) -> Result<()> {
        let rec = self.store.remove(key)?;
        if let Some(hook) = &self.hook {
            hook.removing(rec.id, &self.fs_path(rec.id));
        }
        let dir = self.dir_of(rec.id);
        let doomed = self.snapshots_dir().join(format!("rm-{}", rec.id));
        // Renamed first so a half-deleted dir never looks live; failures are left to Cleanup.
        match fs::rename(&dir, &doomed) {
            Ok(()) => {
                if let Err(e) = fs::remove_dir_all(&doomed) {
                    warn!(key, dir = %doomed.display(), error = %e, "removing snapshot dir failed; Cleanup will retry");
                }
            }
            Err(e) => {
                warn!(key, dir = %dir.display(), error = %e, "renaming snapshot dir for removal failed; Cleanup will retry")
            }
        }
        debug!(key, id = rec.id, "removed snapshot");
        Ok(())
    }

    /// The numeric id of snapshot `key` (its directory under `snapshots/`).
    pub fn id_of(&self, key: &str) -> Result<u64> {
        Ok(self.store.get(key)?.record.id)
    }

    /// The directory of snapshot `id` (holds `fs`, and `work` when active).
    pub fn snapshot_dir(&self, id: u64) -> PathBuf {
        self.dir_of(id)
    }

    pub fn stat(&self, key: &str) -> Result<Info> {
        let snap = self.store.get(key)?;
        Ok(info_of(key, &snap.record))
    }

    /// Updates labels (the only mutable field). `paths` as containerd's field mask:
    /// empty or "labels" replaces all, "labels.K" sets or removes one label.
    pub fn update(
        &self,
        key: &str,
        labels: BTreeMap<String, String>,
        paths: &[String],
    ) -> Result<Info> {
        let update = if paths.is_empty() || paths.iter().any(|p| p == "labels") {
            LabelUpdate::All(labels)
        } else {
            let mut keys = BTreeMap::new();
            for p in paths {
                let Some(k) = p.strip_prefix("labels.") else {
                    return Err(Error::InvalidArgument(format!(
                        "cannot update field {p:?} of snapshot {key}"
                    )));
                };
                keys.insert(k.to_string(), labels.get(k).cloned());
            }
            LabelUpdate::Keys(keys)
        };
        let snap = self.store.update_labels(key, update)?;
        Ok(info_of(key, &snap.record))
    }

    /// Usage: measured now for active snapshots, as recorded at Commit otherwise.
    pub fn usage(&self, key: &str) -> Result<Usage> {
        let snap = self.store.get(key)?;
        if snap.record.kind == Kind::Active {
            return disk_usage(&self.fs_path(snap.record.id));
        }
        Ok(Usage {
            size: snap.record.size,
            inodes: snap.record.inodes,
        })
    }

    /// All snapshots (filters are not evaluated yet: containerd filters again on its side).
    pub fn list(&self) -> Result<Vec<Info>> {
        Ok(self
            .store
            .list()?
            .iter()
            .map(|(k, r)| info_of(k, r))
            .collect())
    }

    /// Deletes directories under `snapshots/` that no snapshot owns (leftovers of crashes and
    /// failed removals). Returns how many were removed.
    pub fn cleanup(&self) -> Result<usize> {
        let snaps = self.snapshots_dir();
        // Renamed while holding the metadata write lock, so no creation can race the listing.
        let doomed = self.store.with_live_ids(|live| -> Result<Vec<PathBuf>> {
            let mut doomed = Vec::new();
            let entries =
                fs::read_dir(&snaps).map_err(Error::io(format!("reading {}", snaps.display())))?;
            for entry in entries {
                let entry = entry.map_err(Error::io(format!("reading {}", snaps.display())))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.parse::<u64>().is_ok_and(|id| live.contains(&id)) {
                    continue;
                }
                if name.starts_with("rm-") {
                    doomed.push(entry.path());
                    continue;
                }
                let to = snaps.join(format!("rm-{name}"));
                fs::rename(entry.path(), &to).map_err(Error::io(format!(
                    "renaming {} for removal",
                    entry.path().display()
                )))?;
                doomed.push(to);
            }
            Ok(doomed)
        })??;
        let mut removed = 0;
        for d in doomed {
            let res = if d.is_dir() {
                fs::remove_dir_all(&d)
            } else {
                fs::remove_file(&d)
            };
            match res {
                Ok(()) => removed += 1,
                Err(e) => warn!(dir = %d.display(), error = %e, "cleanup could not remove"),
            }
        }
        Ok(removed)
    }
}
