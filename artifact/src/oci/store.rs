//! One interface over where images and artifacts live: an OCI registry repository or an OCI
//! image layout directory.
//!
//! A [`Store`] is scoped to one repository (or one layout). The trait is object-safe
//! (methods return [`BoxFuture`]) so the CLI, controller and node can hold `Arc<dyn Store>`.
//! Image references: `registry/repo:tag`, `registry/repo@sha256:...`, or `oci:DIR[:TAG]`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use bytes::Bytes;

use crate::oci::layout::{LayoutError, OciLayout};
use crate::oci::registry::{BlobStream, ImageRef, RegistryClient, RegistryError, Repository};
use crate::oci::{self, Descriptor, FormatError, RawManifest};
use crate::source::{BoxFuture, FileSource, RangeSource};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("invalid image reference {reference:?}: {message}")]
    BadReference { reference: String, message: String },
    #[error("{what}: {message}")]
    Other { what: String, message: String },
}

impl StoreError {
    /// Whether the manifest or blob asked for does not exist.
    pub fn is_not_found(&self) -> bool {
        match self {
            StoreError::Registry(e) => e.is_not_found(),
            StoreError::Layout(LayoutError::NotFound { .. }) => true,
            StoreError::Layout(LayoutError::Io { source, .. }) => {
                source.kind() == std::io::ErrorKind::NotFound
            }
            _ => false,
        }
    }
}

/// A blob read chunk by chunk; the digest is checked before the last chunk is returned, so
/// a consumer that reached the end (`None`) got verified bytes.
pub trait ChunkStream: Send {
    fn next_chunk(&mut self) -> BoxFuture<'_, Result<Option<Bytes>, StoreError>>;
}

/// Where images and artifacts live.
pub trait Store: Send + Sync {
    /// A human-readable name (`registry/repo` or `oci:DIR`), for logs and errors.
    fn name(&self) -> String;

    /// A manifest by tag or digest, checked against its digest.
    fn get_manifest<'a>(
        &'a self,
        reference: &'a str,
    ) -> BoxFuture<'a, Result<RawManifest, StoreError>>;

    /// A whole blob (at most `limit` bytes), checked against its digest.
    fn get_blob<'a>(
        &'a self,
        digest: &'a str,
        limit: u64,
    ) -> BoxFuture<'a, Result<Bytes, StoreError>>;

    /// A streamed blob (layers); memory use is one chunk.
    fn open_blob<'a>(
        &'a self,
        desc: &'a Descriptor,
    ) -> BoxFuture<'a, Result<Box<dyn ChunkStream>, StoreError>>;

    /// Ranged reads of a blob (not digest-checked; the layer reader checks spans).
    fn range_source(&self, desc: &Descriptor) -> Result<Arc<dyn RangeSource>, StoreError>;

    fn has_blob<'a>(&'a self, digest: &'a str) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// Stores a blob (skipped when present); returns its descriptor.
    fn put_blob<'a>(
        &'a self,
        media_type: &'a str,
        data: Bytes,
    ) -> BoxFuture<'a, Result<Descriptor, StoreError>>;

    /// Stores a manifest, under `tag` when given (else by digest only).
    fn put_manifest<'a>(
        &'a self,
        raw: &'a RawManifest,
        tag: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Descriptor, StoreError>>;

    /// Descriptors of the manifests whose `subject` is `subject_digest`.
    fn referrers<'a>(
        &'a self,
        subject_digest: &'a str,
    ) -> BoxFuture<'a, Result<Vec<Descriptor>, StoreError>>;

    /// Makes a pushed manifest findable as a referrer of `subject_digest` (a no-op where
    /// the store indexes subjects itself).
    fn add_referrer<'a>(
        &'a self,
        subject_digest: &'a str,
        referrer: &'a Descriptor,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
}

/// A repository on a registry.
pub struct RegistryStore {
    client: RegistryClient,
    repo: Repository,
    /// Referrers API support: 0 unknown, 1 yes, 2 no.
    referrers_api: AtomicU8,
}

impl RegistryStore {
    pub fn new(client: RegistryClient, repo: Repository) -> RegistryStore {
        RegistryStore {
            client,
            repo,
            referrers_api: AtomicU8::new(0),
        }
    }

    pub fn repository(&self) -> &Repository {
        &self.repo
    }

    pub fn client(&self) -> &RegistryClient {
        &self.client
    }
}

struct RegistryChunks(BlobStream);

