//! Helpers shared by the node's integration tests: the talaria-node process, a gRPC client
//! on its socket, mounting what a snapshotter returns, and a comparable file-tree summary.
#![allow(dead_code)]

pub mod agent;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use talaria_node::proto::containerd::services::snapshots::v1 as pb;
use tokio::net::UnixStream;
use tonic::transport::{Endpoint, Uri};

const START_TIMEOUT: Duration = Duration::from_secs(30);

pub type Client = pb::snapshots_client::SnapshotsClient<tonic::transport::Channel>;

/// The talaria-node binary running on `root`, serving `socket`.
pub struct Node {
    child: Option<Child>,
    pub root: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    args: Vec<String>,
}

impl Node {
    /// A node that also uses artifacts among registry referrers (`--unverified-referrers`):
    /// the tests using it publish their artifacts that way, with no cluster.
    pub fn start(root: &Path, socket: &Path, log: &Path, args: &[String]) -> Node {
        let mut a = vec!["--unverified-referrers".to_string()];
        a.extend_from_slice(args);
        Node::start_with_defaults(root, socket, log, &a)
    }

    /// A node with the binary's defaults plus `args` (no referrer discovery).
    pub fn start_with_defaults(root: &Path, socket: &Path, log: &Path, args: &[String]) -> Node {
        let log_file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("open node log");
        let child = Command::new(env!("CARGO_BIN_EXE_talaria-node"))
            .arg("--root")
            .arg(root)
            .arg("--socket")
            .arg(socket)
            .arg("--log")
            .arg("talaria_node=debug,info")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("spawn talaria-node");
        let mut node = Node {
            child: Some(child),
            root: root.to_path_buf(),
            socket: socket.to_path_buf(),
            log: log.to_path_buf(),
            args: args.to_vec(),
        };
        let started = Instant::now();
        while !socket.exists() {
            if let Some(status) = node.child_mut().try_wait().expect("try_wait") {
                panic!("talaria-node exited with {status}:\n{}", node.log_text());
            }
            assert!(
                started.elapsed() < START_TIMEOUT,
                "talaria-node did not create {} within {START_TIMEOUT:?}:\n{}",
                socket.display(),
                node.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        node
    }

    fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("node is running")
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The node process's peak resident memory so far (`VmHWM`), in bytes.
    pub fn peak_rss(&mut self) -> u64 {
        let pid = self.child_mut().id();
        talaria_testenv::hostile::peak_rss(pid).expect("VmHWM")
    }

    pub fn signal(&mut self, sig: &str) -> ExitStatus {
        let pid = self.child_mut().id().to_string();
        let st = Command::new("kill")
            .args(["-s", sig, &pid])
            .status()
            .expect("kill");
        assert!(st.success(), "kill -s {sig} {pid}");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child_mut().try_wait().expect("try_wait") {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "talaria-node ignored {sig}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Restarts on the same root, socket and arguments.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop the node first");
        let again = Node::start_with_defaults(&self.root, &self.socket, &self.log, &self.args);
        *self = again;
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            // Killed, the node leaves its FUSE layers mounted (dead); without this every run
            // would leave them on the machine. Only here: a node stopped by `signal` may be
            // restarted on the same root, whose new mounts must stay.
            talaria_testenv::unmount_under(&self.root);
        }
        keep_node_log(&self.root, &self.log);
        if std::thread::panicking() {
            let text = self.log_text();
            let tail: Vec<&str> = text.lines().rev().take(80).collect();
            eprintln!("--- talaria-node log (last lines) ---");
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// Copies a node's log to `$TALARIA_KEEP_NODE_LOGS`, when set: for looking at a passing run's
/// log too (the test's temporary root is gone after it).
pub fn keep_node_log(root: &Path, log: &Path) {
    if let Some(dir) = std::env::var_os("TALARIA_KEEP_NODE_LOGS") {
        let name = root.to_string_lossy().replace('/', "_");
        let to = Path::new(&dir).join(format!("node{name}.log"));
        if let Err(e) = fs::copy(log, &to) {
            eprintln!("keeping the node log as {}: {e}", to.display());
        }
    }
}

/// A gRPC client on the node's socket (the connection itself is retried, bounded).
pub async fn connect(socket: PathBuf) -> Client {
    let mut last = None;
    for _ in 0..300 {
        let s = socket.clone();
        let attempt = Endpoint::try_from("http://localhost")
            .expect("endpoint")
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let s = s.clone();
                async move { UnixStream::connect(s).await.map(TokioIo::new) }
            }))
            .await;
        match attempt {
            Ok(channel) => return pb::snapshots_client::SnapshotsClient::new(channel),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("connect over the unix socket: {last:?}");
}

/// Mounts what a snapshotter returned for a snapshot at `target`, as containerd would.
pub fn mount_at(kind: &str, source: &str, options: &[String], target: &Path) {
    use nix::mount::{MsFlags, mount};
    fs::create_dir_all(target).expect("mount target");
    let ro = options.iter().any(|o| o == "ro");
    if kind == "bind" {
        mount(
            Some(source),
            target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .expect("bind mount");
        if ro {
            mount(
                None::<&str>,
                target,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                None::<&str>,
            )
            .expect("read-only remount");
        }
    } else {
        let data: Vec<&str> = options
            .iter()
            .map(String::as_str)
            .filter(|o| *o != "ro")
            .collect();
        let flags = if ro {
            MsFlags::MS_RDONLY
        } else {
            MsFlags::empty()
        };
        mount(
            Some(source),
            target,
            Some(kind),
            flags,
            Some(data.join(",").as_str()),
        )
        .unwrap_or_else(|e| panic!("mount {kind} {source} {data:?}: {e}"));
    }
}

/// Everything about a tree that an image defines: type, mode, owner, content hash, link
/// target, device numbers, xattrs and which paths are hard links of each other.
pub fn tree(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut first_path_of_inode: BTreeMap<(u64, u64), String> = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let md = fs::symlink_metadata(&p).expect("lstat");
        let rel = p
            .strip_prefix(root)
            .expect("under root")
            .to_string_lossy()
            .into_owned();
        let rel = if rel.is_empty() { "/".to_string() } else { rel };
        let ft = md.file_type();
        let what = if ft.is_dir() {
            for e in fs::read_dir(&p).expect("read_dir") {
                stack.push(e.expect("dir entry").path());
            }
            "dir".to_string()
        } else if ft.is_symlink() {
            format!(
                "symlink -> {}",
                fs::read_link(&p).expect("readlink").display()
            )
        } else if ft.is_file() {
            let data = fs::read(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
            let link = match first_path_of_inode.get(&(md.dev(), md.ino())) {
                Some(first) if md.nlink() > 1 => format!(" hardlink-of {first}"),
                _ => {
                    first_path_of_inode.insert((md.dev(), md.ino()), rel.clone());
                    String::new()
                }
            };
            format!(
                "file {} {}{link}",
                data.len(),
                hex::encode(Sha256::digest(&data))
            )
        } else if ft.is_char_device() {
            format!("char {}", md.rdev())
        } else if ft.is_block_device() {
            format!("block {}", md.rdev())
        } else if ft.is_fifo() {
            "fifo".to_string()
        } else {
            format!("other {:o}", md.mode())
        };
        let mut xattrs: Vec<String> = xattr::list(&p)
            .map(|names| {
                names
                    .map(|n| {
                        let v = xattr::get(&p, &n).ok().flatten().unwrap_or_default();
                        format!("{}={}", n.to_string_lossy(), String::from_utf8_lossy(&v))
                    })
                    .collect()
            })
            .unwrap_or_default();
        xattrs.sort();
        // The root dir's own mode differs by snapshotter design (bind vs overlay); contents
        // are what must match.
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
    out
}

/// Differences between two trees, for an assertion message.
pub fn tree_diff(
    ours: &BTreeMap<String, String>,
    theirs: &BTreeMap<String, String>,
) -> Vec<String> {
    ours.iter()
        .filter(|(k, v)| theirs.get(*k) != Some(*v))
        .map(|(k, v)| format!("{k}: talaria {v} / overlayfs {:?}", theirs.get(k)))
        .chain(
            theirs
                .keys()
                .filter(|k| !ours.contains_key(*k))
                .map(|k| format!("{k}: only in overlayfs")),
        )
        .collect()
}

/// A plain HTTP/1.0 GET of `path` on `addr` (the node's metrics endpoint); the whole response.
pub fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("response");
    out
}

/// The value of the metric line starting with `prefix` (0 when absent).
pub fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// containerd's chain ids of an image's layers.
pub fn chain_ids(image: &talaria_testenv::images::Image) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for l in &image.layers {
        let next = match out.last() {
            None => l.diff_id.clone(),
            Some(prev) => format!(
                "sha256:{}",
                hex::encode(Sha256::digest(format!("{prev} {}", l.diff_id)))
            ),
        };
        out.push(next);
    }
    out
}

/// A reader of the uncompressed layer `tar`, written to `dir/layer.tar` (returned: a test
/// may damage it) and indexed with 64 KiB spans, spans cached in memory.
pub fn tar_layer_reader(
    dir: &Path,
    tar: &[u8],
) -> (
    std::sync::Arc<talaria_artifact::index::reader::LayerReader>,
    PathBuf,
) {
    use std::sync::Arc;
    let blob = dir.join("layer.tar");
    fs::write(&blob, tar).expect("write blob");
    let index = talaria_artifact::index::indexer::index_layer(
        tar,
        talaria_artifact::index::Compression::None,
        &talaria_artifact::index::indexer::IndexOptions {
            span_size: 64 * 1024,
        },
    )
    .expect("index")
    .index;
    let reader = Arc::new(talaria_artifact::index::reader::LayerReader::new(
        Arc::new(index),
        Arc::new(talaria_artifact::source::FileSource::open(&blob).expect("open blob")),
        Arc::new(talaria_artifact::index::reader::MemorySpanCache::new(
            1 << 20,
        )),
    ));
    (reader, blob)
}

/// The FUSE file system of `reader`'s layer, reads answered on `rt` (5 s read timeout).
pub fn layer_fs(
    reader: std::sync::Arc<talaria_artifact::index::reader::LayerReader>,
    rt: &tokio::runtime::Runtime,
    metrics: std::sync::Arc<talaria_node::metrics::Metrics>,
) -> talaria_node::layerfs::LayerFs {
    talaria_node::layerfs::LayerFs::new(
        reader,
        std::sync::Arc::new(talaria_node::content::reach::Reachability::new(
            "test blob",
            Duration::from_secs(1),
        )),
        rt.handle().clone(),
        Duration::from_secs(5),
        metrics,
    )
    .expect("layer fs")
}

/// A multi-thread tokio runtime of `threads` workers, for FUSE reads answered off the
/// kernel's request threads.
pub fn runtime(threads: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Builds and pushes the artifact of `registry/repo:tag` with `profile`, as `talaria build`;
/// every layer must be indexed.
pub async fn build_artifact(
    registry: &str,
    repo: &str,
    tag: &str,
    profile: talaria_artifact::format::Profile,
) {
    use talaria_artifact::oci::registry::{RegistryClient, RegistryConfig, Repository};
    use talaria_artifact::oci::store::{RegistryStore, Store};
    let client = RegistryClient::new(RegistryConfig {
        insecure_hosts: vec![registry.to_string()],
        ..RegistryConfig::default()
    })
    .expect("registry client");
    let store: std::sync::Arc<dyn Store> = std::sync::Arc::new(RegistryStore::new(
        client,
        Repository {
            registry: registry.to_string(),
            name: repo.to_string(),
        },
    ));
    let opts = talaria_artifact::build::BuildOptions {
        profile,
        ..Default::default()
    };
    let summary = talaria_artifact::build::build(store, tag, None, &opts)
        .await
        .unwrap_or_else(|e| panic!("build the {} artifact of {repo}:{tag}: {e}", profile.name()));
    assert!(
        summary.layers.iter().all(|l| l.index.is_some()),
        "every layer indexed: {:?}",
        summary.layers
    );
}
