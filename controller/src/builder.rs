//! Building an image's artifacts, behind a small trait so the image reconciler does not depend
//! on how the artifact crate builds; the real implementation ([`RegistryBuilder`]) calls
//! `talaria_artifact::build`. Also the mapping of the API's profile and knobs to the artifact
//! crate's, which names what gets built (the acceleration key).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use talaria_api::{ArtifactRef, Profile};
use talaria_artifact::build::{
    BuildError, BuildOptions, BuildSummary, DEFAULT_HOT_SPAN_SIZE, Recorded, Reuse, build,
};
use talaria_artifact::format::{self, Knobs};
use talaria_artifact::oci::Platform;
use talaria_artifact::oci::registry::credentials::Credentials;
use talaria_artifact::oci::store::Store;
use talaria_artifact::signature::{self, SignatureError, SigningKey};
use talaria_artifact::source::BoxFuture;
use talaria_artifact::startup::StartupTrace;

use crate::clients::{ClientError, Clients, store_reason};

/// The artifact knobs of a policy (schema fields absent → the artifact crate's defaults).
pub fn knobs(k: &talaria_api::Knobs) -> Knobs {
    let d = Knobs::default();
    Knobs {
        span_size: k.span_size.unwrap_or(d.span_size),
        prefetch_budget: k.prefetch_budget.unwrap_or(d.prefetch_budget),
        skip_threshold: k.skip_layers_smaller_than.unwrap_or(d.skip_threshold),
    }
}

pub fn profile(p: Profile) -> format::Profile {
    match p {
        Profile::StartupLocalV1 => format::Profile::StartupLocalV1,
        Profile::Default => format::Profile::Default,
    }
}

/// The acceleration key of a policy's profile and knobs.
pub fn acceleration_key(p: Profile, k: &talaria_api::Knobs) -> String {
    format::acceleration_key(profile(p), &knobs(k))
}

/// What to build: one image manifest (by digest) for one platform and key.
#[derive(Clone, Debug)]
pub struct BuildRequest {
    /// `registry/repository` of the image.
    pub image: String,
    pub digest: String,
    pub platform: String,
    pub profile: Profile,
    pub knobs: talaria_api::Knobs,
    /// `registry/repository` for the artifacts, when not the image's.
    pub artifact_repository: Option<String>,
    pub credentials: Credentials,
    /// Build the recorded plan of merged starts instead (the image is Ready: its default
    /// artifact stays, and lends the recorded build its indexes).
    pub recorded: Option<Arc<RecordedInput>>,
}

/// What a recorded build plans from.
#[derive(Clone, Debug)]
pub struct RecordedInput {
    /// The merged starts.
    pub trace: StartupTrace,
    /// `recording.maxBytes`.
    pub budget: u64,
    /// The image's default artifact (ours: pinned by the controller).
    pub default_artifact: ArtifactRef,
    /// Stamped `created`, so the recorded artifact ranks above the predicted one among the
    /// referrers.
    pub created: String,
}

/// A finished (or adopted) build.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BuildOutcome {
    pub artifact: ArtifactRef,
    pub default_artifact: Option<ArtifactRef>,
    pub layers_indexed: u32,
    pub layers_skipped: u32,
    pub startup_paths: u32,
    pub startup_bytes: u64,
    /// Uncompressed bytes indexed by this build (0 when adopted).
    pub bytes_indexed: u64,
    /// Every artifact already existed.
    pub adopted: bool,
}

/// Why a build failed; its message becomes the image's `lastError`.
#[derive(Debug, thiserror::Error)]
pub enum BuilderError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("invalid platform {0:?}")]
    InvalidPlatform(String),
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("build timed out after {0:?}")]
    Timeout(Duration),
    #[error("signing the artifact: {0}")]
    Sign(#[from] SignatureError),
    #[error(
        "artifactRepository {0} is not one the controller may push to (controller.artifactRepositories)"
    )]
    RepositoryNotAllowed(String),
}