impl ChunkStream for RegistryChunks {
    fn next_chunk(&mut self) -> BoxFuture<'_, Result<Option<Bytes>, StoreError>> {
        Box::pin(async move { Ok(self.0.next_chunk().await?) })
    }
}

impl Store for RegistryStore {
    fn name(&self) -> String {
        self.repo.to_string()
    }

    fn get_manifest<'a>(
        &'a self,
        reference: &'a str,
    ) -> BoxFuture<'a, Result<RawManifest, StoreError>> {
        Box::pin(async move { Ok(self.client.get_manifest(&self.repo, reference).await?) })
    }

    fn get_blob<'a>(
        &'a self,
        digest: &'a str,
        limit: u64,
    ) -> BoxFuture<'a, Result<Bytes, StoreError>> {
        Box::pin(async move { Ok(self.client.get_blob(&self.repo, digest, limit).await?) })
    }

    fn open_blob<'a>(
        &'a self,
        desc: &'a Descriptor,
    ) -> BoxFuture<'a, Result<Box<dyn ChunkStream>, StoreError>> {
        Box::pin(async move {
            let s = self
                .client
                .blob_stream(&self.repo, &desc.digest, Some(desc.size))?;
            Ok(Box::new(RegistryChunks(s)) as Box<dyn ChunkStream>)
        })
    }

    fn range_source(&self, desc: &Descriptor) -> Result<Arc<dyn RangeSource>, StoreError> {
        oci::digest_hex(&desc.digest)?;
        Ok(Arc::new(self.client.range_source(
            &self.repo,
            &desc.digest,
            desc.size,
        )))
    }

    fn has_blob<'a>(&'a self, digest: &'a str) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move { Ok(self.client.blob_exists(&self.repo, digest).await?.is_some()) })
    }

    fn put_blob<'a>(
        &'a self,
        media_type: &'a str,
        data: Bytes,
    ) -> BoxFuture<'a, Result<Descriptor, StoreError>> {
        Box::pin(async move { Ok(self.client.push_blob(&self.repo, media_type, data).await?) })
    }

    fn put_manifest<'a>(
        &'a self,
        raw: &'a RawManifest,
        tag: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Descriptor, StoreError>> {
        Box::pin(async move {
            let reference = tag.unwrap_or(&raw.digest);
            let (_, subject_ok) = self.client.put_manifest(&self.repo, reference, raw).await?;
            if subject_ok {
                self.referrers_api.store(1, Ordering::Relaxed);
            }
            Ok(raw.descriptor())
        })
    }

    fn referrers<'a>(
        &'a self,
        subject_digest: &'a str,
    ) -> BoxFuture<'a, Result<Vec<Descriptor>, StoreError>> {
        Box::pin(async move {
            match self.referrers_api.load(Ordering::Relaxed) {
                1 => {
                    if let Some(list) = self
                        .client
                        .referrers_api(&self.repo, subject_digest)
                        .await?
                    {
                        return Ok(list);
                    }
                    self.referrers_api.store(2, Ordering::Relaxed);
                }
                2 => {}
                _ => {
                    // Unknown: the API and the tag at once (one round trip, not two).
                    let (list, api) = self
                        .client
                        .referrers_probing(&self.repo, subject_digest)
                        .await?;
                    self.referrers_api
                        .store(if api { 1 } else { 2 }, Ordering::Relaxed);
                    return Ok(list);
                }
            }
            Ok(self
                .client
                .referrers_tag(&self.repo, subject_digest)
                .await?
                .0)
        })
    }

    fn add_referrer<'a>(
        &'a self,
        subject_digest: &'a str,
        referrer: &'a Descriptor,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            if self.referrers_api.load(Ordering::Relaxed) == 0 {
                let api = self
                    .client
                    .referrers_api(&self.repo, subject_digest)
                    .await?;
                self.referrers_api
                    .store(if api.is_some() { 1 } else { 2 }, Ordering::Relaxed);
            }
            if self.referrers_api.load(Ordering::Relaxed) == 1 {
                // The registry indexes subjects itself.
                return Ok(());
            }
            Ok(self
                .client
                .add_referrer_tag(&self.repo, subject_digest, referrer)
                .await?)
        })
    }
}

/// An OCI image layout directory.
pub struct LayoutStore {
    layout: OciLayout,
}

impl LayoutStore {
    pub fn new(layout: OciLayout) -> LayoutStore {
        LayoutStore { layout }
    }

    pub fn layout(&self) -> &OciLayout {
        &self.layout
    }

