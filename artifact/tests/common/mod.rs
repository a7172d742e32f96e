//! Test helpers: a multi-layer test image, an independent unpacker of the merged view (the
//! reference the artifact read-through is compared with), and a fault-injecting HTTP proxy
//! in front of the real registry.
#![allow(dead_code)]

pub mod proxy;

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::Arc;

use talaria_artifact::index::reader::MemorySpanCache;
use talaria_artifact::index::{EntryKind, LayerIndex};
use talaria_artifact::oci::registry::{RegistryClient, RegistryConfig, RetryPolicy};
use talaria_artifact::oci::store::Store;
use talaria_artifact::oci::{Descriptor, ImageManifest, Manifest};
use talaria_artifact::view::MergedView;
use talaria_testenv::images::{Image, ImageBuilder, LayerBuilder};

/// Deterministic pseudo-random bytes (incompressible enough to make several gzip spans).
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..len).map(|_| rng.u8(..)).collect()
}

/// Text-like bytes (compressible, so spans hold much more uncompressed data).
pub fn text(seed: u64, len: usize) -> Vec<u8> {
    let words = ["alpha ", "beta ", "gamma ", "delta\n", "talaria ", "spans "];
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        v.extend_from_slice(words[rng.usize(..words.len())].as_bytes());
    }
    v.truncate(len);
    v
}

/// Three layers exercising overwrites, whiteouts, an opaque directory, a directory
/// replaced by a whiteout, symlinks and hard links (in the same layer and a later one).
pub fn layer_builders(seed: u64) -> Vec<LayerBuilder> {
    let l0 = LayerBuilder::new()
        .dir("bin", 0o755)
        .dir("etc", 0o755)
        .dir("usr", 0o755)
        .dir("usr/lib", 0o755)
        .dir("usr/lib/x", 0o755)
        .dir("d", 0o755)
        .file("bin/tool", noise(seed, 700_000), 0o755)
        .hardlink("bin/tool-link", "bin/tool")
        .file("etc/a", text(seed + 1, 10_000), 0o644)
        .file("etc/b", b"to be whited out".to_vec(), 0o644)
        .file("usr/lib/x/y.so", noise(seed + 2, 300_000), 0o644)
        .file("d/1", b"one".to_vec(), 0o644)
        .file("d/2", b"two".to_vec(), 0o644)
        .file("empty", Vec::new(), 0o644)
        .symlink("bin/sh", "tool");
    let l1 = LayerBuilder::new()
        .dir("etc", 0o755)
        .dir("d", 0o755)
        .file("etc/a", text(seed + 3, 2_000_000), 0o600)
        .whiteout("etc/b")
        .opaque_dir("d")
        .file("d/3", b"three".to_vec(), 0o644)
        .file("big", text(seed + 4, 3_000_000), 0o644);
    let l2 = LayerBuilder::new()
        .dir("etc", 0o755)
        .dir("usr/lib", 0o755)
        .whiteout("usr/lib/x")
        .file("etc/c", noise(seed + 5, 200_000), 0o644)
        .hardlink("etc/c2", "etc/c")
        .file("bin/tool", noise(seed + 6, 50_000), 0o755);
    vec![l0, l1, l2]
}

/// The test image and its layers' uncompressed tars.
pub fn test_image(seed: u64) -> (Image, Vec<Vec<u8>>) {
    let builders = layer_builders(seed);
    let tars: Vec<Vec<u8>> = builders.iter().map(|b| b.tar().unwrap()).collect();
    let mut ib = ImageBuilder::new().cmd(&["/bin/sh"]);
    for b in &builders {
        ib = ib.layer(b.build().unwrap());
    }
    (ib.build().unwrap(), tars)
}

/// A node of the reference merged view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Dir,
    File(Vec<u8>),
    Symlink(String),
    Other,
}

fn norm(p: &str) -> String {
    p.trim_start_matches("./")
        .trim_start_matches('/')
        .trim_end_matches('/')
        .to_string()
}