impl BuilderError {
    /// Metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            BuilderError::Client(e) => e.reason(),
            BuilderError::InvalidPlatform(_) => "invalid_platform",
            BuilderError::Timeout(_) => "timeout",
            BuilderError::Sign(_) => "sign",
            BuilderError::RepositoryNotAllowed(_) => "repository_not_allowed",
            BuilderError::Build(e) => match e {
                BuildError::Store(e) => store_reason(e),
                BuildError::Artifact(_) => "artifact",
                BuildError::NoPlatform { .. } => "no_platform",
                BuildError::BadImage { .. } => "bad_image",
                BuildError::Index { .. } | BuildError::LayerDigestMismatch { .. } => "bad_layer",
            },
        }
    }
}

/// Builds (or adopts) the artifacts of one image.
pub trait ArtifactBuilder: Send + Sync {
    fn build<'a>(
        &'a self,
        req: &'a BuildRequest,
    ) -> BoxFuture<'a, Result<BuildOutcome, BuilderError>>;
}

/// The real builder: `talaria_artifact::build::build` into the image's repository (or the
/// policy's artifact repository). For a profile with a plan it also builds the default
/// (indexes-only) artifact, the node's fallback.
pub struct RegistryBuilder {
    clients: Clients,
    parallelism: usize,
    signing_key: Option<Arc<SigningKey>>,
}

impl RegistryBuilder {
    pub fn new(clients: Clients, parallelism: usize) -> RegistryBuilder {
        RegistryBuilder {
            clients,
            parallelism,
            signing_key: None,
        }
    }

    /// Signs every artifact it builds or adopts with `key`.
    pub fn with_signing_key(mut self, key: Option<Arc<SigningKey>>) -> RegistryBuilder {
        self.signing_key = key;
        self
    }

    /// Builds one profile's artifact, adopting or reusing only the artifacts in `reuse`
    /// (ones this build made): never what someone else pushed with the same key.
    async fn build_one(
        &self,
        req: &BuildRequest,
        p: format::Profile,
        reuse: BTreeSet<String>,
        recorded: Option<&RecordedInput>,
    ) -> Result<(BuildSummary, String), BuilderError> {
        let reference = format!("{}@{}", req.image, req.digest);
        let (image_store, _) = self.clients.store(&reference, &req.credentials)?;
        let image_store: Arc<dyn Store> = Arc::new(image_store);
        let (target, target_name): (Option<Arc<dyn Store>>, String) = match &req.artifact_repository
        {
            Some(repo) => {
                let (s, r) = self
                    .clients
                    .store(&format!("{repo}:unused"), &req.credentials)?;
                (Some(Arc::new(s)), r.repository.to_string())
            }
            None => (None, image_store.name()),
        };
        let opts = BuildOptions {
            platform: Platform::parse(&req.platform)
                .ok_or_else(|| BuilderError::InvalidPlatform(req.platform.clone()))?,
            profile: p,
            knobs: knobs(&req.knobs),
            parallelism: self.parallelism,
            created: recorded.map(|r| r.created.clone()),
            recorded: recorded.map(|r| {
                Arc::new(Recorded {
                    trace: r.trace.clone(),
                    hot_span_size: DEFAULT_HOT_SPAN_SIZE,
                    pack: true,
                    budget: Some(r.budget),
                })
            }),
            reuse: Reuse::Only(reuse),
        };
        let artifacts = target.clone().unwrap_or_else(|| image_store.clone());
        let s = build(image_store, &req.digest, target, &opts).await?;
        if let Some(key) = &self.signing_key {
            signature::sign(artifacts.as_ref(), &target_name, &s.artifact, key).await?;
        }
        Ok((s, target_name))
    }
}

fn artifact_ref(repo: &str, s: &BuildSummary) -> ArtifactRef {
    ArtifactRef {
        repository: repo.to_string(),
        digest: s.artifact.digest.clone(),
        size: i64::try_from(s.artifact.size).unwrap_or(i64::MAX),
    }
}

