//! The inode tree of one layer, built from its index: what containerd's overlayfs applier
//! would extract. Later tar entries with one path win, missing parent directories appear as
//! root-owned 0755 directories, hard links share an inode, whiteouts are character devices
//! 0/0 and opaque directories carry the xattr `trusted.overlay.opaque=y`, so overlayfs treats
//! the mount like an unpacked layer. Pure data: no I/O.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{FileAttr, FileType, INodeNo};
use talaria_artifact::index::{Entry, EntryKind, LayerIndex};

use super::FsError;

pub(super) const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
const OVERLAY_XATTR_PREFIX: &str = "trusted.overlay.";

pub(super) struct Node {
    pub(super) kind: FileType,
    pub(super) perm: u16,
    pub(super) uid: u32,
    pub(super) gid: u32,
    pub(super) mtime: SystemTime,
    pub(super) size: u64,
    pub(super) rdev: u32,
    pub(super) nlink: u32,
    /// Index of the tar entry holding a regular file's content.
    pub(super) content: Option<usize>,
    pub(super) link: Option<Vec<u8>>,
    pub(super) xattrs: Vec<(String, Vec<u8>)>,
    pub(super) opaque: bool,
    pub(super) parent: u64,
    pub(super) children: BTreeMap<Vec<u8>, u64>,
}

impl Node {
    fn dir(parent: u64) -> Node {
        Node {
            kind: FileType::Directory,
            perm: 0o755,
            uid: 0,
            gid: 0,
            mtime: UNIX_EPOCH,
            size: 0,
            rdev: 0,
            nlink: 2,
            content: None,
            link: None,
            xattrs: Vec::new(),
            opaque: false,
            parent,
            children: BTreeMap::new(),
        }
    }
}

/// The inode table of a layer (ino = position + 1; 1 is the root).
pub struct Tree {
    nodes: Vec<Node>,
    /// Some inode has an extended attribute (the opaque marker counts).
    any_xattrs: bool,
}

pub(super) fn mtime_of(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
    } else {
        UNIX_EPOCH
            .checked_sub(Duration::from_secs(secs.unsigned_abs()))
            .unwrap_or(UNIX_EPOCH)
    }
}