    async fn blocking<T: Send + 'static>(
        &self,
        what: &str,
        f: impl FnOnce(OciLayout) -> Result<T, LayoutError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let l = self.layout.clone();
        tokio::task::spawn_blocking(move || f(l))
            .await
            .map_err(|e| StoreError::Other {
                what: format!("{} {what}", self.name()),
                message: e.to_string(),
            })?
            .map_err(StoreError::from)
    }
}

/// A layout blob read in chunks, hashed as it goes.
struct FileChunks {
    file: tokio::fs::File,
    hasher: sha2::Sha256,
    digest: String,
    expected: u64,
    pos: u64,
    name: String,
    done: bool,
    pending: Option<Bytes>,
}

const FILE_CHUNK: usize = 256 * 1024;

impl FileChunks {
    async fn read_one(&mut self) -> Result<Option<Bytes>, StoreError> {
        use sha2::Digest as _;
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; FILE_CHUNK];
        let n = self
            .file
            .read(&mut buf)
            .await
            .map_err(|e| StoreError::Other {
                what: format!("reading {}", self.name),
                message: e.to_string(),
            })?;
        if n == 0 {
            let actual = format!(
                "sha256:{}",
                hex::encode(std::mem::take(&mut self.hasher).finalize())
            );
            if actual != self.digest || self.pos != self.expected {
                return Err(StoreError::Other {
                    what: self.name.clone(),
                    message: format!(
                        "content does not match its descriptor: expected {} ({} bytes), got {actual} ({} bytes)",
                        self.digest, self.expected, self.pos
                    ),
                });
            }
            return Ok(None);
        }
        buf.truncate(n);
        self.hasher.update(&buf);
        self.pos += n as u64;
        Ok(Some(Bytes::from(buf)))
    }
}

impl ChunkStream for FileChunks {
    fn next_chunk(&mut self) -> BoxFuture<'_, Result<Option<Bytes>, StoreError>> {
        Box::pin(async move {
            loop {
                if self.done {
                    return Ok(None);
                }
                match self.read_one().await? {
                    Some(c) => {
                        if let Some(prev) = self.pending.replace(c) {
                            return Ok(Some(prev));
                        }
                    }
                    None => {
                        self.done = true;
                        return Ok(self.pending.take());
                    }
                }
            }
        })
    }
}

impl Store for LayoutStore {
    fn name(&self) -> String {
        format!("oci:{}", self.layout.root().display())
    }

    fn get_manifest<'a>(
        &'a self,
        reference: &'a str,
    ) -> BoxFuture<'a, Result<RawManifest, StoreError>> {
        let r = reference.to_string();
        Box::pin(self.blocking("get manifest", move |l| {
            let d = l.resolve(&r)?;
            l.read_manifest(&d.digest)
        }))
    }

    fn get_blob<'a>(
        &'a self,
        digest: &'a str,
        limit: u64,
    ) -> BoxFuture<'a, Result<Bytes, StoreError>> {
        let d = digest.to_string();
        Box::pin(self.blocking("get blob", move |l| l.read_blob(&d, limit)))
    }

    fn open_blob<'a>(
        &'a self,
        desc: &'a Descriptor,
    ) -> BoxFuture<'a, Result<Box<dyn ChunkStream>, StoreError>> {
        Box::pin(async move {
            let path = self.layout.blob_path(&desc.digest)?;
            let file = tokio::fs::File::open(&path)
                .await
                .map_err(|source| LayoutError::Io {
                    dir: self.layout.root().display().to_string(),
                    what: format!("opening blob {}", desc.digest),
                    source,
                })?;
            Ok(Box::new(FileChunks {
                file,
                hasher: Default::default(),
                digest: desc.digest.clone(),
                expected: desc.size,
                pos: 0,
                name: format!("{} blob {}", self.name(), desc.digest),
                done: false,
                pending: None,
            }) as Box<dyn ChunkStream>)
        })
    }

    fn range_source(&self, desc: &Descriptor) -> Result<Arc<dyn RangeSource>, StoreError> {
        let path = self.layout.blob_path(&desc.digest)?;
        let src = FileSource::open(&path).map_err(|e| StoreError::Other {
            what: format!("{} blob {}", self.name(), desc.digest),
            message: e.to_string(),
        })?;
        Ok(Arc::new(src))
    }

    fn has_blob<'a>(&'a self, digest: &'a str) -> BoxFuture<'a, Result<bool, StoreError>> {
        let d = digest.to_string();
        Box::pin(self.blocking("has blob", move |l| l.has_blob(&d)))
    }

    fn put_blob<'a>(
        &'a self,
        media_type: &'a str,
        data: Bytes,
    ) -> BoxFuture<'a, Result<Descriptor, StoreError>> {
        let m = media_type.to_string();
        Box::pin(self.blocking("put blob", move |l| l.write_blob(&m, &data)))
    }

    fn put_manifest<'a>(
        &'a self,
        raw: &'a RawManifest,
        tag: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Descriptor, StoreError>> {
        let raw2 = raw.clone();
        let tag = tag.map(str::to_string);
        Box::pin(async move {
            // Artifacts (manifests with a subject) get their artifactType and annotations
            // on the index.json entry, so listing the layout shows what they are.
            let extra = match raw2.parse() {
                Ok(oci::Manifest::Image(m)) if m.subject.is_some() => {
                    Some(oci::referrer_descriptor(&raw2, &m))
                }
                _ => None,
            };
            self.blocking("put manifest", move |l| {
                l.put_manifest(&raw2, tag.as_deref(), extra.as_ref())
            })
            .await
        })
    }

    fn referrers<'a>(
        &'a self,
        subject_digest: &'a str,
    ) -> BoxFuture<'a, Result<Vec<Descriptor>, StoreError>> {
        let d = subject_digest.to_string();
        Box::pin(self.blocking("referrers", move |l| l.referrers(&d)))
    }

    fn add_referrer<'a>(
        &'a self,
        _subject_digest: &'a str,
        _referrer: &'a Descriptor,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        // put_manifest already listed it in index.json, and referrers() reads subjects.
        Box::pin(async { Ok(()) })
    }
}

