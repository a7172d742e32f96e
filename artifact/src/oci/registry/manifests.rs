//! Manifests: get (checked against the digest asked for), head, put.

use super::RegistryClient;
use super::RegistryError;
use super::Repository;
use super::transport::Failure;
use super::transport::read_limited;
use crate::oci;
use crate::oci::Descriptor;
use crate::oci::MANIFEST_ACCEPT;
use crate::oci::MAX_MANIFEST_BYTES;
use crate::oci::RawManifest;
use reqwest::StatusCode;
use reqwest::header;
use tracing::debug;

impl RegistryClient {
    /// Pulls a manifest by tag or digest. The bytes are checked against the digest asked
    /// for, or the registry's `Docker-Content-Digest` when pulling by tag.
    pub async fn get_manifest(
        &self,
        repo: &Repository,
        reference: &str,
    ) -> Result<RawManifest, RegistryError> {
        let url = self.url(repo, &format!("manifests/{reference}"));
        let accept = MANIFEST_ACCEPT.join(", ");
        let build = |c: &reqwest::Client| c.get(&url).header(header::ACCEPT, &accept);
        let (url, build) = (&url, &build);
        self.with_retries("GET manifest", url, move || async move {
            let resp = self
                .send_once("GET manifest", repo, false, url, &[], &build)
                .await?;
            let ctype = resp
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(|s| s.split(';').next().unwrap_or(s).trim().to_string());
            let header_digest = resp
                .headers()
                .get("docker-content-digest")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let what = format!("manifest {repo}:{reference}");
            let bytes = read_limited(resp, MAX_MANIFEST_BYTES, &what).await?;
            let raw = RawManifest::new(bytes, ctype.as_deref());
            let expected = if reference.starts_with("sha256:") {
                Some(reference.to_string())
            } else {
                header_digest.filter(|d| d.starts_with("sha256:"))
            };
            if let Some(exp) = expected
                && exp != raw.digest
            {
                return Err(Failure::Fatal(RegistryError::DigestMismatch {
                    what,
                    expected: exp,
                    actual: raw.digest,
                }));
            }
            debug!(%repo, reference, digest = %raw.digest, media_type = %raw.media_type, "pulled manifest");
            Ok(raw)
        })
        .await
    }

    /// HEAD of a manifest: its descriptor, or `None` when unknown.
    pub async fn head_manifest(
        &self,
        repo: &Repository,
        reference: &str,
    ) -> Result<Option<Descriptor>, RegistryError> {
        let url = self.url(repo, &format!("manifests/{reference}"));
        let accept = MANIFEST_ACCEPT.join(", ");
        let build = |c: &reqwest::Client| c.head(&url).header(header::ACCEPT, &accept);
        let (url, build) = (&url, &build);
        let resp = self
            .with_retries("HEAD manifest", url, move || async move {
                self.send_once(
                    "HEAD manifest",
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
        let h = resp.headers();
        let digest = h
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let size = h
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let ctype = h
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or(oci::OCI_MANIFEST);
        match (digest, size) {
            (Some(d), Some(s)) => Ok(Some(Descriptor::new(ctype, d, s))),
            // Without the headers, fall back to a GET that computes them.
            _ => Ok(Some(self.get_manifest(repo, reference).await?.descriptor())),
        }
    }

    /// Pushes a manifest under a tag or its digest. Returns its digest and whether the
    /// registry declared support for the referrers API (`OCI-Subject` header).
    pub async fn put_manifest(
        &self,
        repo: &Repository,
        reference: &str,
        raw: &RawManifest,
    ) -> Result<(String, bool), RegistryError> {
        let url = self.url(repo, &format!("manifests/{reference}"));
        let body = raw.bytes.clone();
        let build = |c: &reqwest::Client| {
            c.put(&url)
                .header(header::CONTENT_TYPE, &raw.media_type)
                .body(body.clone())
        };
        let (url, build) = (&url, &build);
        self.with_retries("PUT manifest", url, move || async move {
            match self
                .send_once("PUT manifest", repo, true, url, &[], &build)
                .await
            {
                Ok(resp) => {
                    let subject_ok = resp.headers().contains_key("oci-subject");
                    debug!(%repo, reference, digest = %raw.digest, "pushed manifest");
                    Ok((raw.digest.clone(), subject_ok))
                }
                // Distribution briefly loses sight of a blob or manifest while another
                // client writes the same one; what we reference was pushed before, so a
                // bounded retry resolves it (and a truly missing one still fails).
                Err(Failure::Fatal(RegistryError::Status {
                    status: 400,
                    message,
                    ..
                })) if message.contains("MANIFEST_BLOB_UNKNOWN") => Err(Failure::Retry {
                    reason: format!("HTTP 400: {message}"),
                    after: None,
                }),
                Err(f) => Err(f),
            }
        })
        .await
    }
}
