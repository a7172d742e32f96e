//! Referrers: the referrers API, with the tag schema as fallback.

use super::RegistryClient;
use super::RegistryError;
use super::Repository;
use super::transport::read_limited;
use crate::oci;
use crate::oci::Descriptor;
use crate::oci::FormatError;
use crate::oci::ImageIndex;
use crate::oci::MAX_MANIFEST_BYTES;
use crate::oci::Manifest;
use crate::oci::RawManifest;
use bytes::Bytes;
use reqwest::StatusCode;
use reqwest::header;
use std::time::Duration;

impl RegistryClient {
    /// Referrers of a subject by the OCI 1.1 referrers API. `Ok(None)` when the registry
    /// has no such API (404), so the caller falls back to the tag schema.
    pub async fn referrers_api(
        &self,
        repo: &Repository,
        subject_digest: &str,
    ) -> Result<Option<Vec<Descriptor>>, RegistryError> {
        oci::digest_hex(subject_digest)?;
        let url = self.url(repo, &format!("referrers/{subject_digest}"));
        let build = |c: &reqwest::Client| c.get(&url).header(header::ACCEPT, oci::OCI_INDEX);
        let (url, build) = (&url, &build);
        self.with_retries("GET referrers", url, move || async move {
            let resp = self
                .send_once(
                    "GET referrers",
                    repo,
                    false,
                    url,
                    &[StatusCode::NOT_FOUND],
                    &build,
                )
                .await?;
            if resp.status() == StatusCode::NOT_FOUND {
                return Ok(None);
            }
            let is_index = resp
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with(oci::OCI_INDEX));
            let what = format!("referrers of {repo}@{subject_digest}");
            let body = read_limited(resp, MAX_MANIFEST_BYTES, &what).await?;
            if !is_index {
                // Some registries answer unknown routes with 200 and a page: no API.
                return Ok(None);
            }
            // Pagination (`Link` header) is not followed: one page holds far more
            // referrers than one image has artifacts in practice.
            let idx: ImageIndex = serde_json::from_slice(&body).map_err(|source| {
                RegistryError::from(FormatError::Json {
                    digest: what.clone(),
                    media_type: oci::OCI_INDEX.into(),
                    source,
                })
            })?;
            Ok(Some(idx.manifests))
        })
        .await
    }

    /// Referrers from the tag schema (`sha256-<hex>` index); empty when the tag is absent.
    pub async fn referrers_tag(
        &self,
        repo: &Repository,
        subject_digest: &str,
    ) -> Result<(Vec<Descriptor>, Option<RawManifest>), RegistryError> {
        let tag = oci::referrers_tag(subject_digest)?;
        match self.get_manifest(repo, &tag).await {
            Ok(raw) => match raw.parse()? {
                Manifest::Index(i) => Ok((i.manifests, Some(raw))),
                Manifest::Image(_) => Ok((Vec::new(), Some(raw))),
            },
            Err(e) if e.is_not_found() => Ok((Vec::new(), None)),
            Err(e) => Err(e),
        }
    }

    /// Referrers of a subject: the API when the registry has it, else the tag schema.
    pub async fn referrers(
        &self,
        repo: &Repository,
        subject_digest: &str,
    ) -> Result<Vec<Descriptor>, RegistryError> {
        Ok(self.referrers_probing(repo, subject_digest).await?.0)
    }

    /// [`Self::referrers`], also saying whether the registry has the API.
    pub async fn referrers_probing(
        &self,
        repo: &Repository,
        subject_digest: &str,
    ) -> Result<(Vec<Descriptor>, bool), RegistryError> {
        // Both at once: on a registry without the API the tag is the answer, and asking in
        // turn would put one more round trip on a node's startup path.
        let (api, tag) = futures::join!(
            self.referrers_api(repo, subject_digest),
            self.referrers_tag(repo, subject_digest)
        );
        if let Some(list) = api? {
            return Ok((list, true));
        }
        Ok((tag?.0, false))
    }

    /// Adds a referrer to the subject's tag-schema index (read-modify-write). Two writers
    /// racing can overwrite each other, so after writing we re-read (after a short random
    /// pause that lets a racing write land) and write again when our descriptor is missing;
    /// bounded.
    pub async fn add_referrer_tag(
        &self,
        repo: &Repository,
        subject_digest: &str,
        referrer: &Descriptor,
    ) -> Result<(), RegistryError> {
        let tag = oci::referrers_tag(subject_digest)?;
        const ROUNDS: u32 = 8;
        for round in 0..ROUNDS {
            let (mut list, _) = self.referrers_tag(repo, subject_digest).await?;
            if round > 0 && list.iter().any(|d| d.digest == referrer.digest) {
                return Ok(());
            }
            list.retain(|d| d.digest != referrer.digest);
            list.push(referrer.clone());
            // Stable order: identical inputs give identical index bytes.
            list.sort_by(|a, b| a.digest.cmp(&b.digest));
            let idx = ImageIndex::new_oci(list);
            let bytes = serde_json::to_vec(&idx).map_err(|source| FormatError::Json {
                digest: tag.clone(),
                media_type: oci::OCI_INDEX.into(),
                source,
            })?;
            let raw = RawManifest::new(Bytes::from(bytes), Some(oci::OCI_INDEX));
            self.put_manifest(repo, &tag, &raw).await?;
            let pause = Duration::from_millis(30 + fastrand::u64(0..120) * (round as u64 + 1));
            tokio::time::sleep(pause).await;
        }
        // Check one last time after the final write.
        let (list, _) = self.referrers_tag(repo, subject_digest).await?;
        if list.iter().any(|d| d.digest == referrer.digest) {
            return Ok(());
        }
        Err(RegistryError::Transport {
            op: "update referrers tag".into(),
            url: format!("{repo}:{tag}"),
            message: format!(
                "{} still missing after {ROUNDS} rounds of concurrent updates",
                referrer.digest
            ),
        })
    }
}
