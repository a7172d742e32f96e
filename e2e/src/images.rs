//! Builds small OCI images for tests: describe files, dirs and links per layer, get gzip
//! layers with their digests, write an OCI image layout (or push to a registry).
//!
//! Output is deterministic for the same input (fixed mtimes, owners, gzip header).

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use flate2::Compression;
use flate2::write::GzEncoder;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::{EnvError, http};

pub const MEDIA_TYPE_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_TYPE_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_TYPE_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MEDIA_TYPE_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// mtime written into every tar entry (2023-11-14).
const MTIME: u64 = 1_700_000_000;

/// "sha256:<hex>" of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Deterministic bytes gzip cannot shrink (xorshift64), distinct per seed: the content of
/// test and bench layers whose spans must cost what they weigh.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    let mut x: u64 = (0x9e37_79b9_7f4a_7c15 ^ seed.wrapping_mul(0xbf58_476d_1ce4_e5b9)) | 1;
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

#[derive(Debug, Clone)]
enum Item {
    Dir {
        path: String,
        mode: u32,
    },
    File {
        path: String,
        data: Vec<u8>,
        mode: u32,
    },
    Symlink {
        path: String,
        target: String,
    },
    Hardlink {
        path: String,
        target: String,
    },
}

/// Describes one layer's tar stream. Paths are relative ("bin/sh"); parents are not added
/// implicitly, so order and presence of directories is what you write.
#[derive(Debug, Clone, Default)]
pub struct LayerBuilder {
    items: Vec<Item>,
}

impl LayerBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn dir(mut self, path: &str, mode: u32) -> Self {
        self.items.push(Item::Dir {
            path: path.to_string(),
            mode,
        });
        self
    }

    pub fn file(mut self, path: &str, data: impl Into<Vec<u8>>, mode: u32) -> Self {
        self.items.push(Item::File {
            path: path.to_string(),
            data: data.into(),
            mode,
        });
        self
    }

    /// A regular file with the contents of `src` on this machine.
    pub fn file_from_host(self, path: &str, src: &Path, mode: u32) -> Result<Self, EnvError> {
        let data = std::fs::read(src)
            .map_err(|e| EnvError::io(format!("reading {}", src.display()), e))?;
        Ok(self.file(path, data, mode))
    }

    pub fn symlink(mut self, path: &str, target: &str) -> Self {
        self.items.push(Item::Symlink {
            path: path.to_string(),
            target: target.to_string(),
        });
        self
    }

    /// A hard link to `target`, an earlier path in the same layer.
    pub fn hardlink(mut self, path: &str, target: &str) -> Self {
        self.items.push(Item::Hardlink {
            path: path.to_string(),
            target: target.to_string(),
        });
        self
    }

    /// An OCI whiteout: deletes `path` from lower layers (`dir/.wh.name`).
    pub fn whiteout(self, path: &str) -> Self {
        let (dir, name) = match path.rsplit_once('/') {
            Some((d, n)) => (format!("{d}/"), n),
            None => (String::new(), path),
        };
        self.file(&format!("{dir}.wh.{name}"), Vec::new(), 0o644)
    }

    /// An opaque-directory marker: hides everything lower layers had in `dir`.
    pub fn opaque_dir(self, dir: &str) -> Self {
        self.file(
            &format!("{}/.wh..wh..opq", dir.trim_end_matches('/')),
            Vec::new(),
            0o644,
        )
    }

    /// The uncompressed tar stream.
    pub fn tar(&self) -> Result<Vec<u8>, EnvError> {
        let mut b = tar::Builder::new(Vec::new());
        let err = |p: &str, e: std::io::Error| EnvError::Image(format!("adding {p} to tar: {e}"));
        for item in &self.items {
            let mut h = tar::Header::new_gnu();
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(MTIME);
            let _ = h.set_username("root");
            let _ = h.set_groupname("root");
            match item {
                Item::Dir { path, mode } => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(*mode);
                    h.set_size(0);
                    let p = format!("{}/", path.trim_end_matches('/'));
                    b.append_data(&mut h, &p, std::io::empty())
                        .map_err(|e| err(path, e))?;
                }
                Item::File { path, data, mode } => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(*mode);
                    h.set_size(data.len() as u64);
                    b.append_data(&mut h, path, data.as_slice())
                        .map_err(|e| err(path, e))?;
                }
                Item::Symlink { path, target } => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_mode(0o777);
                    h.set_size(0);
                    b.append_link(&mut h, path, target)
                        .map_err(|e| err(path, e))?;
                }
                Item::Hardlink { path, target } => {
                    h.set_entry_type(tar::EntryType::Link);
                    h.set_mode(0o644);
                    h.set_size(0);
                    b.append_link(&mut h, path, target)
                        .map_err(|e| err(path, e))?;
                }
            }
        }
        b.into_inner()
            .map_err(|e| EnvError::Image(format!("finishing tar: {e}")))
    }

    /// Tar + gzip.
    pub fn build(&self) -> Result<Layer, EnvError> {
        Layer::from_tar(&self.tar()?)
    }
}

