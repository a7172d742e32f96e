//! The merged view of an image's file system through its layers' indexes, and path
//! resolution inside it. Pure data: no I/O, so the analyzers, the node and the CLI share it.
//!
//! [`MergedView`] applies the layers' indexes in order (whiteouts, opaque directories,
//! later layers win, hard links resolved) to find the layer and entry of any path;
//! [`resolve`] follows symlinks inside the image root, bounded, never escaping it.

pub mod resolve;

use std::collections::BTreeMap;

use tracing::warn;

use crate::index::{Entry, EntryKind, LayerIndex};

/// The merged file system view of an image's layers, through their indexes.
pub struct MergedView {
    /// path → (layer number, entry); hard links already point at their target's entry.
    entries: BTreeMap<String, (usize, Entry)>,
}

/// Bound on hard-link chains followed (tar links point at earlier entries; a cycle cannot
/// come from a valid archive, but the bound keeps hostile input harmless).
const MAX_LINK_HOPS: usize = 16;

fn under(path: &str) -> (String, String) {
    if path.is_empty() {
        (String::new(), String::from("\u{10FFFF}"))
    } else {
        // '0' is the character after '/', so [p/, p0) is exactly "everything under p".
        (format!("{path}/"), format!("{path}0"))
    }
}

impl MergedView {
    /// Applies the layers (bottom first). `layers[i]` is the index of image layer `i`;
    /// `None` for a layer that has no index (skipped): its files are not in the view.
    pub fn new(layers: &[Option<&LayerIndex>]) -> MergedView {
        let mut map: BTreeMap<String, (usize, Entry)> = BTreeMap::new();
        let remove_under = |map: &mut BTreeMap<String, (usize, Entry)>, p: &str| {
            let (lo, hi) = under(p);
            let doomed: Vec<String> = map.range(lo..hi).map(|(k, _)| k.clone()).collect();
            for k in doomed {
                map.remove(&k);
            }
        };
        for (i, layer) in layers.iter().enumerate() {
            let Some(layer) = layer else { continue };
            // Whiteouts and opaque markers hide lower layers only, so apply them first.
            for e in &layer.entries {
                match e.kind {
                    EntryKind::Whiteout => {
                        map.remove(&e.path);
                        remove_under(&mut map, &e.path);
                    }
                    EntryKind::OpaqueDir => remove_under(&mut map, &e.path),
                    _ => {}
                }
            }
            for e in &layer.entries {
                if matches!(e.kind, EntryKind::Whiteout | EntryKind::OpaqueDir) {
                    continue;
                }
                if e.kind != EntryKind::Dir {
                    // A non-directory replacing a lower directory hides its contents.
                    if map
                        .get(&e.path)
                        .is_some_and(|(l, x)| *l < i && x.kind == EntryKind::Dir)
                    {
                        remove_under(&mut map, &e.path);
                    }
                }
                let resolved = if e.kind == EntryKind::Hardlink {
                    resolve_link(layer, e, &map)
                } else {
                    Some((i, e.clone()))
                };
                if let Some((l, entry)) = resolved {
                    let l = if l == usize::MAX { i } else { l };
                    map.insert(e.path.clone(), (l, entry));
                }
            }
        }
        MergedView { entries: map }
    }

    /// The layer number and entry at a path (normalized like index paths; a leading `/`
    /// or `./` is accepted). A hard link yields its target's entry.
    pub fn lookup(&self, path: &str) -> Option<(usize, &Entry)> {
        let p = path.trim_start_matches("./").trim_start_matches('/');
        let p = p.trim_end_matches('/');
        self.entries.get(p).map(|(l, e)| (*l, e))
    }

