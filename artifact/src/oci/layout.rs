//! OCI image layout directories (`oci-layout`, `index.json`, `blobs/sha256/<hex>`).
//!
//! The embedded store that needs no registry. Blobs are written to a temporary file and
//! renamed into place (content-addressed, so concurrent writers of one blob agree);
//! `index.json` updates hold an exclusive file lock on `index.json.lock`, so writers in
//! several processes do not lose each other's entries.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::oci::{
    self, Descriptor, FormatError, ImageIndex, MAX_MANIFEST_BYTES, Manifest, RawManifest,
};

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("OCI layout {dir}: {what}: {source}")]
    Io {
        dir: String,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("OCI layout {dir}: {what}")]
    Invalid { dir: String, what: String },
    #[error("OCI layout {dir}: no manifest for {reference:?}")]
    NotFound { dir: String, reference: String },
    #[error("OCI layout {dir}: blob {digest} does not match its digest (got {actual})")]
    DigestMismatch {
        dir: String,
        digest: String,
        actual: String,
    },
    #[error("OCI layout {dir}: blob {digest} is larger than the limit of {limit} bytes")]
    TooLarge {
        dir: String,
        digest: String,
        limit: u64,
    },
    #[error(transparent)]
    Format(#[from] FormatError),
}

/// An OCI image layout directory.
#[derive(Clone, Debug)]
pub struct OciLayout {
    root: PathBuf,
}

const LAYOUT_FILE: &str = "oci-layout";
const LAYOUT_JSON: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

impl OciLayout {
    fn io(&self, what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LayoutError + '_ {
        let what = what.into();
        move |source| LayoutError::Io {
            dir: self.root.display().to_string(),
            what,
            source,
        }
    }

    fn invalid(&self, what: impl Into<String>) -> LayoutError {
        LayoutError::Invalid {
            dir: self.root.display().to_string(),
            what: what.into(),
        }
    }

    /// Opens an existing layout.
    pub fn open(dir: &Path) -> Result<OciLayout, LayoutError> {
        let l = OciLayout {
            root: dir.to_path_buf(),
        };
        if !dir.join(LAYOUT_FILE).is_file() {
            return Err(l.invalid("no oci-layout file: not an OCI image layout"));
        }
        Ok(l)
    }