/// A gzip-compressed layer blob with its digests.
#[derive(Debug, Clone)]
pub struct Layer {
    /// The compressed blob.
    pub blob: Vec<u8>,
    /// "sha256:..." of `blob`.
    pub digest: String,
    /// "sha256:..." of the uncompressed tar.
    pub diff_id: String,
}

impl Layer {
    /// Gzips an uncompressed tar stream.
    pub fn from_tar(tar: &[u8]) -> Result<Layer, EnvError> {
        let mut gz = GzEncoder::new(Vec::new(), Compression::default());
        gz.write_all(tar)
            .map_err(|e| EnvError::Image(format!("gzip: {e}")))?;
        let blob = gz
            .finish()
            .map_err(|e| EnvError::Image(format!("gzip: {e}")))?;
        Ok(Layer {
            digest: sha256_digest(&blob),
            diff_id: sha256_digest(tar),
            blob,
        })
    }
}

/// Builds an image (config + manifest) from layers.
#[derive(Debug, Clone, Default)]
pub struct ImageBuilder {
    layers: Vec<Layer>,
    cmd: Vec<String>,
    entrypoint: Vec<String>,
    env: Vec<String>,
    working_dir: Option<String>,
}

impl ImageBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn layer(mut self, layer: Layer) -> Self {
        self.layers.push(layer);
        self
    }

    pub fn cmd(mut self, cmd: &[&str]) -> Self {
        self.cmd = cmd.iter().map(|s| s.to_string()).collect();
        self
    }

    pub fn entrypoint(mut self, ep: &[&str]) -> Self {
        self.entrypoint = ep.iter().map(|s| s.to_string()).collect();
        self
    }

    pub fn env(mut self, kv: &str) -> Self {
        self.env.push(kv.to_string());
        self
    }

    pub fn working_dir(mut self, dir: &str) -> Self {
        self.working_dir = Some(dir.to_string());
        self
    }

    pub fn build(self) -> Result<Image, EnvError> {
        let env = if self.env.is_empty() {
            vec!["PATH=/bin:/usr/bin:/sbin:/usr/sbin".to_string()]
        } else {
            self.env
        };
        let mut cfg = json!({
            "Env": env,
        });
        if !self.cmd.is_empty() {
            cfg["Cmd"] = json!(self.cmd);
        }
        if !self.entrypoint.is_empty() {
            cfg["Entrypoint"] = json!(self.entrypoint);
        }
        if let Some(wd) = &self.working_dir {
            cfg["WorkingDir"] = json!(wd);
        }
        let config = json!({
            "created": "2023-11-14T22:13:20Z",
            "architecture": oci_arch(),
            "os": "linux",
            "config": cfg,
            "rootfs": {
                "type": "layers",
                "diff_ids": self.layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>(),
            },
        });
        let config = serde_json::to_vec(&config)
            .map_err(|e| EnvError::Image(format!("encoding config: {e}")))?;
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_MANIFEST,
            "config": {
                "mediaType": MEDIA_TYPE_CONFIG,
                "digest": sha256_digest(&config),
                "size": config.len(),
            },
            "layers": self.layers.iter().map(|l| json!({
                "mediaType": MEDIA_TYPE_LAYER_GZIP,
                "digest": l.digest,
                "size": l.blob.len(),
            })).collect::<Vec<_>>(),
        });
        let manifest = serde_json::to_vec(&manifest)
            .map_err(|e| EnvError::Image(format!("encoding manifest: {e}")))?;
        Ok(Image {
            config_digest: sha256_digest(&config),
            manifest_digest: sha256_digest(&manifest),
            config,
            manifest,
            layers: self.layers,
        })
    }
}

