//! What the kernel keeps of a layer mounted with real FUSE, so a start does not ask the
//! node twice: names a layer lacks (negative entries), symlink targets, directory listings
//! (no opendir round trips), and, on a layer without extended attributes, the answer that
//! it has none. Counted with the node's own per-op request counters.

mod common;

use std::fs;
use std::path::Path;
use std::sync::Arc;

use talaria_node::metrics::{Metrics, OpLabels};

/// A layer: `etc/app.conf`, `etc/link -> app.conf`, `bin/tool` (with xattr `user.k=v` when
/// `xattr`).
fn layer_tar(xattr: bool) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let file = |b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o755);
        h.set_mtime(1);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, path, data).expect("tar entry");
    };
    file(&mut b, "etc/app.conf", b"key=value\n");
    if xattr {
        b.append_pax_extensions([("SCHILY.xattr.user.k", b"v".as_slice())])
            .expect("pax xattr");
    }
    file(&mut b, "bin/tool", b"#!/bin/sh\n");
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o777);
    h.set_mtime(1);
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    b.append_link(&mut h, "etc/link", "app.conf")
        .expect("symlink entry");
    b.into_inner().expect("tar")
}

struct Mounted {
    _tmp: tempfile::TempDir,
    mnt: std::path::PathBuf,
    metrics: Arc<Metrics>,
    session: Option<talaria_node::layerfs::Served>,
    _rt: tokio::runtime::Runtime,
}

impl Mounted {
    fn new(xattr: bool) -> Mounted {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (reader, _) = common::tar_layer_reader(tmp.path(), &layer_tar(xattr));
        let rt = common::runtime(1);
        let metrics = Arc::new(Metrics::new());
        let fs_ = common::layer_fs(reader, &rt, metrics.clone());
        let mnt = tmp.path().join("mnt");
        fs::create_dir_all(&mnt).expect("mountpoint");
        let session = fs_.mount(&mnt).expect("mount FUSE");
        Mounted {
            _tmp: tmp,
            mnt,
            metrics,
            session: Some(session),
            _rt: rt,
        }
    }

    fn ops(&self, op: &str) -> u64 {
        self.metrics
            .fuse_requests
            .get_or_create(&OpLabels { op: op.into() })
            .get()
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            let _ = s.unmount();
        }
    }
}

fn getxattr(path: &Path, name: &str) -> Result<Vec<u8>, i32> {
    xattr::get(path, name)
        .map_err(|e| e.raw_os_error().unwrap_or(0))
        .and_then(|v| v.ok_or(libc::ENODATA))
}

#[test]
fn the_kernel_keeps_what_a_layer_lacks_and_its_symlinks_and_listings() {
    let m = Mounted::new(false);

    // A name the layer lacks: asked once, then the kernel's negative entry answers.
    for _ in 0..3 {
        assert!(!m.mnt.join("etc/missing").exists());
    }
    assert_eq!(m.ops("lookup_miss"), 1, "misses asked of the node");

    // A symlink's target: read once.
    for _ in 0..3 {
        assert_eq!(
            fs::read_link(m.mnt.join("etc/link")).expect("readlink"),
            Path::new("app.conf")
        );
    }
    assert_eq!(m.ops("readlink"), 1, "readlinks asked of the node");
    assert_eq!(
        fs::read(m.mnt.join("etc/link")).expect("read through the link"),
        b"key=value\n"
    );

    // Directory listings: no opendir after the first, and the second listing is cached.
    let list = |d: &str| {
        let mut v: Vec<String> = fs::read_dir(m.mnt.join(d))
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(list("etc"), ["app.conf", "link"]);
    let (opendirs, readdirs) = (m.ops("opendir"), m.ops("readdir"));
    assert_eq!(opendirs, 1, "the first opendir answers ENOSYS");
    assert!(readdirs >= 1);
    assert_eq!(list("etc"), ["app.conf", "link"]);
    assert_eq!(list("bin"), ["tool"]);
    assert_eq!(m.ops("opendir"), 1, "opendirs asked of the node");
    assert_eq!(list("etc"), ["app.conf", "link"]);
    let after = m.ops("readdir");
    assert_eq!(list("etc"), ["app.conf", "link"]);
    assert_eq!(
        m.ops("readdir"),
        after,
        "a listing read again from the kernel's cache"
    );

    // No extended attribute anywhere: the first getxattr answers ENOSYS, the kernel says
    // EOPNOTSUPP to all later ones without asking; the list is still answered (empty).
    for _ in 0..3 {
        assert_eq!(
            getxattr(&m.mnt.join("bin/tool"), "security.capability"),
            Err(libc::EOPNOTSUPP)
        );
    }
    assert_eq!(
        getxattr(&m.mnt.join("etc"), "trusted.overlay.opaque"),
        Err(libc::EOPNOTSUPP)
    );
    assert_eq!(m.ops("getxattr"), 1, "getxattrs asked of the node");
    assert_eq!(
        xattr::list(m.mnt.join("bin/tool"))
            .expect("listxattr")
            .count(),
        0
    );
}

#[test]
fn a_layer_with_extended_attributes_answers_each_getxattr() {
    let m = Mounted::new(true);
    let tool = m.mnt.join("bin/tool");
    assert_eq!(getxattr(&tool, "user.k"), Ok(b"v".to_vec()));
    assert_eq!(getxattr(&tool, "user.other"), Err(libc::ENODATA));
    assert_eq!(
        getxattr(&m.mnt.join("etc/app.conf"), "user.k"),
        Err(libc::ENODATA)
    );
    assert_eq!(m.ops("getxattr"), 3);
    assert_eq!(m.ops("getxattr_miss"), 2);
    let names: Vec<_> = xattr::list(&tool).expect("listxattr").collect();
    assert_eq!(names, [std::ffi::OsString::from("user.k")]);
}
