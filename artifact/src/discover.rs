//! Finding an image's artifacts in a store and loading their blobs: referrers listed and
//! parsed ([`crate::format`]), ranked, and the chosen artifact's indexes read back.

use std::sync::Arc;

use crate::format::{
    ARTIFACT_TYPE, ArtifactError, ArtifactInfo, MAX_INDEX_BLOB, parse_artifact, rank,
};
use crate::index::WINDOWS_MEDIA_TYPE;
use crate::oci::Descriptor;
use crate::oci::store::{Store, StoreError};

/// Referrer manifests fetched at once.
const REFERRER_FETCHES: usize = 4;
/// Most Talaria referrers of one image looked at (an image has two or three).
pub const MAX_REFERRERS: usize = 64;

/// Lists the Talaria artifacts referring to an image manifest (unparseable or foreign
/// referrers are skipped with a debug log).
pub async fn list_artifacts(
    store: &dyn Store,
    subject_digest: &str,
) -> Result<Vec<ArtifactInfo>, ArtifactError> {
    use futures::StreamExt;
    let refs: Vec<Descriptor> = store
        .referrers(subject_digest)
        .await?
        .into_iter()
        .filter(|d| {
            d.artifact_type
                .as_deref()
                .is_none_or(|t| t == ARTIFACT_TYPE)
        })
        // A flood of referrers (anyone who can push may add them) costs a round trip each:
        // only the first few are looked at.
        .take(MAX_REFERRERS)
        .collect();
    // A few at once: an image has its default and accelerated artifacts (and a recorded
    // one), and each manifest is a round trip on a node's startup path.
    let fetches: Vec<_> = refs.iter().map(|d| store.get_manifest(&d.digest)).collect();
    let fetched: Vec<_> = futures::stream::iter(fetches)
        .buffered(REFERRER_FETCHES)
        .collect()
        .await;
    let mut out = Vec::new();
    let mut first_error = None;
    let mut read = 0usize;
    for (d, got) in refs.iter().zip(fetched) {
        let raw = match got {
            Ok(r) => r,
            Err(e) if e.is_not_found() => {
                tracing::debug!(digest = %d.digest, "referrer listed but missing");
                continue;
            }
            // One bad referrer (too large, unreadable) is skipped, not the image's others;
            // when none could be read, the first failure is the answer.
            Err(e) => {
                tracing::debug!(digest = %d.digest, error = %e, "skipping referrer");
                first_error.get_or_insert(e);
                continue;
            }
        };
        read += 1;
        match parse_artifact(&raw) {
            Ok(a) if a.subject.digest == subject_digest => out.push(a),
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "skipping referrer"),
        }
    }
    match first_error {
        Some(e) if read == 0 => Err(e.into()),
        _ => Ok(out),
    }
}

/// Resolves the best artifact for an image manifest: accelerated → default → none.
pub async fn resolve(
    store: &dyn Store,
    subject_digest: &str,
) -> Result<Option<ArtifactInfo>, ArtifactError> {
    Ok(rank(list_artifacts(store, subject_digest).await?)
        .into_iter()
        .next())
}

/// The artifact of one acceleration key, if one exists (newest first).
pub async fn find_by_key(
    store: &dyn Store,
    subject_digest: &str,
    key: &str,
) -> Result<Option<ArtifactInfo>, ArtifactError> {
    Ok(pick_by_key(
        list_artifacts(store, subject_digest).await?,
        key,
    ))
}

/// Among `artifacts`, the one of acceleration key `key` a build adopts: a recorded plan
/// first (it replaces the predicted one of its key even when both carry the same second in
/// `created`), then the newest, then the smallest digest.
pub fn pick_by_key(artifacts: Vec<ArtifactInfo>, key: &str) -> Option<ArtifactInfo> {
    artifacts
        .into_iter()
        .filter(|a| a.key == key)
        .min_by(|a, b| {
            b.plan_recorded
                .cmp(&a.plan_recorded)
                .then_with(|| b.created.cmp(&a.created))
                .then_with(|| a.descriptor.digest.cmp(&b.descriptor.digest))
        })
}

/// The artifacts among `digests` that refer to `subject_digest`, fetched by digest (no
/// referrer listing: only what the caller names is looked at). Missing ones are skipped.
pub async fn load_artifacts(
    store: &dyn Store,
    subject_digest: &str,
    digests: impl IntoIterator<Item = &str>,
) -> Result<Vec<ArtifactInfo>, ArtifactError> {
    let mut out = Vec::new();
    for d in digests {
        let raw = match store.get_manifest(d).await {
            Ok(r) => r,
            Err(e) if e.is_not_found() => continue,
            Err(e) => return Err(e.into()),
        };
        let a = parse_artifact(&raw)?;
        if a.subject.digest == subject_digest {
            out.push(a);
        }
    }
    Ok(out)
}

/// Loads and decodes one layer index blob of an artifact.
pub async fn load_index(
    store: &dyn Store,
    index: &Descriptor,
) -> Result<crate::index::LayerIndex, ArtifactError> {
    let bytes = store.get_blob(&index.digest, MAX_INDEX_BLOB).await?;
    crate::index::LayerIndex::decode(&bytes).map_err(|e| ArtifactError::Invalid {
        digest: index.digest.clone(),
        message: format!("layer index does not decode: {e}"),
    })
}

/// A reader of one layer through its index: compressed bytes from `layer`, and a version 2
/// index's windows (read as spans need them) from `artifacts`, where the artifact's blobs are.
pub fn layer_reader(
    index: Arc<crate::index::LayerIndex>,
    layer: Arc<dyn crate::source::RangeSource>,
    artifacts: &dyn Store,
    cache: Arc<dyn crate::index::reader::SpanCache>,
) -> Result<crate::index::reader::LayerReader, StoreError> {
    let windows = index.windows;
    let reader = crate::index::reader::LayerReader::new(index, layer, cache);
    Ok(match windows {
        None => reader,
        Some(w) => reader.with_windows(artifacts.range_source(&Descriptor::new(
            WINDOWS_MEDIA_TYPE,
            w.digest_string(),
            w.size,
        ))?),
    })
}

/// `ix` with its windows inline: a version 2 index's windows blob is fetched from `store`
/// and checked against the digest the index records.
pub async fn inline_windows(
    store: &dyn Store,
    ix: crate::index::LayerIndex,
) -> Result<crate::index::LayerIndex, ArtifactError> {
    let Some(w) = ix.windows else {
        return Ok(ix);
    };
    let blob = store.get_blob(&w.digest_string(), MAX_INDEX_BLOB).await?;
    ix.with_windows(&blob).map_err(|e| ArtifactError::Invalid {
        digest: w.digest_string(),
        message: format!("windows blob: {e}"),
    })
}