    /// Every path of the merged view, sorted, with its layer and entry.
    pub fn list(&self) -> impl Iterator<Item = (&str, usize, &Entry)> {
        self.entries.iter().map(|(p, (l, e))| (p.as_str(), *l, e))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Finds what a hard link points at: the target in the same layer (tar semantics), else in
/// the lower merged view; follows chains, bounded.
fn resolve_link(
    layer: &LayerIndex,
    link: &Entry,
    lower: &BTreeMap<String, (usize, Entry)>,
) -> Option<(usize, Entry)> {
    let mut cur = link.clone();
    for _ in 0..MAX_LINK_HOPS {
        let target = cur.link_target.as_deref()?;
        let next = match layer.find(target) {
            // The layer number is fixed up by the caller for same-layer targets.
            Some(t) => (usize::MAX, t.clone()),
            None => {
                let (l, e) = lower.get(target)?;
                (*l, e.clone())
            }
        };
        if next.1.kind != EntryKind::Hardlink {
            return Some(next);
        }
        cur = next.1;
    }
    warn!(path = %link.path, "hard link chain too long; left out of the merged view");
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::Compression;
    use crate::index::indexer::IndexOptions;
    use crate::index::indexer::index_layer;

    enum T<'a> {
        Dir(&'a str),
        File(&'a str, &'a [u8]),
        Link(&'a str, &'a str),
    }

    fn layer(items: &[T<'_>]) -> LayerIndex {
        let mut b = tar::Builder::new(Vec::new());
        for it in items {
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o644);
            h.set_mtime(1);
            match it {
                T::Dir(p) => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_size(0);
                    b.append_data(&mut h, format!("{p}/"), std::io::empty())
                        .unwrap();
                }
                T::File(p, d) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(d.len() as u64);
                    b.append_data(&mut h, p, *d).unwrap();
                }
                T::Link(p, t) => {
                    h.set_entry_type(tar::EntryType::Link);
                    h.set_size(0);
                    b.append_link(&mut h, p, t).unwrap();
                }
            }
        }
        let tar = b.into_inner().unwrap();
        index_layer(tar.as_slice(), Compression::None, &IndexOptions::default())
            .unwrap()
            .index
    }

    fn paths(v: &MergedView) -> Vec<&str> {
        v.list().map(|(p, _, _)| p).collect()
    }

    #[test]
    fn file_over_dir_whiteouts_and_opaque() {
        let l0 = layer(&[
            T::Dir("a"),
            T::File("a/x", b"x"),
            T::Dir("b"),
            T::File("b/y", b"y"),
            T::Dir("c"),
            T::File("c/z", b"z"),
            T::File("keep", b"k0"),
        ]);
        let l1 = layer(&[
            T::File("a", b"now a file"),
            T::File(".wh.b", b""),
            T::Dir("c"),
            T::File("c/.wh..wh..opq", b""),
            T::File("c/new", b"n"),
            T::File("keep", b"k1"),
        ]);
        let v = MergedView::new(&[Some(&l0), Some(&l1)]);
        assert_eq!(paths(&v), ["a", "c", "c/new", "keep"]);
        let (layer_no, e) = v.lookup("/keep").unwrap();
        assert_eq!((layer_no, e.size), (1, 2));
        assert_eq!(v.lookup("a").unwrap().1.kind, EntryKind::File);
        assert!(v.lookup("b/y").is_none());
        // A skipped (unindexed) layer contributes nothing.
        let v = MergedView::new(&[None, Some(&l1)]);
        assert!(v.lookup("c/new").is_some());
    }

    #[test]
    fn hard_links_resolve_to_content_in_this_or_a_lower_layer() {
        let l0 = layer(&[T::File("base", b"lower content")]);
        let l1 = layer(&[
            T::File("f", b"upper"),
            T::Link("g", "f"),
            T::Link("h", "g"),
            T::Link("to-lower", "base"),
        ]);
        let v = MergedView::new(&[Some(&l0), Some(&l1)]);
        let (ln, e) = v.lookup("h").unwrap();
        assert_eq!((ln, e.kind, e.size), (1, EntryKind::File, 5));
        let (ln, e) = v.lookup("to-lower").unwrap();
        assert_eq!((ln, e.kind, e.size), (0, EntryKind::File, 13));
        // A link whose target does not exist is left out, not a panic.
        let l2 = layer(&[T::Link("dangling", "nowhere")]);
        let v = MergedView::new(&[Some(&l2)]);
        assert!(v.lookup("dangling").is_none());
    }
}
