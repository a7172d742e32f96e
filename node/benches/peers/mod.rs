//! The startup bench's peers (issue 25): the SOCI snapshotter and the stargz snapshotter as
//! containerd proxy snapshotters, each on a fresh root per run, and the tools that make their
//! artifacts (a SOCI-enabled image by `soci convert`, eStargz images by
//! `talaria-estargz-convert`). Built by `hack/tools.sh soci stargz`; configured as
//! docs/benchmarks.md says (their documented defaults plus what their docs recommend for speed).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use talaria_testenv::cri::CriSnapshotter;
use talaria_testenv::images::{Image, has_blob, push_blob, push_manifest};

use crate::common::{stop_and_unmount, wait_serving};

const MEDIA_TYPE_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Manifests of a layout are small; a bigger one is not what `soci convert` wrote.
const MAX_MANIFEST: u64 = 4 << 20;
/// Index → manifest is what `soci convert` writes; deeper nesting (or a loop) is refused.
const MAX_DEPTH: usize = 3;

/// Which peer snapshotter a run uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    /// SOCI lazy loading (index manifest v2), its default background fetch.
    Soci,
    /// SOCI's parallel pull and unpack mode: the unchanged image, no index, no lazy loading.
    SociParallel,
    /// The stargz snapshotter with FUSE passthrough (eStargz images).
    Stargz,
}

impl Peer {
    /// The name containerd knows the proxy snapshotter by.
    pub fn snapshotter_name(self) -> &'static str {
        match self {
            Peer::Soci | Peer::SociParallel => "soci",
            Peer::Stargz => "stargz",
        }
    }
}

/// A peer snapshotter process on a fresh root under `dir`, serving `socket`. Stopped with
/// SIGTERM; what it left mounted under its root (SOCI keeps its FUSE mounts on purpose, to
/// survive restarts) is detached.
pub struct PeerProc {
    child: Child,
    peer: Peer,
    root: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl PeerProc {
    /// Starts `peer` for images on the plain-HTTP registry `registry` ("IP:PORT").
    /// `containerd_socket` is where containerd's socket will be (SOCI's parallel mode writes
    /// into containerd's content store; containerd itself starts after its snapshotter).
    pub fn start(
        peer: Peer,
        dir: &Path,
        registry: &str,
        containerd_socket: &Path,
    ) -> Result<PeerProc> {
        let root = dir.join(format!("{}-root", peer.snapshotter_name()));
        let socket = dir.join(format!("{}.sock", peer.snapshotter_name()));
        let log = dir.join(format!("{}.log", peer.snapshotter_name()));
        let config = dir.join(format!("{}.toml", peer.snapshotter_name()));
        std::fs::create_dir_all(&root).with_context(|| format!("create {}", root.display()))?;
        let mut cmd = match peer {
            Peer::Soci | Peer::SociParallel => {
                std::fs::write(&config, soci_config(peer, registry, containerd_socket))
                    .context("write the SOCI config")?;
                let mut c = Command::new(tool("soci-snapshotter-grpc")?);
                c.arg("--root")
                    .arg(&root)
                    .arg("--address")
                    .arg(&socket)
                    .arg("--config")
                    .arg(&config);
                c
            }
            Peer::Stargz => {
                // Upstream's defaults (an empty config file), plus passthrough for speed.
                std::fs::write(&config, "").context("write the stargz config")?;
                let mut c = Command::new(tool("talaria-stargz-grpc")?);
                c.arg("-root")
                    .arg(&root)
                    .arg("-address")
                    .arg(&socket)
                    .arg("-config")
                    .arg(&config)
                    .args(["-insecure-registry", registry, "-passthrough"]);
                c
            }
        };
        let log_file = std::fs::File::create(&log).context("peer log")?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().context("peer log")?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("spawn the {} snapshotter", peer.snapshotter_name()))?;
        let mut p = PeerProc {
            child,
            peer,
            root,
            socket,
            log,
        };
        let what = format!("the {} snapshotter", peer.snapshotter_name());
        wait_serving(&mut p.child, &p.socket, &what, &p.log)?;
        Ok(p)
    }

    pub fn snapshotter(&self) -> CriSnapshotter {
        CriSnapshotter::Proxy {
            name: self.peer.snapshotter_name().into(),
            socket: self.socket.clone(),
        }
    }