/// The GOARCH-style name of this machine's architecture, as OCI configs use it.
pub fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// A built image: manifest, config and layer blobs.
#[derive(Debug, Clone)]
pub struct Image {
    pub manifest: Vec<u8>,
    pub manifest_digest: String,
    pub config: Vec<u8>,
    pub config_digest: String,
    pub layers: Vec<Layer>,
}

impl Image {
    /// Writes an OCI image layout to `dir` (created if missing) with `tag` as the
    /// `org.opencontainers.image.ref.name` of the manifest in index.json.
    pub fn write_layout(&self, dir: &Path, tag: &str) -> Result<(), EnvError> {
        let blobs = dir.join("blobs/sha256");
        std::fs::create_dir_all(&blobs)
            .map_err(|e| EnvError::io(format!("creating {}", blobs.display()), e))?;
        let write = |path: &Path, data: &[u8]| {
            std::fs::write(path, data)
                .map_err(|e| EnvError::io(format!("writing {}", path.display()), e))
        };
        let blob_path = |digest: &str| blobs.join(digest.trim_start_matches("sha256:"));
        for l in &self.layers {
            write(&blob_path(&l.digest), &l.blob)?;
        }
        write(&blob_path(&self.config_digest), &self.config)?;
        write(&blob_path(&self.manifest_digest), &self.manifest)?;
        let index = json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_INDEX,
            "manifests": [{
                "mediaType": MEDIA_TYPE_MANIFEST,
                "digest": self.manifest_digest,
                "size": self.manifest.len(),
                "annotations": { "org.opencontainers.image.ref.name": tag },
            }],
        });
        let index = serde_json::to_vec_pretty(&index)
            .map_err(|e| EnvError::Image(format!("encoding index.json: {e}")))?;
        write(&dir.join("index.json"), &index)?;
        write(
            &dir.join("oci-layout"),
            br#"{"imageLayoutVersion":"1.0.0"}"#,
        )
    }

    /// Pushes blobs (monolithic uploads) and the manifest as `repo:tag` to a plain-HTTP
    /// registry ("IP:PORT"). Returns the manifest digest.
    pub fn push(&self, registry: &str, repo: &str, tag: &str) -> Result<String, EnvError> {
        for l in &self.layers {
            push_blob(registry, repo, &l.blob)?;
        }
        push_blob(registry, repo, &self.config)?;
        push_manifest(registry, repo, tag, MEDIA_TYPE_MANIFEST, &self.manifest)?;
        Ok(self.manifest_digest.clone())
    }
}

const TIMEOUT: Duration = Duration::from_secs(120);

/// PUTs a manifest (or index) of `media_type` as `repo:reference` (a tag or its digest).
pub fn push_manifest(
    registry: &str,
    repo: &str,
    reference: &str,
    media_type: &str,
    bytes: &[u8],
) -> Result<(), EnvError> {
    put_created(
        registry,
        &format!("/v2/{repo}/manifests/{reference}"),
        media_type,
        bytes,
    )
}