/// A parsed image reference: which store, and the tag or digest in it.
pub struct OpenedRef {
    pub store: Arc<dyn Store>,
    /// Tag or digest within the store.
    pub reference: String,
}

impl std::fmt::Debug for OpenedRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.store.name(), self.reference)
    }
}

/// Splits `oci:DIR[:TAG]` (or `oci:DIR@sha256:...`).
pub fn parse_layout_ref(s: &str) -> Option<(String, Option<String>)> {
    let rest = s.strip_prefix("oci:")?;
    if let Some((dir, digest)) = rest.rsplit_once('@')
        && digest.starts_with("sha256:")
    {
        return Some((dir.to_string(), Some(digest.to_string())));
    }
    // A tag has no '/'; the last ':' after the last '/' separates it.
    let slash = rest.rfind('/').map_or(0, |i| i + 1);
    match rest[slash..].rfind(':') {
        Some(i) => {
            let (dir, tag) = rest.split_at(slash + i);
            Some((dir.to_string(), Some(tag[1..].to_string())))
        }
        None => Some((rest.to_string(), None)),
    }
}

/// Opens the store of an image reference: `oci:DIR[:TAG]` (tag `latest` by default; the
/// directory is created when missing and `create` is set) or a registry reference.
pub fn open_reference(
    reference: &str,
    client: &RegistryClient,
    create: bool,
) -> Result<OpenedRef, StoreError> {
    if let Some((dir, tag)) = parse_layout_ref(reference) {
        if dir.is_empty() {
            return Err(StoreError::BadReference {
                reference: reference.to_string(),
                message: "empty directory".into(),
            });
        }
        let path = std::path::Path::new(&dir);
        let layout = if create {
            OciLayout::open_or_create(path)?
        } else {
            OciLayout::open(path)?
        };
        return Ok(OpenedRef {
            store: Arc::new(LayoutStore::new(layout)),
            reference: tag.unwrap_or_else(|| "latest".to_string()),
        });
    }
    let r = ImageRef::parse(reference)?;
    Ok(OpenedRef {
        reference: r.reference(),
        store: Arc::new(RegistryStore::new(client.clone(), r.repository)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_refs() {
        assert_eq!(
            parse_layout_ref("oci:/tmp/x:v1"),
            Some(("/tmp/x".into(), Some("v1".into())))
        );
        assert_eq!(
            parse_layout_ref("oci:/tmp/x"),
            Some(("/tmp/x".into(), None))
        );
        assert_eq!(
            parse_layout_ref("oci:rel/dir"),
            Some(("rel/dir".into(), None))
        );
        let d = format!("oci:/a/b@{}", oci::EMPTY_DIGEST);
        assert_eq!(
            parse_layout_ref(&d),
            Some(("/a/b".into(), Some(oci::EMPTY_DIGEST.into())))
        );
        assert_eq!(parse_layout_ref("reg.io/x:1"), None);
    }
}