/// Unpacks layer tars into the merged view the way a container runtime does (OCI
/// whiteouts, opaque directories, later layers win), with the `tar` crate: an
/// implementation independent of the index code.
pub fn unpack_merged(tars: &[Vec<u8>]) -> BTreeMap<String, Node> {
    let mut fs: BTreeMap<String, Node> = BTreeMap::new();
    for t in tars {
        let mut ar = tar::Archive::new(t.as_slice());
        let mut layer_files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let mut adds: Vec<(String, Node)> = Vec::new();
        let mut hides: Vec<(String, bool)> = Vec::new(); // (path, opaque)
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let path = norm(&e.path().unwrap().to_string_lossy());
            let (dir, name) = match path.rsplit_once('/') {
                Some((d, n)) => (d.to_string(), n.to_string()),
                None => (String::new(), path.clone()),
            };
            if name == ".wh..wh..opq" {
                hides.push((dir, true));
                continue;
            }
            if let Some(hidden) = name.strip_prefix(".wh.") {
                let p = if dir.is_empty() {
                    hidden.to_string()
                } else {
                    format!("{dir}/{hidden}")
                };
                hides.push((p, false));
                continue;
            }
            let node = match e.header().entry_type() {
                tar::EntryType::Directory => Node::Dir,
                tar::EntryType::Regular => {
                    let mut v = Vec::new();
                    e.read_to_end(&mut v).unwrap();
                    layer_files.insert(path.clone(), v.clone());
                    Node::File(v)
                }
                tar::EntryType::Symlink => Node::Symlink(
                    e.link_name()
                        .unwrap()
                        .unwrap()
                        .to_string_lossy()
                        .into_owned(),
                ),
                tar::EntryType::Link => {
                    let target = norm(&e.link_name().unwrap().unwrap().to_string_lossy());
                    Node::File(layer_files[&target].clone())
                }
                _ => Node::Other,
            };
            adds.push((path, node));
        }
        for (p, opaque) in hides {
            let prefix = format!("{p}/");
            if !opaque {
                fs.remove(&p);
            }
            fs.retain(|k, _| !k.starts_with(&prefix));
        }
        for (p, node) in adds {
            if node != Node::Dir && fs.get(&p) == Some(&Node::Dir) {
                let prefix = format!("{p}/");
                fs.retain(|k, _| !k.starts_with(&prefix));
            }
            fs.insert(p, node);
        }
    }
    fs
}

/// A registry client for tests: loopback is plain HTTP; short backoffs keep tests quick.
pub fn client() -> RegistryClient {
    client_with(RetryPolicy {
        max_attempts: 6,
        initial_backoff: std::time::Duration::from_millis(50),
        max_backoff: std::time::Duration::from_secs(2),
        max_elapsed: std::time::Duration::from_secs(30),
    })
}

pub fn client_with(retry: RetryPolicy) -> RegistryClient {
    RegistryClient::new(RegistryConfig {
        retry,
        ..RegistryConfig::default()
    })
    .unwrap()
}

/// Reads every regular file of `expected` through the artifact's indexes and the layer
/// reader (ranged reads from `image_store`) and checks the bytes, the path set, and
/// returns the number of files compared.
pub async fn check_read_through(
    image_store: &dyn Store,
    artifact_store: &dyn Store,
    image: &ImageManifest,
    artifact_digest: &str,
    expected: &BTreeMap<String, Node>,
) -> usize {
    let raw = artifact_store.get_manifest(artifact_digest).await.unwrap();
    let info = talaria_artifact::format::parse_artifact(&raw).unwrap();
    let mut indexes: Vec<Option<Arc<LayerIndex>>> = Vec::new();
    for l in &image.layers {
        match info.index_for(&l.digest) {
            Some(d) => indexes.push(Some(Arc::new(
                talaria_artifact::discover::load_index(artifact_store, d)
                    .await
                    .unwrap(),
            ))),
            None => indexes.push(None),
        }
    }
    let refs: Vec<Option<&LayerIndex>> = indexes.iter().map(|i| i.as_deref()).collect();
    let view = MergedView::new(&refs);
    let got: Vec<&str> = view.list().map(|(p, _, _)| p).collect();
    let want: Vec<&str> = expected.keys().map(String::as_str).collect();
    assert_eq!(got, want, "merged view paths differ from a full unpack");
    let cache: Arc<MemorySpanCache> = Arc::new(MemorySpanCache::new(8 << 20));
    let mut files = 0;
    for (path, node) in expected {
        let (layer, entry) = view.lookup(path).unwrap();
        match node {
            Node::File(bytes) => {
                assert_eq!(entry.kind, EntryKind::File, "{path}");
                let desc: &Descriptor = &image.layers[layer];
                let src = image_store.range_source(desc).unwrap();
                let idx = indexes[layer].clone().unwrap();
                let reader = talaria_artifact::discover::layer_reader(
                    idx,
                    src,
                    artifact_store,
                    cache.clone(),
                )
                .unwrap();
                let data = reader.read_file(entry, 0, entry.size).await.unwrap();
                assert_eq!(data.len(), bytes.len(), "{path}: size");
                assert!(data.as_ref() == bytes.as_slice(), "{path}: content differs");
                files += 1;
            }
            Node::Dir => assert_eq!(entry.kind, EntryKind::Dir, "{path}"),
            Node::Symlink(t) => {
                assert_eq!(entry.kind, EntryKind::Symlink, "{path}");
                assert_eq!(entry.link_target.as_deref(), Some(t.as_str()), "{path}");
            }
            Node::Other => {}
        }
    }
    files
}

/// Parses an image manifest from a store.
pub async fn image_manifest(store: &dyn Store, reference: &str) -> ImageManifest {
    match store
        .get_manifest(reference)
        .await
        .unwrap()
        .parse()
        .unwrap()
    {
        Manifest::Image(m) => m,
        Manifest::Index(_) => panic!("{reference} is an index"),
    }
}