/// PUTs `body` to `target`; anything but 201 Created is an error naming the request.
fn put_created(
    registry: &str,
    target: &str,
    content_type: &str,
    body: &[u8],
) -> Result<(), EnvError> {
    let r = http::request(
        registry,
        "PUT",
        target,
        &[("Content-Type", content_type)],
        body,
        TIMEOUT,
    )?;
    if r.status != 201 {
        return Err(EnvError::http(
            format!("PUT {target}"),
            format!("status {}: {}", r.status, r.text()),
        ));
    }
    Ok(())
}

/// The registry has blob `digest` in `repo` (HEAD answers 200).
pub fn has_blob(registry: &str, repo: &str, digest: &str) -> Result<bool, EnvError> {
    let target = format!("/v2/{repo}/blobs/{digest}");
    Ok(http::request(registry, "HEAD", &target, &[], &[], TIMEOUT)?.status == 200)
}

/// Uploads one blob with a monolithic POST+PUT unless the registry already has it.
/// Returns its digest.
pub fn push_blob(registry: &str, repo: &str, data: &[u8]) -> Result<String, EnvError> {
    let digest = sha256_digest(data);
    if has_blob(registry, repo, &digest)? {
        return Ok(digest);
    }
    let start_target = format!("/v2/{repo}/blobs/uploads/");
    let r = http::request(registry, "POST", &start_target, &[], &[], TIMEOUT)?;
    let location = match (r.status, r.header("location")) {
        (202, Some(l)) => http::location_target(l),
        _ => {
            return Err(EnvError::http(
                format!("POST {start_target}"),
                format!("status {}: {}", r.status, r.text()),
            ));
        }
    };
    let sep = if location.contains('?') { '&' } else { '?' };
    let put_target = format!("{location}{sep}digest={digest}");
    put_created(registry, &put_target, "application/octet-stream", data)?;
    Ok(digest)
}

/// Where Debian's busybox-static installs the binary.
pub const BUSYBOX: &str = "/bin/busybox";

/// A pod sandbox ("pause") image: busybox `sleep` as its entrypoint. The sandbox only has to
/// stay alive, which `sleep` does (as PID 1 of the pod it ignores SIGTERM, and CRI stops
/// sandboxes with SIGKILL anyway).
pub fn pause_image() -> Result<Image, EnvError> {
    let layer = LayerBuilder::new()
        .dir("bin", 0o755)
        .dir("dev", 0o755)
        .dir("proc", 0o555)
        .dir("sys", 0o555)
        .file_from_host("bin/busybox", Path::new(BUSYBOX), 0o755)?
        .symlink("bin/sleep", "busybox")
        .build()?;
    ImageBuilder::new()
        .layer(layer)
        .entrypoint(&["/bin/sleep", "2147483647"])
        .build()
}

/// A single-layer image of Debian's static busybox: `/bin/busybox`, a symlink per applet in
/// `/bin` (sh, echo, cat, ...), and the usual top-level dirs. Cmd is `/bin/sh`.
pub fn busybox_image() -> Result<Image, EnvError> {
    let layer = busybox_layer()?;
    ImageBuilder::new().layer(layer).cmd(&["/bin/sh"]).build()
}

/// The busybox layer alone (useful as the base of multi-layer test images).
pub fn busybox_layer() -> Result<Layer, EnvError> {
    busybox_layer_builder()?.build()
}

/// The busybox layer's description, to extend with more files before building.
pub fn busybox_layer_builder() -> Result<LayerBuilder, EnvError> {
    let bin = Path::new(BUSYBOX);
    if !bin.exists() {
        return Err(EnvError::ToolNotFound {
            name: "busybox (package busybox-static)".into(),
            dir: bin.to_path_buf(),
        });
    }
    let mut list = std::process::Command::new(bin);
    list.arg("--list");
    let out = crate::process::run_ok(list, Duration::from_secs(10))?;
    let applets: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && *a != "busybox" && !a.contains('/'))
        .map(str::to_string)
        .collect();
    if !applets.iter().any(|a| a == "sh") {
        return Err(EnvError::Image(format!(
            "{BUSYBOX} --list has no sh applet; is it busybox-static?"
        )));
    }
    let mut b = LayerBuilder::new();
    for (d, mode) in [
        ("bin", 0o755),
        ("dev", 0o755),
        ("etc", 0o755),
        ("proc", 0o555),
        ("root", 0o700),
        ("sys", 0o555),
        ("tmp", 0o1777),
        ("var", 0o755),
    ] {
        b = b.dir(d, mode);
    }
    b = b
        .file_from_host("bin/busybox", bin, 0o755)?
        .file("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n", 0o644)
        .file("etc/group", "root:x:0:\n", 0o644);
    for a in &applets {
        b = b.symlink(&format!("bin/{a}"), "busybox");
    }
    Ok(b)
}