pub(super) fn makedev(major: u32, minor: u32) -> u32 {
    // The kernel's new_encode_dev, which FUSE's 32-bit rdev carries.
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

fn split(path: &str) -> (&str, &str) {
    match path.rsplit_once('/') {
        Some((p, n)) => (p, n),
        None => ("", path),
    }
}

impl Tree {
    /// Builds the tree of `index`; fails on what extraction would refuse (a path below a
    /// non-directory, a hard link to nothing), which makes the caller fall back.
    pub fn build(index: &LayerIndex) -> Result<Tree, FsError> {
        let mut t = Tree {
            nodes: vec![Node::dir(1)],
            any_xattrs: false,
        };
        // Entries come in archive order, a directory's mostly together: the last parent
        // found is tried first, instead of walking down from the root for every entry.
        let mut last_dir = (String::new(), 1u64);
        for (i, e) in index.entries.iter().enumerate() {
            t.add(i, e, &mut last_dir)?;
        }
        // Directory link counts as on disk: 2 + subdirectories.
        let subdirs: Vec<(u64, u32)> = t
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.kind == FileType::Directory)
            .map(|(i, n)| {
                let subs = n
                    .children
                    .values()
                    .filter(|c| t.node(**c).is_some_and(|c| c.kind == FileType::Directory))
                    .count();
                (
                    i as u64 + 1,
                    2 + u32::try_from(subs).unwrap_or(u32::MAX - 2),
                )
            })
            .collect();
        for (ino, n) in subdirs {
            if let Some(node) = t.node_mut(ino) {
                node.nlink = n;
            }
        }
        t.any_xattrs = t.nodes.iter().any(|n| n.opaque || !n.xattrs.is_empty());
        Ok(t)
    }

    pub(super) fn node(&self, ino: u64) -> Option<&Node> {
        self.nodes.get(usize::try_from(ino).ok()?.checked_sub(1)?)
    }

    fn node_mut(&mut self, ino: u64) -> Option<&mut Node> {
        self.nodes
            .get_mut(usize::try_from(ino).ok()?.checked_sub(1)?)
    }

    fn push(&mut self, n: Node) -> u64 {
        self.nodes.push(n);
        self.nodes.len() as u64
    }

    /// The inode at `path`, walking down from the root (paths are normalized by the index).
    pub(super) fn lookup(&self, path: &str) -> Option<u64> {
        if path.is_empty() {
            return Some(1);
        }
        let mut ino = 1;
        for comp in path.split('/') {
            ino = *self.node(ino)?.children.get(comp.as_bytes())?;
        }
        Some(ino)
    }

    /// The directory at `path`, created (with missing parents) if absent.
    fn ensure_dir(&mut self, path: &str) -> Result<u64, FsError> {
        let mut ino = 1;
        if path.is_empty() {
            return Ok(ino);
        }
        for comp in path.split('/') {
            let next = self
                .node(ino)
                .and_then(|n| n.children.get(comp.as_bytes()).copied());
            ino = match next {
                Some(c) if self.node(c).is_some_and(|n| n.kind == FileType::Directory) => c,
                Some(_) => {
                    return Err(FsError::Tree {
                        path: path.to_string(),
                        message: format!("{comp:?} is used as a directory but is not one"),
                    });
                }
                None => {
                    let c = self.push(Node::dir(ino));
                    if let Some(p) = self.node_mut(ino) {
                        p.children.insert(comp.as_bytes().to_vec(), c);
                    }
                    c
                }
            };
        }
        Ok(ino)
    }

    /// Unlinks `name` from `pino` (as extraction replaces an existing path). Returns
    /// whether there was something to unlink.
    fn unlink(&mut self, pino: u64, name: &str) -> bool {
        let old = self
            .node_mut(pino)
            .and_then(|p| p.children.remove(name.as_bytes()));
        let removed = old.is_some();
        if let Some(n) = old.and_then(|old| self.node_mut(old)) {
            n.nlink = n.nlink.saturating_sub(1);
        }
        removed
    }

    /// Adds entry `i`. `last_dir` is the last parent directory (path, inode); a path that
    /// replaces another forgets it, as it may lie below the replaced one.
    fn add(&mut self, i: usize, e: &Entry, last_dir: &mut (String, u64)) -> Result<(), FsError> {
        let err = |message: &str| FsError::Tree {
            path: e.path.clone(),
            message: message.to_string(),
        };
        let uid = u32::try_from(e.uid).map_err(|_| err("uid out of range"))?;
        let gid = u32::try_from(e.gid).map_err(|_| err("gid out of range"))?;
        let perm = (e.mode & 0o7777) as u16;
        // overlayfs reads `trusted.overlay.*` of its lower layers as instructions (opaque,
        // redirect, metacopy, origin): only this tree sets them (opaque directories from
        // `.wh..wh..opq`); an index carrying one is not mounted (the layer is unpacked).
        if e.xattrs
            .iter()
            .any(|(k, _)| k.starts_with(OVERLAY_XATTR_PREFIX))
        {
            return Err(err("carries a trusted.overlay.* extended attribute"));
        }
        if e.kind == EntryKind::OpaqueDir {
            let ino = self.ensure_dir(&e.path)?;
            if let Some(n) = self.node_mut(ino) {
                n.opaque = true;
            }
            return Ok(());
        }
        if e.path.is_empty() {
            // The archive root: only its attributes matter.
            if e.kind == EntryKind::Dir
                && let Some(n) = self.node_mut(1)
            {
                (n.perm, n.uid, n.gid, n.mtime) = (perm, uid, gid, mtime_of(e.mtime));
                n.xattrs = e.xattrs.clone();
            }
            return Ok(());
        }
        let (parent, name) = split(&e.path);
        let pino = if last_dir.1 != 0 && last_dir.0 == parent {
            last_dir.1
        } else {
            let pino = self.ensure_dir(parent)?;
            last_dir.0.clear();
            last_dir.0.push_str(parent);
            last_dir.1 = pino;
            pino
        };
        let child = |t: &Tree| {
            t.node(pino)
                .and_then(|p| p.children.get(name.as_bytes()).copied())
        };
        if e.kind == EntryKind::Dir {
            // An existing directory keeps its children; only attributes change.
            if let Some(ino) = child(self)
                && self
                    .node(ino)
                    .is_some_and(|n| n.kind == FileType::Directory)
            {
                if let Some(n) = self.node_mut(ino) {
                    (n.perm, n.uid, n.gid, n.mtime) = (perm, uid, gid, mtime_of(e.mtime));
                    n.xattrs = e.xattrs.clone();
                }
                return Ok(());
            }
        }
        if e.kind == EntryKind::Hardlink {
            let target = e
                .link_target
                .as_deref()
                .ok_or_else(|| err("hard link without target"))?;
            let tino = self
                .lookup(target)
                .ok_or_else(|| err("hard link to a path not in the layer"))?;
            if self
                .node(tino)
                .is_some_and(|n| n.kind == FileType::Directory)
            {
                return Err(err("hard link to a directory"));
            }
            // Extraction chowns, chmods and stamps the shared inode with the link's header.
            if let Some(n) = self.node_mut(tino) {
                (n.perm, n.uid, n.gid, n.mtime) = (perm, uid, gid, mtime_of(e.mtime));
                for (k, v) in &e.xattrs {
                    n.xattrs.retain(|(name, _)| name != k);
                    n.xattrs.push((k.clone(), v.clone()));
                }
            }
            if child(self) != Some(tino) {
                if self.unlink(pino, name) {
                    last_dir.1 = 0;
                }
                if let Some(n) = self.node_mut(tino) {
                    n.nlink = n.nlink.saturating_add(1);
                }
                if let Some(p) = self.node_mut(pino) {
                    p.children.insert(name.as_bytes().to_vec(), tino);
                }
            }
            return Ok(());
        }
        if self.unlink(pino, name) {
            last_dir.1 = 0;
        }
        let mut n = Node::dir(pino);
        (n.perm, n.uid, n.gid, n.mtime) = (perm, uid, gid, mtime_of(e.mtime));
        n.xattrs = e.xattrs.clone();
        n.nlink = 1;
        match e.kind {
            EntryKind::Dir => n.nlink = 2,
            EntryKind::File => {
                n.kind = FileType::RegularFile;
                n.size = e.size;
                n.content = Some(i);
            }
            EntryKind::Symlink => {
                n.kind = FileType::Symlink;
                let target = e
                    .link_target
                    .as_deref()
                    .ok_or_else(|| err("symlink without target"))?;
                n.size = target.len() as u64;
                n.link = Some(target.as_bytes().to_vec());
            }
            EntryKind::Char => {
                n.kind = FileType::CharDevice;
                n.rdev = makedev(e.dev_major, e.dev_minor);
            }
            EntryKind::Block => {
                n.kind = FileType::BlockDevice;
                n.rdev = makedev(e.dev_major, e.dev_minor);
            }
            EntryKind::Fifo => n.kind = FileType::NamedPipe,
            EntryKind::Whiteout => {
                // As containerd's overlay converter makes it: mknod(S_IFCHR, 0), mode 0.
                n.kind = FileType::CharDevice;
                n.perm = 0;
                n.rdev = 0;
                n.xattrs.clear();
            }
            EntryKind::Hardlink | EntryKind::OpaqueDir => {}
        }
        let ino = self.push(n);
        if let Some(p) = self.node_mut(pino) {
            p.children.insert(name.as_bytes().to_vec(), ino);
        }
        Ok(())
    }

    pub(super) fn attr(&self, ino: u64) -> Option<FileAttr> {
        let n = self.node(ino)?;
        Some(FileAttr {
            ino: INodeNo(ino),
            size: n.size,
            blocks: n.size.div_ceil(512),
            atime: n.mtime,
            mtime: n.mtime,
            ctime: n.mtime,
            crtime: n.mtime,
            kind: n.kind,
            perm: n.perm,
            nlink: n.nlink,
            uid: n.uid,
            gid: n.gid,
            rdev: n.rdev,
            blksize: 4096,
            flags: 0,
        })
    }

    /// Extended attributes of `ino`, the overlay opaque marker included.
    pub(super) fn xattrs(&self, ino: u64) -> Option<Vec<(String, Vec<u8>)>> {
        let n = self.node(ino)?;
        let mut x = n.xattrs.clone();
        if n.opaque {
            x.retain(|(k, _)| k != OPAQUE_XATTR);
            x.push((OPAQUE_XATTR.to_string(), b"y".to_vec()));
        }
        Some(x)
    }

    /// Whether any inode has an extended attribute (the overlay opaque marker included).
    pub fn has_xattrs(&self) -> bool {
        self.any_xattrs
    }

    /// Number of inodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use talaria_artifact::index::Compression;
    use talaria_artifact::index::indexer::{IndexOptions, index_layer};

    /// The tree of an uncompressed layer made of `entries` (path, dir or file), in order.
    fn tree_of(entries: &[(&str, bool)]) -> Result<Tree, FsError> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, dir) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o755);
            h.set_size(0);
            h.set_entry_type(if *dir {
                tar::EntryType::Directory
            } else {
                tar::EntryType::Regular
            });
            b.append_data(&mut h, path, &[][..]).expect("tar entry");
        }
        let tar = b.into_inner().expect("tar");
        let ix = index_layer(
            &tar[..],
            Compression::None,
            &IndexOptions { span_size: 4096 },
        )
        .expect("index")
        .index;
        Tree::build(&ix)
    }

    #[test]
    fn entries_of_one_directory_land_in_it() {
        let t = tree_of(&[
            ("a/", true),
            ("a/x", false),
            ("a/y", false),
            ("b/c/z", false),
        ])
        .expect("tree");
        for p in ["a/x", "a/y", "b/c/z"] {
            let ino = t.lookup(p).unwrap_or_else(|| panic!("{p} missing"));
            assert_eq!(t.node(ino).map(|n| n.kind), Some(FileType::RegularFile));
        }
        assert_eq!(t.node(t.lookup("a").unwrap()).map(|n| n.nlink), Some(2));
    }

    #[test]
    fn a_directory_replaced_by_a_file_takes_no_more_children() {
        // Extraction refuses a/y once a is a file: so must the tree.
        let r = tree_of(&[("a/", true), ("a/x", false), ("a", false), ("a/y", false)]);
        assert!(
            matches!(&r, Err(FsError::Tree { path, message }) if path == "a" && message.contains("not one")),
            "{:?}",
            r.err()
        );
        // Replaced by a new directory instead: the new one is empty, then takes a/y.
        let t = tree_of(&[
            ("a/", true),
            ("a/x", false),
            ("a", false),
            ("a/", true),
            ("a/y", false),
        ])
        .expect("tree");
        assert!(t.lookup("a/x").is_none());
        assert!(t.lookup("a/y").is_some());
    }

    #[test]
    fn an_index_with_overlay_xattrs_is_refused() {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o755);
        h.set_size(0);
        h.set_entry_type(tar::EntryType::Directory);
        b.append_data(&mut h, "etc/", &[][..]).expect("tar entry");
        let tar = b.into_inner().expect("tar");
        let mut ix = index_layer(
            &tar[..],
            Compression::None,
            &IndexOptions { span_size: 4096 },
        )
        .expect("index")
        .index;
        ix.entries[0].xattrs = vec![("user.note".into(), b"fine".to_vec())];
        assert!(Tree::build(&ix).is_ok());
        // A redirect would make overlayfs look up another lower path for this directory.
        ix.entries[0].xattrs = vec![("trusted.overlay.redirect".into(), b"/root".to_vec())];
        let r = Tree::build(&ix);
        assert!(
            matches!(&r, Err(FsError::Tree { message, .. }) if message.contains("trusted.overlay")),
            "{:?}",
            r.err()
        );
    }
}