    /// containerd's config for this proxy snapshotter beyond its address: the root it
    /// exports, as both peers' docs configure it.
    pub fn containerd_config(&self) -> String {
        format!(
            "[proxy_plugins.\"{}\".exports]\n  root = \"{}\"\n",
            self.peer.snapshotter_name(),
            self.root.display()
        )
    }
}

impl Drop for PeerProc {
    fn drop(&mut self) {
        stop_and_unmount(&mut self.child, &self.root);
    }
}

/// A scratch dir for a conversion: next to the registries' storage when that is on disk
/// (`TALARIA_REGISTRY_DIR`: a GiB-scale layer's temporary copies would not fit the runs'
/// tmpfs), else in the temp dir.
fn scratch(prefix: &str) -> Result<tempfile::TempDir> {
    let base = std::env::var_os("TALARIA_REGISTRY_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(&base)
        .with_context(|| format!("a scratch dir in {}", base.display()))
}

fn tool(name: &str) -> Result<PathBuf> {
    talaria_testenv::tool(name)
        .with_context(|| format!("{name}: build the peers first (hack/tools.sh soci stargz)"))
}

/// soci-snapshotter-grpc's config: its defaults (lazy loading, SOCI index v2 discovery,
/// background fetch) and the plain-HTTP registry as a mirror (its host must be a URL); for
/// the parallel mode, the settings of its docs/parallel-mode.md example.
fn soci_config(peer: Peer, registry: &str, containerd_socket: &Path) -> String {
    // containerd's address: SOCI asks containerd for the image manifest when a layer has no
    // zTOC (below its 10 MiB minimum); at the default address, absent here, that waits for a
    // dial timeout on every such layer. The parallel mode also writes into containerd's store.
    let store_type = match peer {
        Peer::SociParallel => "containerd",
        _ => "soci",
    };
    let mut s = format!(
        "[[resolver.host.\"{registry}\".mirrors]]\n  host = \"http://{registry}\"\n  insecure = true\n\n\
         [content_store]\n  type = \"{store_type}\"\n  containerd_address = \"{}\"\n",
        containerd_socket.display()
    );
    if peer == Peer::SociParallel {
        s.push_str(
            "\n[pull_modes.parallel_pull_unpack]\n  enable = true\n  max_concurrent_downloads = 50\n  \
             max_concurrent_downloads_per_image = 10\n  concurrent_download_chunk_size = \"8mb\"\n  \
             max_concurrent_unpacks = 20\n  max_concurrent_unpacks_per_image = 10\n  \
             discard_unpacked_layers = true\n\n\
             [pull_modes.parallel_pull_unpack.decompress_streams.\"gzip\"]\n  \
             path = \"/usr/bin/unpigz\"\n  args = [\"-d\", \"-c\"]\n",
        );
    }
    s
}

/// Makes the SOCI-enabled image of `image` (`soci convert --standalone`, index manifest v2,
/// its default span and minimum layer sizes) and pushes it as `repo:tag` on `host`. Returns
/// the time `soci convert` took (writing its input layout and pushing are not counted).
pub fn soci_convert(image: &Image, host: &str, repo: &str, tag: &str) -> Result<Duration> {
    let dir = scratch("tlr-bench-soci-")?;
    let (input, output) = (dir.path().join("in"), dir.path().join("out"));
    image.write_layout(&input, "latest")?;
    let took = run_timed(
        Command::new(tool("soci")?)
            .args(["convert", "--standalone", "--format", "oci-dir"])
            .arg(&input)
            .arg(&output)
            .env("TMPDIR", dir.path()),
        "soci convert",
    )?;
    push_layout(&output, host, repo, tag)?;
    Ok(took)
}

/// Converts `src` (a registry reference) to eStargz as `dst` with `talaria-estargz-convert`
/// (gzip level 9, estargz's default chunk size); with `prioritized`, those paths go first in
/// each layer and are prefetched at mount. Returns the conversion's time (pull and push on
/// loopback included, as `ctr-remote` does them).
pub fn estargz_convert(src: &str, dst: &str, prioritized: Option<&[String]>) -> Result<Duration> {
    let dir = scratch("tlr-bench-estargz-")?;
    let mut cmd = Command::new(tool("talaria-estargz-convert")?);
    cmd.arg("-insecure").arg("-tmp").arg(dir.path());
    if let Some(paths) = prioritized {
        let list = dir.path().join("prioritized");
        let mut text = String::new();
        for p in paths {
            text.push('/');
            text.push_str(p.trim_start_matches('/'));
            text.push('\n');
        }
        std::fs::write(&list, text).context("write the prioritized files")?;
        cmd.arg("-prioritized-files").arg(&list);
    }
    run_timed(
        cmd.arg(src).arg(dst),
        &format!("talaria-estargz-convert {src} {dst}"),
    )
}

/// Runs a conversion tool to its end; returns how long it took, or its output on failure.
fn run_timed(cmd: &mut Command, what: &str) -> Result<Duration> {
    let t = Instant::now();
    let out = cmd.output().with_context(|| format!("run {what}"))?;
    let took = t.elapsed();
    ensure!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(took)
}

/// Pushes the first image of the OCI layout `dir` (an index or a manifest, with everything
/// it references that the layout holds) as `repo:tag` on the plain-HTTP registry `host`.
pub fn push_layout(dir: &Path, host: &str, repo: &str, tag: &str) -> Result<()> {
    let index: serde_json::Value = serde_json::from_slice(&read_capped(&dir.join("index.json"))?)
        .context("the layout's index.json is not JSON")?;
    let top = index
        .pointer("/manifests/0")
        .context("the layout's index.json lists no manifest")?;
    let (media_type, digest) = descriptor(top)?;
    let bytes = push_tree(dir, host, repo, media_type, digest, 0)?;
    Ok(push_manifest(host, repo, tag, media_type, &bytes)?)
}

fn descriptor(d: &serde_json::Value) -> Result<(&str, &str)> {
    let media_type = d
        .get("mediaType")
        .and_then(|v| v.as_str())
        .context("a descriptor has no mediaType")?;
    let digest = d
        .get("digest")
        .and_then(|v| v.as_str())
        .context("a descriptor has no digest")?;
    ensure!(
        digest.starts_with("sha256:") && digest.len() == 71,
        "bad digest {digest:?}"
    );
    Ok((media_type, digest))
}

/// Reads a manifest or index.json of the layout, at most [`MAX_MANIFEST`] bytes.
fn read_capped(path: &Path) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_MANIFEST + 1).read_to_end(&mut bytes))
        .with_context(|| format!("read {}", path.display()))?;
    ensure!(
        bytes.len() as u64 <= MAX_MANIFEST,
        "{} is over {MAX_MANIFEST} bytes",
        path.display()
    );
    Ok(bytes)
}

