//! Blobs: whole (checked), streamed (checked at the end, resumable), ranged (checked by the
//! caller per span), pushed.

use super::RegistryClient;
use super::RegistryError;
use super::Repository;
use super::transport::Failure;
use super::transport::Retrier;
use super::transport::read_limited;
use super::transport::transport_reason;
use crate::oci;
use crate::oci::Descriptor;
use crate::source::BoxFuture;
use crate::source::RangeSource;
use crate::source::SourceError;
use bytes::Bytes;
use bytes::BytesMut;
use reqwest::StatusCode;
use reqwest::header;
use sha2::Digest as _;
use sha2::Sha256;
use std::time::Instant;
use tracing::debug;

impl RegistryClient {
    /// Whether a blob exists (its size when it does).
    pub async fn blob_exists(
        &self,
        repo: &Repository,
        digest: &str,
    ) -> Result<Option<u64>, RegistryError> {
        oci::digest_hex(digest)?;
        let url = self.url(repo, &format!("blobs/{digest}"));
        let build = |c: &reqwest::Client| c.head(&url);
        let (url, build) = (&url, &build);
        let resp = self
            .with_retries("HEAD blob", url, move || async move {
                self.send_once(
                    "HEAD blob",
                    repo,
                    false,
                    url,
                    &[StatusCode::NOT_FOUND],
                    &build,
                )
                .await
            })
            .await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        Ok(Some(
            resp.headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
        ))
    }

    /// Pulls a whole blob into memory (configs, index blobs), checked against its digest.
    /// `limit` bounds memory.
    pub async fn get_blob(
        &self,
        repo: &Repository,
        digest: &str,
        limit: u64,
    ) -> Result<Bytes, RegistryError> {
        oci::digest_hex(digest)?;
        let url = self.url(repo, &format!("blobs/{digest}"));
        let build = |c: &reqwest::Client| c.get(&url);
        let what = format!("blob {repo}@{digest}");
        let (url, build, what) = (&url, &build, &what);
        self.with_retries("GET blob", url, move || async move {
            let resp = self
                .send_once("GET blob", repo, false, url, &[], &build)
                .await?;
            let b = read_limited(resp, limit, what).await?;
            let actual = oci::sha256_digest(&b);
            if actual != digest {
                return Err(Failure::Fatal(RegistryError::DigestMismatch {
                    what: what.clone(),
                    expected: digest.to_string(),
                    actual,
                }));
            }
            Ok(b)
        })
        .await
    }

    /// Opens a streamed read of a blob. A connection that breaks mid-blob is resumed with a
    /// range request from where it broke; the digest (and size, when given) are checked at
    /// the end, and the last chunk is only returned once they match.
    pub fn blob_stream(
        &self,
        repo: &Repository,
        digest: &str,
        expected_size: Option<u64>,
    ) -> Result<BlobStream, RegistryError> {
        oci::digest_hex(digest)?;
        let url = self.url(repo, &format!("blobs/{digest}"));
        Ok(BlobStream {
            client: self.clone(),
            repo: repo.clone(),
            digest: digest.to_string(),
            expected_size,
            retrier: self.retrier("GET blob (stream)", &url),
            url,
            pos: 0,
            hasher: Sha256::new(),
            resp: None,
            pending: None,
            carry: None,
            progress_mark: 0,
            done: false,
        })
    }

    /// What a ranged read of `[offset, offset+len)` is called in errors, its URL and its
    /// Range header.
    pub(super) fn range_request(
        &self,
        repo: &Repository,
        digest: &str,
        offset: u64,
        len: u64,
    ) -> Result<(String, String, String), RegistryError> {
        oci::digest_hex(digest)?;
        let what = format!("blob {repo}@{digest} range {offset}+{len}");
        let end = offset
            .checked_add(len.max(1) - 1)
            .ok_or_else(|| RegistryError::TooLarge {
                what: what.clone(),
                limit: u64::MAX,
            })?;
        let url = self.url(repo, &format!("blobs/{digest}"));
        Ok((what, url, format!("bytes={offset}-{end}")))
    }

