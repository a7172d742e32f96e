//! A comparable summary of a file tree: what an image defines for every path (type, mode,
//! owner, content hash, link target, device numbers, xattrs, hard-link groups), so the tree
//! one snapshotter presents can be checked against another's (e.g. talaria vs overlayfs).
//!
//! ```no_run
//! # fn demo(pid: u32) -> Result<(), talaria_testenv::tree::TreeError> {
//! use talaria_testenv::tree;
//! let root = std::path::PathBuf::from(format!("/proc/{pid}/root"));
//! // A container's /proc, /dev, /etc/hosts ... are mounts of the runtime, not of the image.
//! let skip = tree::container_mount_points(pid)?;
//! let summary = tree::summarize(&root, &skip)?;
//! # let _ = summary; Ok(()) }
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Path (relative to the root, "/" for the root itself) → its description.
pub type Tree = BTreeMap<String, String>;

/// Why a tree could not be read.
#[derive(Debug, thiserror::Error)]
#[error("{what} {}: {source}", path.display())]
pub struct TreeError {
    pub what: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

fn err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> TreeError + use<> {
    let path = path.to_path_buf();
    move |source| TreeError { what, path, source }
}

/// Summarizes the tree under `root`, leaving out the paths in `skip` (relative, without a
/// leading slash, e.g. "proc") and everything below them. Directory entries are visited in
/// name order, so hard-link groups are named the same way whatever order the file system
/// lists them in. File contents are hashed in a streaming way (bounded memory).
pub fn summarize(root: &Path, skip: &[String]) -> Result<Tree, TreeError> {
    let skip: BTreeSet<&str> = skip.iter().map(|s| s.trim_matches('/')).collect();
    let mut out = Tree::new();
    // (dev, ino) of files with more than one link → their paths, to name link groups.
    let mut inodes: BTreeMap<(u64, u64), Vec<String>> = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        // The root itself may be a symlink to walk through, e.g. /proc/PID/root.
        let md = if p == root {
            fs::metadata(&p).map_err(err("stat", &p))?
        } else {
            fs::symlink_metadata(&p).map_err(err("lstat", &p))?
        };
        let rel = p
            .strip_prefix(root)
            .map(|r| r.to_string_lossy().into_owned())
            .unwrap_or_default();
        if skip.contains(rel.as_str()) {
            continue;
        }
        let rel = if rel.is_empty() { "/".to_string() } else { rel };
        let ft = md.file_type();
        let what = if ft.is_dir() {
            let mut names = Vec::new();
            for e in fs::read_dir(&p).map_err(err("listing", &p))? {
                names.push(e.map_err(err("listing", &p))?.file_name());
            }
            names.sort();
            // Reverse so the stack pops them in name order.
            stack.extend(names.into_iter().rev().map(|n| p.join(n)));
            "dir".to_string()
        } else if ft.is_symlink() {
            let target = fs::read_link(&p).map_err(err("readlink", &p))?;
            format!("symlink -> {}", target.display())
        } else if ft.is_file() {
            if md.nlink() > 1 {
                inodes
                    .entry((md.dev(), md.ino()))
                    .or_default()
                    .push(rel.clone());
            }
            let (len, hash) = hash_file(&p)?;
            format!("file {len} {hash}")
        } else if ft.is_char_device() {
            format!("char {}", md.rdev())
        } else if ft.is_block_device() {
            format!("block {}", md.rdev())
        } else if ft.is_fifo() {
            "fifo".to_string()
        } else if ft.is_socket() {
            "socket".to_string()
        } else {
            format!("other {:o}", md.mode())
        };
        let xattrs = xattrs(&p)?;
        // The root dir's own mode differs by snapshotter design (bind vs overlay); its
        // contents are what an image defines.
        let mode = if rel == "/" { 0 } else { md.mode() & 0o7777 };
        out.insert(
            rel,
            format!(
                "{what} mode={mode:o} uid={} gid={} xattrs=[{}]",
                md.uid(),
                md.gid(),
                xattrs.join(",")
            ),
        );
    }
    for paths in inodes.values().filter(|p| p.len() > 1) {
        let mut group = paths.clone();
        group.sort();
        let name = group.join("|");
        for p in paths {
            if let Some(v) = out.get_mut(p) {
                v.push_str(&format!(" links=[{name}]"));
            }
        }
    }
    Ok(out)
}