    /// Opens a layout, creating an empty one when the directory has none.
    pub fn open_or_create(dir: &Path) -> Result<OciLayout, LayoutError> {
        let l = OciLayout {
            root: dir.to_path_buf(),
        };
        std::fs::create_dir_all(dir.join("blobs/sha256")).map_err(l.io("creating blobs/"))?;
        if !dir.join(LAYOUT_FILE).exists() {
            l.write_atomic(&dir.join(LAYOUT_FILE), LAYOUT_JSON)?;
        }
        if !dir.join("index.json").exists() {
            let _lock = l.lock()?;
            if !dir.join("index.json").exists() {
                l.write_index_unlocked(&ImageIndex::new_oci(Vec::new()))?;
            }
        }
        Ok(l)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Path of a blob (the digest is validated, so the path stays inside the layout).
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf, LayoutError> {
        let hex = oci::digest_hex(digest)?;
        Ok(self.root.join("blobs/sha256").join(hex))
    }

    pub fn has_blob(&self, digest: &str) -> Result<bool, LayoutError> {
        Ok(self.blob_path(digest)?.is_file())
    }

    /// Reads a whole blob (at most `limit` bytes) and checks its digest.
    pub fn read_blob(&self, digest: &str, limit: u64) -> Result<Bytes, LayoutError> {
        let path = self.blob_path(digest)?;
        let len = std::fs::metadata(&path)
            .map_err(self.io(format!("blob {digest}")))?
            .len();
        if len > limit {
            return Err(LayoutError::TooLarge {
                dir: self.root.display().to_string(),
                digest: digest.to_string(),
                limit,
            });
        }
        let bytes = std::fs::read(&path).map_err(self.io(format!("reading blob {digest}")))?;
        let actual = oci::sha256_digest(&bytes);
        if actual != digest {
            return Err(LayoutError::DigestMismatch {
                dir: self.root.display().to_string(),
                digest: digest.to_string(),
                actual,
            });
        }
        Ok(Bytes::from(bytes))
    }

    fn write_atomic(&self, path: &Path, data: &[u8]) -> Result<(), LayoutError> {
        let dir = path.parent().unwrap_or(&self.root);
        let (tmp_path, mut file) =
            tempfile_in(dir).map_err(self.io("creating a temporary file"))?;
        let res = file
            .write_all(data)
            .and_then(|_| file.sync_all())
            .map_err(self.io(format!("writing {}", tmp_path.display())))
            .and_then(|_| {
                std::fs::rename(&tmp_path, path)
                    .map_err(self.io(format!("renaming to {}", path.display())))
            });
        if res.is_err() {
            // Do not leave temporary files behind on failure.
            let _ = std::fs::remove_file(&tmp_path);
        }
        res
    }

    /// Writes a blob (content-addressed; a present blob is kept).
    pub fn write_blob(&self, media_type: &str, data: &[u8]) -> Result<Descriptor, LayoutError> {
        let desc = Descriptor::of(media_type, data);
        let path = self.blob_path(&desc.digest)?;
        if !path.is_file() {
            std::fs::create_dir_all(self.root.join("blobs/sha256"))
                .map_err(self.io("creating blobs/"))?;
            self.write_atomic(&path, data)?;
        }
        Ok(desc)
    }

    fn lock(&self) -> Result<std::fs::File, LayoutError> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.root.join("index.json.lock"))
            .map_err(self.io("opening index.json.lock"))?;
        f.lock().map_err(self.io("locking index.json.lock"))?;
        Ok(f)
    }

    pub fn read_index(&self) -> Result<ImageIndex, LayoutError> {
        let bytes =
            std::fs::read(self.root.join("index.json")).map_err(self.io("reading index.json"))?;
        serde_json::from_slice(&bytes).map_err(|e| self.invalid(format!("index.json: {e}")))
    }

    fn write_index_unlocked(&self, idx: &ImageIndex) -> Result<(), LayoutError> {
        let bytes = serde_json::to_vec_pretty(idx)
            .map_err(|e| self.invalid(format!("serializing index.json: {e}")))?;
        self.write_atomic(&self.root.join("index.json"), &bytes)
    }

    /// Read-modify-write of index.json under the lock.
    pub fn update_index(&self, f: impl FnOnce(&mut Vec<Descriptor>)) -> Result<(), LayoutError> {
        let _lock = self.lock()?;
        let mut idx = self.read_index()?;
        f(&mut idx.manifests);
        self.write_index_unlocked(&idx)
    }

    /// Finds a manifest by tag (`org.opencontainers.image.ref.name`) or digest. A digest
    /// not listed in index.json is accepted when its blob is present.
    pub fn resolve(&self, reference: &str) -> Result<Descriptor, LayoutError> {
        let idx = self.read_index()?;
        let by_digest = reference.starts_with("sha256:");
        if let Some(d) = idx.manifests.iter().find(|d| {
            if by_digest {
                d.digest == reference
            } else {
                d.annotation(oci::REF_NAME) == Some(reference)
            }
        }) {
            return Ok(d.clone());
        }
        if by_digest && self.has_blob(reference)? {
            let raw = self.read_manifest(reference)?;
            return Ok(raw.descriptor());
        }
        Err(LayoutError::NotFound {
            dir: self.root.display().to_string(),
            reference: reference.to_string(),
        })
    }

    /// Reads a manifest blob by digest (checked), media type from its content.
    pub fn read_manifest(&self, digest: &str) -> Result<RawManifest, LayoutError> {
        let bytes = self.read_blob(digest, MAX_MANIFEST_BYTES)?;
        Ok(RawManifest::new(bytes, None))
    }

    /// Writes a manifest blob and lists it in index.json (with a tag when given; a tag
    /// moves from any other entry to this one).
    pub fn put_manifest(
        &self,
        raw: &RawManifest,
        tag: Option<&str>,
        extra: Option<&Descriptor>,
    ) -> Result<Descriptor, LayoutError> {
        self.write_blob(&raw.media_type, &raw.bytes)?;
        let mut desc = extra.cloned().unwrap_or_else(|| raw.descriptor());
        desc.digest = raw.digest.clone();
        desc.size = raw.bytes.len() as u64;
        desc.media_type = raw.media_type.clone();
        if let Some(t) = tag {
            desc.annotations
                .get_or_insert_with(BTreeMap::new)
                .insert(oci::REF_NAME.to_string(), t.to_string());
        }
        let entry = desc.clone();
        self.update_index(move |list| {
            if let Some(t) = tag {
                list.retain(|d| d.annotation(oci::REF_NAME) != Some(t));
            }
            let same = |d: &Descriptor| {
                d.digest == entry.digest
                    && d.annotation(oci::REF_NAME) == entry.annotation(oci::REF_NAME)
            };
            if !list.iter().any(same) {
                list.push(entry);
            }
        })?;
        Ok(desc)
    }

    /// Manifests that refer to `subject_digest`: index.json entries whose manifest has
    /// that subject, plus any other manifest blob of the layout that does (a scan of
    /// manifest-sized JSON blobs, so artifacts copied in without an index.json entry are
    /// found too).
    pub fn referrers(&self, subject_digest: &str) -> Result<Vec<Descriptor>, LayoutError> {
        oci::digest_hex(subject_digest)?;
        let mut out: Vec<Descriptor> = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        let mut consider = |raw: RawManifest, out: &mut Vec<Descriptor>| {
            if let Ok(Manifest::Image(m)) = raw.parse()
                && m.subject
                    .as_ref()
                    .is_some_and(|s| s.digest == subject_digest)
                && seen.insert(raw.digest.clone())
            {
                out.push(oci::referrer_descriptor(&raw, &m));
            }
        };
        for d in self.read_index()?.manifests {
            if d.is_index() || d.size > MAX_MANIFEST_BYTES {
                continue;
            }
            if let Ok(raw) = self.read_manifest(&d.digest) {
                consider(raw, &mut out);
            }
        }
        let dir = self.root.join("blobs/sha256");
        let entries = std::fs::read_dir(&dir).map_err(self.io("listing blobs/sha256"))?;
        for e in entries.flatten() {
            let Ok(md) = e.metadata() else { continue };
            if !md.is_file() || md.len() > MAX_MANIFEST_BYTES || md.len() < 2 {
                continue;
            }
            let name = e.file_name();
            let Some(hex) = name.to_str() else { continue };
            let digest = format!("sha256:{hex}");
            if oci::digest_hex(&digest).is_err() {
                continue;
            }
            // Cheap pre-check: manifests are JSON objects mentioning "subject".
            let Ok(bytes) = std::fs::read(e.path()) else {
                continue;
            };
            if bytes.first() != Some(&b'{') || !bytes.windows(9).any(|w| w == b"\"subject\"") {
                continue;
            }
            if oci::sha256_digest(&bytes) != digest {
                continue;
            }
            consider(RawManifest::new(Bytes::from(bytes), None), &mut out);
        }
        Ok(out)
    }
}

/// Creates a uniquely named temporary file in `dir`.
fn tempfile_in(dir: &Path) -> std::io::Result<(PathBuf, std::fs::File)> {
    for _ in 0..16 {
        let p = dir.join(format!(".tmp-{:016x}", fastrand::u64(..)));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&p)
        {
            Ok(f) => return Ok((p, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other(
        "could not create a unique temporary file",
    ))
}