    /// Reads `[offset, offset+len)` of a blob. Not digest-checked (callers check spans).
    pub async fn get_blob_range(
        &self,
        repo: &Repository,
        digest: &str,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, RegistryError> {
        let (what, url, range) = self.range_request(repo, digest, offset, len)?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        let build = |c: &reqwest::Client| c.get(&url).header(header::RANGE, &range);
        let (url, build, what) = (&url, &build, &what);
        self.with_retries("GET blob range", url, move || async move {
            let resp = self
                .send_once("GET blob range", repo, false, url, &[], &build)
                .await?;
            let b = if resp.status() == StatusCode::PARTIAL_CONTENT {
                read_limited(resp, len, what).await?
            } else {
                // The registry ignored the range: skip to it, bounded by what we need.
                read_skipping(resp, offset, len, what).await?
            };
            if b.len() as u64 != len {
                return Err(Failure::Fatal(RegistryError::SizeMismatch {
                    what: what.clone(),
                    expected: len,
                    actual: b.len() as u64,
                }));
            }
            Ok(b)
        })
        .await
    }

    /// Opens `[offset, offset+len)` of a blob for reading as it arrives (see
    /// [`RangeStream`]). Opening is retried like [`RegistryClient::get_blob_range`]; a body
    /// that breaks is not: the caller reads what is left with `get_blob_range`. Not
    /// digest-checked (callers check their parts). A registry that ignores the range is an
    /// error here (`get_blob_range` copes with it).
    pub async fn get_blob_range_stream(
        &self,
        repo: &Repository,
        digest: &str,
        offset: u64,
        len: u64,
    ) -> Result<RangeStream, RegistryError> {
        let (what, url, range) = self.range_request(repo, digest, offset, len)?;
        let build = |c: &reqwest::Client| c.get(&url).header(header::RANGE, &range);
        let (url_ref, build) = (&url, &build);
        let resp = self
            .with_retries("GET blob range", url_ref, move || async move {
                self.send_once("GET blob range", repo, false, url_ref, &[], build)
                    .await
            })
            .await?;
        if resp.status() != StatusCode::PARTIAL_CONTENT && len > 0 {
            return Err(RegistryError::Transport {
                op: "GET blob range".into(),
                url,
                message: format!("the registry ignored the range (status {})", resp.status()),
            });
        }
        Ok(RangeStream {
            resp,
            left: len,
            len,
            what,
            url,
        })
    }

    /// Pushes a blob (monolithic upload) unless the registry has it. Returns its descriptor.
    pub async fn push_blob(
        &self,
        repo: &Repository,
        media_type: &str,
        data: Bytes,
    ) -> Result<Descriptor, RegistryError> {
        let desc = Descriptor::of(media_type, &data);
        if self.blob_exists(repo, &desc.digest).await?.is_some() {
            debug!(%repo, digest = %desc.digest, "blob exists; not pushed");
            return Ok(desc);
        }
        let start_url = self.url(repo, "blobs/uploads/");
        let build_post = |c: &reqwest::Client| c.post(&start_url).header(header::CONTENT_LENGTH, 0);
        let (start_url, build_post, desc, data) = (&start_url, &build_post, &desc, &data);
        self.with_retries("push blob", start_url, move || async move {
            // Each attempt starts a fresh upload session: a failed PUT may have spoiled it.
            let resp = self
                .send_once("POST blob upload", repo, true, start_url, &[], &build_post)
                .await?;
            let location = resp
                .headers()
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
                .ok_or_else(|| RegistryError::Transport {
                    op: "POST blob upload".into(),
                    url: start_url.clone(),
                    message: "no Location header in the answer".into(),
                })?;
            let put_url = self.upload_url(&repo.registry, &location, &desc.digest);
            let body = data.clone();
            let build_put = |c: &reqwest::Client| {
                c.put(&put_url)
                    .header(header::CONTENT_TYPE, "application/octet-stream")
                    .body(body.clone())
            };
            self.send_once("PUT blob upload", repo, true, &put_url, &[], &build_put)
                .await?;
            debug!(%repo, digest = %desc.digest, size = desc.size, "pushed blob");
            Ok(desc.clone())
        })
        .await
    }

    pub(super) fn upload_url(&self, host: &str, location: &str, digest: &str) -> String {
        let base = if location.starts_with("http://") || location.starts_with("https://") {
            location.to_string()
        } else {
            format!("{}://{}{}", self.scheme(host), host, location)
        };
        let sep = if base.contains('?') { '&' } else { '?' };
        // Digests are `sha256:<hex>`; only the colon needs escaping.
        format!("{base}{sep}digest={}", digest.replace(':', "%3A"))
    }

    /// A ranged-read source for one blob.
    pub fn range_source(&self, repo: &Repository, digest: &str, size: u64) -> RegistryBlobSource {
        RegistryBlobSource {
            client: self.clone(),
            repo: repo.clone(),
            digest: digest.to_string(),
            size,
        }
    }
}

/// Reads `[offset, offset+len)` from a full-body response, discarding the start.
pub(super) async fn read_skipping(
    mut resp: reqwest::Response,
    offset: u64,
    len: u64,
    what: &str,
) -> Result<Bytes, Failure> {
    let mut pos = 0u64;
    let mut out = BytesMut::new();
    let end = offset.saturating_add(len);
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => {
                let cstart = pos;
                let cend = pos + c.len() as u64;
                pos = cend;
                if cend > offset && cstart < end {
                    let a = offset.saturating_sub(cstart) as usize;
                    let b = (end.min(cend) - cstart) as usize;
                    out.extend_from_slice(&c[a..b]);
                }
                if pos >= end {
                    return Ok(out.freeze());
                }
            }
            Ok(None) => return Ok(out.freeze()),
            Err(e) => {
                return Err(Failure::Retry {
                    reason: format!("reading {what}: {}", transport_reason(&e)),
                    after: None,
                });
            }
        }
    }
}

