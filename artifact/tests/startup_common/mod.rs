//! Helpers of the startup-path tests: images built with talaria-testenv (or from this
//! machine's files), indexed with the real indexer, read through real layer readers.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use talaria_artifact::index::indexer::{IndexOptions, index_layer};
use talaria_artifact::index::reader::{LayerReader, MemorySpanCache};
use talaria_artifact::index::{Compression, LayerIndex};
use talaria_artifact::source::MemorySource;
use talaria_artifact::startup::{self, Analysis, ImageConfig, LayerFiles};
use talaria_artifact::view::MergedView;
use talaria_testenv::images::LayerBuilder;

/// An image ready for analysis.
pub struct TestImage {
    pub indexes: Vec<Arc<LayerIndex>>,
    pub view: MergedView,
    pub files: LayerFiles,
}

impl TestImage {
    pub fn new(layers: Vec<LayerBuilder>, span_size: u64) -> TestImage {
        let mut indexes = Vec::new();
        let mut readers = Vec::new();
        for lb in layers {
            let layer = lb.build().expect("layer builds");
            let out = index_layer(
                layer.blob.as_slice(),
                Compression::Gzip,
                &IndexOptions { span_size },
            )
            .expect("layer indexes");
            let ix = Arc::new(out.index);
            readers.push(Some(Arc::new(LayerReader::new(
                ix.clone(),
                Arc::new(MemorySource(Bytes::from(layer.blob))),
                Arc::new(MemorySpanCache::new(256 << 20)),
            ))));
            indexes.push(ix);
        }
        let refs: Vec<Option<&LayerIndex>> = indexes.iter().map(|i| Some(i.as_ref())).collect();
        let view = MergedView::new(&refs);
        TestImage {
            indexes,
            view,
            files: LayerFiles { layers: readers },
        }
    }

    pub async fn analyze(&self, config: &ImageConfig) -> Analysis {
        startup::analyze(config, &self.view, &self.files).await
    }

    pub fn layer_refs(&self) -> Vec<Option<&LayerIndex>> {
        self.indexes.iter().map(|i| Some(i.as_ref())).collect()
    }
}

pub fn config(entrypoint: &[&str], cmd: &[&str], env: &[&str], wd: &str) -> ImageConfig {
    let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect();
    ImageConfig {
        entrypoint: v(entrypoint),
        cmd: v(cmd),
        env: v(env),
        working_dir: wd.to_string(),
        user: String::new(),
    }
}

/// Copies files of this machine into a layer, with every directory and symlink on the way
/// (so `/bin -> usr/bin` style links are reproduced and followed).
#[derive(Default)]
pub struct HostTree {
    items: BTreeMap<String, HostItem>,
}

enum HostItem {
    Dir,
    File(PathBuf),
    Link(String),
    Data(Vec<u8>, u32),
}

impl HostTree {
    pub fn add(&mut self, path: &str) -> &mut Self {
        self.add_path(&lexical(Path::new(path)), 0);
        self
    }

    fn add_path(&mut self, p: &Path, depth: usize) {
        if depth > 40 {
            return;
        }
        let mut cur = PathBuf::from("/");
        let comps: Vec<_> = p.components().skip(1).collect();
        for (i, c) in comps.iter().enumerate() {
            cur.push(c);
            let rel = cur.to_string_lossy().trim_start_matches('/').to_string();
            let Ok(meta) = std::fs::symlink_metadata(&cur) else {
                return;
            };
            if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&cur).expect("readlink");
                self.items
                    .insert(rel, HostItem::Link(target.to_string_lossy().to_string()));
                let resolved = cur.parent().unwrap_or(Path::new("/")).join(&target);
                let mut rest = resolved.clone();
                for c in &comps[i + 1..] {
                    rest.push(c);
                }
                self.add_path(&lexical(&rest), depth + 1);
                return;
            } else if meta.is_dir() {
                self.items.insert(rel, HostItem::Dir);
            } else {
                self.items.insert(rel, HostItem::File(cur.clone()));
            }
        }
    }

    /// An inline file (parents must be added with [`HostTree::dir`] or exist already).
    pub fn data(&mut self, path: &str, data: impl Into<Vec<u8>>, mode: u32) -> &mut Self {
        self.items.insert(
            path.trim_start_matches('/').to_string(),
            HostItem::Data(data.into(), mode),
        );
        self
    }

    pub fn dir(&mut self, path: &str) -> &mut Self {
        self.items
            .insert(path.trim_start_matches('/').to_string(), HostItem::Dir);
        self
    }

    /// A host directory tree, skipping subdirectories named in `skip` (bounded: 20,000 items).
    pub fn add_tree(&mut self, root: &str, skip: &[&str]) -> &mut Self {
        self.add(root);
        let mut stack = vec![PathBuf::from(root)];
        let mut n = 0;
        while let Some(d) = stack.pop() {
            let Ok(rd) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in rd.flatten() {
                n += 1;
                if n > 20_000 {
                    return self;
                }
                let p = e.path();
                let name = e.file_name().to_string_lossy().to_string();
                let Ok(ft) = e.file_type() else { continue };
                let rel = p.to_string_lossy().trim_start_matches('/').to_string();
                if ft.is_symlink() {
                    if let Ok(t) = std::fs::read_link(&p) {
                        self.items
                            .insert(rel, HostItem::Link(t.to_string_lossy().to_string()));
                    }
                } else if ft.is_dir() {
                    if !skip.contains(&name.as_str()) {
                        self.items.insert(rel, HostItem::Dir);
                        stack.push(p);
                    }
                } else if ft.is_file() {
                    self.items.insert(rel, HostItem::File(p));
                }
            }
        }
        self
    }

    /// Writes the tree under `root` (the rootfs a real startup runs in).
    pub fn materialize(&self, root: &Path) {
        for (p, item) in &self.items {
            let dst = root.join(p);
            if let Some(parent) = dst.parent() {
                std::fs::create_dir_all(parent).unwrap();
            }
            match item {
                HostItem::Dir => std::fs::create_dir_all(&dst).unwrap(),
                HostItem::File(src) => {
                    std::fs::copy(src, &dst).unwrap();
                    // Keep mtimes: Python trusts a .pyc only if it is not older than its source.
                    if let Ok(m) = std::fs::metadata(src).and_then(|m| m.modified()) {
                        let f = std::fs::File::options().write(true).open(&dst).unwrap();
                        f.set_modified(m).unwrap();
                    }
                }
                HostItem::Link(t) => std::os::unix::fs::symlink(t, &dst).unwrap(),
                HostItem::Data(d, mode) => {
                    std::fs::write(&dst, d).unwrap();
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(*mode)).unwrap();
                }
            }
        }
    }

    pub fn layer(&self) -> LayerBuilder {
        let mut b = LayerBuilder::new();
        for (p, item) in &self.items {
            b = match item {
                HostItem::Dir => b.dir(p, 0o755),
                HostItem::File(src) => b.file_from_host(p, src, 0o755).expect("host file"),
                HostItem::Link(t) => b.symlink(p, t),
                HostItem::Data(d, mode) => b.file(p, d.clone(), *mode),
            };
        }
        b
    }
}

fn lexical(p: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::Normal(n) => out.push(n),
            _ => {}
        }
    }
    out
}

/// Canonical (symlink-free) path of a host file, as the analyzer reports it.
pub fn host_real(p: &str) -> String {
    std::fs::canonicalize(p)
        .expect("host path")
        .to_string_lossy()
        .to_string()
}

pub fn paths(a: &Analysis) -> Vec<&str> {
    a.files.iter().map(|f| f.path.as_str()).collect()
}