fn hash_file(p: &Path) -> Result<(u64, String), TreeError> {
    let mut f = fs::File::open(p).map_err(err("opening", p))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut len = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(err("reading", p))?;
        if n == 0 {
            break;
        }
        len += n as u64;
        h.update(&buf[..n]);
    }
    Ok((len, hex::encode(h.finalize())))
}

/// `name=value` of every xattr the caller may see, sorted.
fn xattrs(p: &Path) -> Result<Vec<String>, TreeError> {
    let mut out = Vec::new();
    for name in xattr::list(p).map_err(err("listing xattrs of", p))? {
        let v = xattr::get(p, &name)
            .map_err(err("reading an xattr of", p))?
            .unwrap_or_default();
        out.push(format!(
            "{}={}",
            name.to_string_lossy(),
            String::from_utf8_lossy(&v)
        ));
    }
    out.sort();
    Ok(out)
}

/// The mount points inside the mount namespace of process `pid`, relative to its root
/// (without the root itself), as [`summarize`] skips them: what a runtime mounts into a
/// container (/proc, /sys, /dev, /etc/hosts ...) is not part of its image.
pub fn container_mount_points(pid: u32) -> Result<Vec<String>, TreeError> {
    let path = PathBuf::from(format!("/proc/{pid}/mountinfo"));
    let text = fs::read_to_string(&path).map_err(err("reading", &path))?;
    let mut out: Vec<String> = text
        .lines()
        // Field 5 is the mount point relative to the process's root; octal escapes (\040)
        // only appear in names no image of ours uses.
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| m.trim_matches('/').to_string())
        .filter(|m| !m.is_empty())
        .collect();
    out.sort();
    out.dedup();
    Ok(out)
}

/// Differences between two trees, one line per path, for an assertion message.
pub fn diff(a_name: &str, a: &Tree, b_name: &str, b: &Tree) -> Vec<String> {
    let mut out = Vec::new();
    for (k, v) in a {
        match b.get(k) {
            Some(w) if w == v => {}
            Some(w) => out.push(format!("{k}: {a_name} {v} / {b_name} {w}")),
            None => out.push(format!("{k}: only in {a_name} ({v})")),
        }
    }
    for (k, v) in b {
        if !a.contains_key(k) {
            out.push(format!("{k}: only in {b_name} ({v})"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_names_link_groups_and_skips_subtrees() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = dir.path();
        fs::create_dir(r.join("d")).expect("mkdir");
        fs::write(r.join("d/a"), "x").expect("write");
        fs::hard_link(r.join("d/a"), r.join("b")).expect("link");
        std::os::unix::fs::symlink("d/a", r.join("s")).expect("symlink");
        fs::create_dir_all(r.join("skip/me")).expect("mkdir");
        let t = summarize(r, &["skip".into()]).expect("summary");
        assert!(!t.keys().any(|k| k.starts_with("skip")), "{t:?}");
        assert!(t["b"].ends_with(" links=[b|d/a]"), "{t:?}");
        assert!(t["d/a"].ends_with(" links=[b|d/a]"), "{t:?}");
        assert!(t["s"].starts_with("symlink -> d/a "), "{t:?}");
        assert!(t["/"].starts_with("dir mode=0 "), "{t:?}");
        // A root that is a symlink (like /proc/PID/root) is walked through.
        let links = tempfile::tempdir().expect("tempdir");
        std::os::unix::fs::symlink(r, links.path().join("root")).expect("symlink");
        let through = summarize(&links.path().join("root"), &["skip".into()]).expect("summary");
        assert_eq!(through, t);
        let mut other = t.clone();
        other.remove("s");
        other.insert("n".into(), "fifo".into());
        let d = diff("one", &t, "two", &other);
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(d[0].starts_with("s: only in one"), "{d:?}");
        assert!(d[1].starts_with("n: only in two"), "{d:?}");
    }

    #[test]
    fn mount_points_of_this_process_include_proc() {
        let m = container_mount_points(std::process::id()).expect("mountinfo");
        assert!(m.iter().any(|p| p == "proc"), "{m:?}");
        assert!(!m.iter().any(|p| p.is_empty()), "{m:?}");
    }
}