impl ArtifactBuilder for RegistryBuilder {
    fn build<'a>(
        &'a self,
        req: &'a BuildRequest,
    ) -> BoxFuture<'a, Result<BuildOutcome, BuilderError>> {
        Box::pin(async move {
            let p = profile(req.profile);
            if let Some(rec) = &req.recorded {
                // Finer spans where the start read need the default artifact's indexes.
                let ours = BTreeSet::from([rec.default_artifact.digest.clone()]);
                let (s, repo) = self.build_one(req, p, ours, Some(rec)).await?;
                return Ok(outcome(
                    &repo,
                    &s,
                    &[&s],
                    Some(rec.default_artifact.clone()),
                    s.adopted,
                ));
            }
            // Default artifact first, from the image's own layers (an artifact of the key
            // already in the registry is not adopted: it is rebuilt, which yields the same
            // digest when it was honest); its index blobs are shared with the accelerated one.
            let (def, repo) = self
                .build_one(req, format::Profile::Default, BTreeSet::new(), None)
                .await?;
            let (main, adopted) = if p == format::Profile::Default {
                (def.clone(), def.adopted)
            } else {
                let ours = BTreeSet::from([def.artifact.digest.clone()]);
                let (s, _) = self.build_one(req, p, ours, None).await?;
                let adopted = s.adopted && def.adopted;
                (s, adopted)
            };
            Ok(outcome(
                &repo,
                &main,
                &[&def, &main],
                Some(artifact_ref(&repo, &def)),
                adopted,
            ))
        })
    }
}

/// The outcome of a build whose pinned artifact is `main`, having run `builds`.
fn outcome(
    repo: &str,
    main: &BuildSummary,
    builds: &[&BuildSummary],
    default_artifact: Option<ArtifactRef>,
    adopted: bool,
) -> BuildOutcome {
    let indexed = main.layers.iter().filter(|l| l.index.is_some()).count();
    let skipped = main.layers.len() - indexed;
    let bytes: u64 = builds
        .iter()
        .filter(|s| !s.adopted)
        .flat_map(|s| s.layers.iter())
        .map(|l| l.uncompressed_size)
        .sum();
    BuildOutcome {
        artifact: artifact_ref(repo, main),
        default_artifact,
        layers_indexed: u32::try_from(indexed).unwrap_or(u32::MAX),
        layers_skipped: u32::try_from(skipped).unwrap_or(u32::MAX),
        startup_paths: u32::try_from(main.plan_files).unwrap_or(u32::MAX),
        startup_bytes: main.plan_bytes,
        bytes_indexed: bytes,
        adopted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_failures_are_labelled() {
        assert_eq!(
            BuilderError::Timeout(Duration::from_secs(1)).reason(),
            "timeout"
        );
        let layer = BuilderError::from(BuildError::Index {
            layer: "sha256:l".into(),
            message: "truncated".into(),
        });
        assert_eq!(layer.reason(), "bad_layer");
        // The message is the artifact crate's, unchanged: it becomes `lastError`.
        assert_eq!(
            layer.to_string(),
            "layer sha256:l: indexing failed: truncated"
        );
        assert_eq!(
            BuilderError::InvalidPlatform("x".into()).to_string(),
            "invalid platform \"x\""
        );
    }

    #[test]
    fn absent_knobs_take_the_artifact_defaults() {
        let d = Knobs::default();
        let k = knobs(&talaria_api::Knobs::default());
        assert_eq!(
            (k.span_size, k.prefetch_budget, k.skip_threshold),
            (d.span_size, d.prefetch_budget, d.skip_threshold)
        );
        assert_ne!(
            acceleration_key(Profile::Default, &Default::default()),
            acceleration_key(Profile::StartupLocalV1, &Default::default())
        );
    }
}