/// A ranged read handed out as its body arrives; see
/// [`RegistryClient::get_blob_range_stream`].
pub struct RangeStream {
    resp: reqwest::Response,
    /// Bytes of the range still to come, of `len`.
    left: u64,
    len: u64,
    what: String,
    url: String,
}

impl RangeStream {
    /// The next piece of the range; `None` once all of it came. A body that ends short,
    /// runs long or breaks is an error.
    pub async fn next_piece(&mut self) -> Result<Option<Bytes>, RegistryError> {
        if self.left == 0 {
            return Ok(None);
        }
        let size_error = |actual| RegistryError::SizeMismatch {
            what: self.what.clone(),
            expected: self.len,
            actual,
        };
        match self.resp.chunk().await {
            Ok(Some(c)) if c.len() as u64 > self.left => {
                Err(size_error(self.len - self.left + c.len() as u64))
            }
            Ok(Some(c)) => {
                self.left -= c.len() as u64;
                Ok(Some(c))
            }
            Ok(None) => Err(size_error(self.len - self.left)),
            Err(e) => Err(RegistryError::Transport {
                op: "GET blob range".into(),
                url: self.url.clone(),
                message: format!(
                    "reading the body of {}: {}",
                    self.what,
                    transport_reason(&e)
                ),
            }),
        }
    }
}

/// A streamed blob read; see [`RegistryClient::blob_stream`].
pub struct BlobStream {
    client: RegistryClient,
    repo: Repository,
    digest: String,
    expected_size: Option<u64>,
    url: String,
    retrier: Retrier,
    pos: u64,
    hasher: Sha256,
    resp: Option<reqwest::Response>,
    /// A chunk held back until we know whether the stream ends after it (so a corrupt
    /// blob's last bytes never reach the consumer before the digest check).
    pending: Option<Bytes>,
    /// New bytes left over from skipping on a resumed response without range support.
    carry: Option<Bytes>,
    /// Position at the last failure (see the retry budget reset in `raw_chunk`).
    progress_mark: u64,
    done: bool,
}

impl BlobStream {
    /// Bytes read so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// The next chunk; `None` at the end (after the digest matched).
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, RegistryError> {
        loop {
            if self.done {
                return Ok(None);
            }
            match self.raw_chunk().await? {
                Some(c) => {
                    if let Some(prev) = self.pending.replace(c) {
                        return Ok(Some(prev));
                    }
                }
                None => {
                    self.finish()?;
                    self.done = true;
                    return Ok(self.pending.take());
                }
            }
        }
    }

    pub(super) fn finish(&mut self) -> Result<(), RegistryError> {
        let what = format!("blob {}@{}", self.repo, self.digest);
        if let Some(exp) = self.expected_size
            && exp != self.pos
        {
            return Err(RegistryError::SizeMismatch {
                what,
                expected: exp,
                actual: self.pos,
            });
        }
        let actual = format!(
            "sha256:{}",
            hex::encode(std::mem::take(&mut self.hasher).finalize())
        );
        if actual != self.digest {
            return Err(RegistryError::DigestMismatch {
                what,
                expected: self.digest.clone(),
                actual,
            });
        }
        Ok(())
    }

