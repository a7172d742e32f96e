//! Tree::build never panics on any layer index (decoded from the input, or indexed from the input as a tar): it refuses one carrying trusted.overlay.* xattrs, and otherwise builds deterministically, with at most one inode per entry and path component plus the root, or refuses with the path of an entry or of one of its parents.
#![no_main]

use libfuzzer_sys::fuzz_target;
use talaria_artifact::index::indexer::{IndexOptions, index_layer};
use talaria_artifact::index::{Compression, EntryKind, LayerIndex};
use talaria_node::layerfs::{FsError, Tree};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let index = if mode & 1 == 0 {
        LayerIndex::decode(rest).ok()
    } else {
        index_layer(rest, Compression::None, &IndexOptions { span_size: 1024 })
            .ok()
            .map(|o| o.index)
    };
    let Some(index) = index else {
        return;
    };
    match Tree::build(&index) {
        Ok(t) => {
            assert!(!t.is_empty());
            let bound: usize = 1 + index
                .entries
                .iter()
                .map(|e| 1 + e.path.split('/').count())
                .sum::<usize>();
            assert!(
                t.len() <= bound,
                "{} inodes for {} entries",
                t.len(),
                index.entries.len()
            );
            let marked = index
                .entries
                .iter()
                .any(|e| !e.xattrs.is_empty() || e.kind == EntryKind::OpaqueDir);
            assert!(marked || !t.has_xattrs(), "xattrs from nowhere");
            // overlayfs obeys trusted.overlay.* of a lower layer: only the tree sets them.
            assert!(
                !index
                    .entries
                    .iter()
                    .flat_map(|e| &e.xattrs)
                    .any(|(k, _)| k.starts_with("trusted.overlay.")),
                "a tree was built from an index carrying trusted.overlay.* xattrs"
            );
            let again = Tree::build(&index).expect("builds again");
            assert_eq!((again.len(), again.has_xattrs()), (t.len(), t.has_xattrs()));
        }
        Err(FsError::Tree { path, .. }) => {
            assert!(
                index
                    .entries
                    .iter()
                    .any(|e| e.path == path || e.path.starts_with(&format!("{path}/"))),
                "refused {path:?}, which no entry names"
            );
            assert!(Tree::build(&index).is_err(), "refuses again");
        }
        Err(e) => panic!("building a tree is pure, yet: {e}"),
    }
});