fn blob_path(dir: &Path, digest: &str) -> PathBuf {
    dir.join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

/// Pushes what the manifest `digest` references, then the manifest by digest; returns it.
fn push_tree(
    dir: &Path,
    host: &str,
    repo: &str,
    media_type: &str,
    digest: &str,
    depth: usize,
) -> Result<Vec<u8>> {
    ensure!(
        depth < MAX_DEPTH,
        "manifests nested deeper than {MAX_DEPTH} at {digest}"
    );
    let bytes = read_capped(&blob_path(dir, digest))?;
    let doc: serde_json::Value =
        serde_json::from_slice(&bytes).with_context(|| format!("manifest {digest} is not JSON"))?;
    if media_type == MEDIA_TYPE_INDEX {
        for m in doc
            .get("manifests")
            .and_then(|v| v.as_array())
            .context("an index without manifests")?
        {
            let (t, d) = descriptor(m)?;
            push_tree(dir, host, repo, t, d, depth + 1)?;
        }
    } else {
        let blobs = doc.get("config").into_iter().chain(
            doc.get("layers")
                .and_then(|v| v.as_array())
                .into_iter()
                .flatten(),
        );
        for b in blobs {
            let (_, d) = descriptor(b)?;
            // Asked first so a GiB layer the registry already has is not read.
            if has_blob(host, repo, d)? {
                continue;
            }
            let p = blob_path(dir, d);
            let data = std::fs::read(&p).with_context(|| format!("read {}", p.display()))?;
            push_blob(host, repo, &data)?;
        }
    }
    push_manifest(host, repo, digest, media_type, &bytes)?;
    Ok(bytes)
}