    pub(super) async fn raw_chunk(&mut self) -> Result<Option<Bytes>, RegistryError> {
        loop {
            if self.resp.is_none() {
                self.open().await?;
            }
            let next = match self.carry.take() {
                Some(c) => Ok(Some(c)),
                None => match self.resp.as_mut() {
                    Some(resp) => resp.chunk().await,
                    None => continue,
                },
            };
            match next {
                Ok(Some(c)) => {
                    let new_pos = self.pos + c.len() as u64;
                    if let Some(exp) = self.expected_size
                        && new_pos > exp
                    {
                        return Err(RegistryError::SizeMismatch {
                            what: format!("blob {}@{}", self.repo, self.digest),
                            expected: exp,
                            actual: new_pos,
                        });
                    }
                    self.hasher.update(&c);
                    self.pos = new_pos;
                    return Ok(Some(c));
                }
                Ok(None) => {
                    self.resp = None;
                    return Ok(None);
                }
                Err(e) => {
                    self.resp = None;
                    if self.pos > self.progress_mark {
                        // Progress since the last failure: a long download over a flaky
                        // link gets a fresh budget instead of dying on its Nth reset.
                        self.progress_mark = self.pos;
                        self.retrier.attempts = 0;
                        self.retrier.start = Instant::now();
                    }
                    let reason = format!(
                        "stream broke at byte {}: {}",
                        self.pos,
                        transport_reason(&e)
                    );
                    self.retrier
                        .on(Failure::Retry {
                            reason,
                            after: None,
                        })
                        .await?;
                }
            }
        }
    }

    /// Opens (or reopens from `pos`) the response.
    pub(super) async fn open(&mut self) -> Result<(), RegistryError> {
        let url = self.url.clone();
        let range = format!("bytes={}-", self.pos);
        let resume = self.pos > 0;
        let build = |c: &reqwest::Client| {
            let r = c.get(&url);
            if resume {
                r.header(header::RANGE, &range)
            } else {
                r
            }
        };
        loop {
            match self
                .client
                .send_once("GET blob (stream)", &self.repo, false, &url, &[], &build)
                .await
            {
                Ok(mut resp) => {
                    if resume && resp.status() != StatusCode::PARTIAL_CONTENT {
                        // No range support: skip what we already have.
                        let mut skip = self.pos;
                        while skip > 0 {
                            match resp.chunk().await {
                                Ok(Some(c)) if (c.len() as u64) <= skip => skip -= c.len() as u64,
                                Ok(Some(c)) => {
                                    // The rest of this chunk is new data.
                                    self.carry = Some(c.slice(skip as usize..));
                                    skip = 0;
                                }
                                Ok(None) => break,
                                Err(e) => {
                                    self.retrier
                                        .on(Failure::Retry {
                                            reason: transport_reason(&e),
                                            after: None,
                                        })
                                        .await?;
                                    return Box::pin(self.open()).await;
                                }
                            }
                        }
                    }
                    self.resp = Some(resp);
                    return Ok(());
                }
                Err(f) => self.retrier.on(f).await?,
            }
        }
    }
}

/// `RangeSource` over a registry blob (ranged GETs with retries).
#[derive(Clone)]
pub struct RegistryBlobSource {
    client: RegistryClient,
    repo: Repository,
    digest: String,
    size: u64,
}

impl RegistryBlobSource {
    /// Opens `[offset, offset+len)` for reading as it arrives (see [`RangeStream`]).
    pub async fn stream_range(&self, offset: u64, len: u64) -> Result<RangeStream, SourceError> {
        crate::source::check_range(offset, len, self.size)?;
        self.client
            .get_blob_range_stream(&self.repo, &self.digest, offset, len)
            .await
            .map_err(|e| SourceError::Remote(e.to_string()))
    }
}

impl RangeSource for RegistryBlobSource {
    fn read_range(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Bytes, SourceError>> {
        Box::pin(async move {
            crate::source::check_range(offset, len, self.size)?;
            self.client
                .get_blob_range(&self.repo, &self.digest, offset, len)
                .await
                .map_err(|e| SourceError::Remote(e.to_string()))
        })
    }
}