/// Writes the busybox image as an OCI image layout in `dir`, tag "latest".
pub fn busybox_layout(dir: &Path) -> Result<(), EnvError> {
    busybox_image()?.write_layout(dir, "latest")
}

/// Tars an OCI layout directory (for `ctr images import`).
pub fn layout_to_tar(layout: &Path, tar_path: &Path) -> Result<(), EnvError> {
    let file = std::fs::File::create(tar_path)
        .map_err(|e| EnvError::io(format!("creating {}", tar_path.display()), e))?;
    let mut b = tar::Builder::new(file);
    b.follow_symlinks(false);
    b.append_dir_all(".", layout)
        .map_err(|e| EnvError::io(format!("archiving {}", layout.display()), e))?;
    b.into_inner()
        .and_then(|mut f| f.flush())
        .map_err(|e| EnvError::io(format!("finishing {}", tar_path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_are_deterministic_and_well_formed() {
        let build = || {
            LayerBuilder::new()
                .dir("etc", 0o755)
                .file("etc/hosts", "127.0.0.1 localhost\n", 0o644)
                .symlink("etc/link", "hosts")
                .hardlink("etc/hard", "etc/hosts")
                .whiteout("usr/bin/gone")
                .opaque_dir("var/cache/")
                .build()
                .expect("layer")
        };
        let (a, b) = (build(), build());
        assert_eq!(a.digest, b.digest);
        assert_eq!(a.digest, sha256_digest(&a.blob));
        let gz = flate2::read::GzDecoder::new(a.blob.as_slice());
        let mut ar = tar::Archive::new(gz);
        let names: Vec<(String, tar::EntryType)> = ar
            .entries()
            .expect("entries")
            .map(|e| {
                let e = e.expect("entry");
                let p = e.path().expect("path").to_string_lossy().into_owned();
                (p, e.header().entry_type())
            })
            .collect();
        assert_eq!(
            names,
            [
                ("etc/".to_string(), tar::EntryType::Directory),
                ("etc/hosts".to_string(), tar::EntryType::Regular),
                ("etc/link".to_string(), tar::EntryType::Symlink),
                ("etc/hard".to_string(), tar::EntryType::Link),
                ("usr/bin/.wh.gone".to_string(), tar::EntryType::Regular),
                (
                    "var/cache/.wh..wh..opq".to_string(),
                    tar::EntryType::Regular
                ),
            ]
        );
    }

    #[test]
    fn manifest_references_config_and_layers() {
        let layer = LayerBuilder::new()
            .file("a", "x", 0o644)
            .build()
            .expect("layer");
        let img = ImageBuilder::new()
            .layer(layer.clone())
            .cmd(&["/a"])
            .build()
            .expect("image");
        let m: serde_json::Value = serde_json::from_slice(&img.manifest).expect("json");
        assert_eq!(m["config"]["digest"], img.config_digest.as_str());
        assert_eq!(m["layers"][0]["digest"], layer.digest.as_str());
        assert_eq!(m["layers"][0]["size"], layer.blob.len());
        let c: serde_json::Value = serde_json::from_slice(&img.config).expect("json");
        assert_eq!(c["rootfs"]["diff_ids"][0], layer.diff_id.as_str());
        assert_eq!(c["config"]["Cmd"][0], "/a");
    }
}
