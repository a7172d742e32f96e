//! What the controller needs from registries: resolving references to per-platform manifest
//! digests, and building artifacts. Both sit behind small traits so the reconcilers do not
//! depend on how the artifact crate does it; the real implementations call `talaria-artifact`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use talaria_api::{ArtifactRef, Profile};
use talaria_artifact::artifact::{self, Knobs};
use talaria_artifact::auth::{Credential, Credentials};
use talaria_artifact::build::{BuildOptions, BuildSummary, build};
use talaria_artifact::registry::{ImageRef, RegistryClient, RegistryConfig};
use talaria_artifact::source::BoxFuture;
use talaria_artifact::store::oci::{Manifest, Platform};
use talaria_artifact::store::{RegistryStore, Store};

use crate::metrics::Metrics;

/// Largest image config we read to learn a single-platform image's platform.
const MAX_CONFIG_BYTES: u64 = 4 << 20;

/// The artifact knobs of a policy (schema fields absent → the artifact crate's defaults).
pub fn knobs(k: &talaria_api::Knobs) -> Knobs {
    let d = Knobs::default();
    Knobs {
        span_size: k.span_size.unwrap_or(d.span_size),
        prefetch_budget: k.prefetch_budget.unwrap_or(d.prefetch_budget),
        skip_threshold: k.skip_layers_smaller_than.unwrap_or(d.skip_threshold),
    }
}

pub fn profile(p: Profile) -> artifact::Profile {
    match p {
        Profile::StartupLocalV1 => artifact::Profile::StartupLocalV1,
        Profile::Default => artifact::Profile::Default,
    }
}

/// The acceleration key of a policy's profile and knobs.
pub fn acceleration_key(p: Profile, k: &talaria_api::Knobs) -> String {
    artifact::acceleration_key(profile(p), &knobs(k))
}

/// One platform's image manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    pub platform: String,
    pub digest: String,
}

/// Resolution of a reference: the wanted platforms found, and the ones the image lacks.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Resolution {
    pub found: Vec<Resolved>,
    pub missing: Vec<String>,
}

/// Resolves image references to per-platform manifest digests.
pub trait Resolver: Send + Sync {
    /// `reference` is a full registry reference (`registry/repo:tag` or `@digest`).
    fn resolve<'a>(
        &'a self,
        reference: &'a str,
        platforms: &'a [String],
        credentials: &'a Credentials,
    ) -> BoxFuture<'a, Result<Resolution, String>>;
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

/// Builds (or adopts) the artifacts of one image.
pub trait ArtifactBuilder: Send + Sync {
    fn build<'a>(&'a self, req: &'a BuildRequest) -> BoxFuture<'a, Result<BuildOutcome, String>>;
}

/// Registry clients by credentials: the anonymous one is shared; a client with credentials is
/// made per call (cheap next to a build, and it never mixes one policy's secrets into another's).
#[derive(Clone)]
pub struct Clients {
    base: RegistryConfig,
    anonymous: RegistryClient,
    metrics: Arc<Metrics>,
}

impl Clients {
    pub fn new(base: RegistryConfig, metrics: Arc<Metrics>) -> Result<Clients, String> {
        let anonymous = RegistryClient::new(base.clone()).map_err(|e| e.to_string())?;
        Ok(Clients {
            base,
            anonymous,
            metrics,
        })
    }

    fn client(&self, creds: &Credentials) -> Result<RegistryClient, String> {
        if creds.is_empty() {
            return Ok(self.anonymous.clone());
        }
        let mut cfg = self.base.clone();
        cfg.credentials.merge(creds.clone());
        RegistryClient::new(cfg).map_err(|e| e.to_string())
    }

    fn store(
        &self,
        reference: &str,
        creds: &Credentials,
    ) -> Result<(RegistryStore, ImageRef), String> {
        let r = ImageRef::parse(reference).map_err(|e| e.to_string())?;
        let client = self.client(creds)?;
        Ok((RegistryStore::new(client, r.repository.clone()), r))
    }
}

/// (reference, platforms, fingerprint of the credentials for the reference's host): what one
/// set of credentials could resolve is never served to a caller with other credentials.
type CacheKey = (String, Vec<String>, String);

/// A SHA-256 of the credential `creds` hold for `reference`'s registry (the secret itself is
/// never kept in the cache).
fn credential_fingerprint(reference: &str, creds: &Credentials) -> String {
    use sha2::{Digest as _, Sha256};
    let host = reference.split('/').next().unwrap_or(reference);
    let text = match creds.get(host) {
        Credential::Anonymous => return String::new(),
        Credential::Basic { username, password } => format!("basic\0{username}\0{password}"),
        Credential::Bearer(t) => format!("bearer\0{t}"),
    };
    hex::encode(Sha256::digest(text.as_bytes()))
}
/// When resolved, and the outcome.
type Cached = (Instant, Result<Resolution, String>);

/// The real resolver: registry manifests, with a time-bounded cache so that reconciles of many
/// pods with one image cost one registry request per TTL.
pub struct RegistryResolver {
    clients: Clients,
    ttl_ok: Duration,
    ttl_err: Duration,
    max_entries: usize,
    cache: Mutex<HashMap<CacheKey, Cached>>,
}

impl RegistryResolver {
    pub fn new(clients: Clients, ttl_ok: Duration, ttl_err: Duration) -> RegistryResolver {
        RegistryResolver {
            clients,
            ttl_ok,
            ttl_err,
            max_entries: 50_000,
            cache: Mutex::new(HashMap::new()),
        }
    }

    fn cached(&self, key: &CacheKey) -> Option<Result<Resolution, String>> {
        let map = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let (at, r) = map.get(key)?;
        let ttl = if r.is_ok() { self.ttl_ok } else { self.ttl_err };
        (at.elapsed() < ttl).then(|| r.clone())
    }

    fn remember(&self, key: CacheKey, r: &Result<Resolution, String>) {
        let mut map = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= self.max_entries {
            let (ok, err) = (self.ttl_ok, self.ttl_err);
            map.retain(|_, (at, r)| at.elapsed() < if r.is_ok() { ok } else { err });
            if map.len() >= self.max_entries {
                map.clear();
            }
        }
        map.insert(key, (Instant::now(), r.clone()));
    }

    async fn resolve_uncached(
        &self,
        reference: &str,
        platforms: &[String],
        creds: &Credentials,
    ) -> Result<Resolution, String> {
        let (store, r) = self.clients.store(reference, creds)?;
        let raw = store.get_manifest(&r.reference()).await.map_err(|e| {
            self.clients.metrics.registry_request("manifest", "error");
            e.to_string()
        })?;
        self.clients.metrics.registry_request("manifest", "ok");
        let mut out = Resolution::default();
        match raw.parse().map_err(|e| e.to_string())? {
            Manifest::Index(idx) => {
                for want in platforms {
                    let Some(wp) = Platform::parse(want) else {
                        out.missing.push(want.clone());
                        continue;
                    };
                    match idx.manifests.iter().find(|d| {
                        !d.is_index() && d.platform.as_ref().is_some_and(|p| wp.matches(p))
                    }) {
                        Some(d) => out.found.push(Resolved {
                            platform: want.clone(),
                            digest: d.digest.clone(),
                        }),
                        None => out.missing.push(want.clone()),
                    }
                }
            }
            Manifest::Image(m) => {
                // A single-platform image: its config says which platform it is.
                #[derive(serde::Deserialize)]
                struct Cfg {
                    #[serde(default)]
                    os: String,
                    #[serde(default)]
                    architecture: String,
                    #[serde(default)]
                    variant: Option<String>,
                }
                let bytes = store
                    .get_blob(&m.config.digest, MAX_CONFIG_BYTES)
                    .await
                    .map_err(|e| format!("reading the image config: {e}"))?;
                let cfg: Cfg = serde_json::from_slice(&bytes)
                    .map_err(|e| format!("image config {}: {e}", m.config.digest))?;
                let actual = Platform {
                    os: cfg.os,
                    architecture: cfg.architecture,
                    os_version: None,
                    variant: cfg.variant,
                };
                for want in platforms {
                    match Platform::parse(want) {
                        Some(wp) if wp.matches(&actual) => out.found.push(Resolved {
                            platform: want.clone(),
                            digest: raw.digest.clone(),
                        }),
                        _ => out.missing.push(want.clone()),
                    }
                }
                if out.found.is_empty() {
                    return Err(format!(
                        "image is {actual} only; the policy wants {}",
                        platforms.join(", ")
                    ));
                }
            }
        }
        if out.found.is_empty() {
            return Err(format!(
                "no manifest for platform(s) {}",
                out.missing.join(", ")
            ));
        }
        Ok(out)
    }
}

impl Resolver for RegistryResolver {
    fn resolve<'a>(
        &'a self,
        reference: &'a str,
        platforms: &'a [String],
        credentials: &'a Credentials,
    ) -> BoxFuture<'a, Result<Resolution, String>> {
        Box::pin(async move {
            let key = (
                reference.to_string(),
                platforms.to_vec(),
                credential_fingerprint(reference, credentials),
            );
            if let Some(r) = self.cached(&key) {
                return r;
            }
            let r = self
                .resolve_uncached(reference, platforms, credentials)
                .await;
            self.remember(key, &r);
            r
        })
    }
}

/// The real builder: `talaria_artifact::build::build` into the image's repository (or the
/// policy's artifact repository). For a profile with a plan it also builds the default
/// (indexes-only) artifact, the node's fallback.
pub struct RegistryBuilder {
    clients: Clients,
    parallelism: usize,
}

impl RegistryBuilder {
    pub fn new(clients: Clients, parallelism: usize) -> RegistryBuilder {
        RegistryBuilder {
            clients,
            parallelism,
        }
    }

    async fn build_one(
        &self,
        req: &BuildRequest,
        p: artifact::Profile,
    ) -> Result<(BuildSummary, String), String> {
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
                .ok_or_else(|| format!("invalid platform {:?}", req.platform))?,
            profile: p,
            knobs: knobs(&req.knobs),
            parallelism: self.parallelism,
            created: None,
            recorded: None,
        };
        let s = build(image_store, &req.digest, target, &opts)
            .await
            .map_err(|e| e.to_string())?;
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
    fn build<'a>(&'a self, req: &'a BuildRequest) -> BoxFuture<'a, Result<BuildOutcome, String>> {
        Box::pin(async move {
            let p = profile(req.profile);
            // Default artifact first: its index blobs are shared with the accelerated one.
            let (def, repo) = self.build_one(req, artifact::Profile::Default).await?;
            let (main, adopted) = if p == artifact::Profile::Default {
                (def.clone(), def.adopted)
            } else {
                let (s, _) = self.build_one(req, p).await?;
                let adopted = s.adopted && def.adopted;
                (s, adopted)
            };
            let indexed = main.layers.iter().filter(|l| l.index.is_some()).count();
            let skipped = main.layers.len() - indexed;
            let bytes: u64 = [&def, &main]
                .iter()
                .filter(|s| !s.adopted)
                .flat_map(|s| s.layers.iter())
                .map(|l| l.uncompressed_size)
                .sum();
            Ok(BuildOutcome {
                artifact: artifact_ref(&repo, &main),
                default_artifact: Some(artifact_ref(&repo, &def)),
                layers_indexed: u32::try_from(indexed).unwrap_or(u32::MAX),
                layers_skipped: u32::try_from(skipped).unwrap_or(u32::MAX),
                startup_paths: 0,
                startup_bytes: 0,
                bytes_indexed: bytes,
                adopted,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_fingerprints_differ_by_credential_not_by_other_hosts() {
        let none = Credentials::new();
        let mut a = Credentials::new();
        a.insert(
            "r.io:5000",
            Credential::Basic {
                username: "u".into(),
                password: "p".into(),
            },
        );
        let mut b = Credentials::new();
        b.insert(
            "r.io:5000",
            Credential::Basic {
                username: "u".into(),
                password: "q".into(),
            },
        );
        let r = "r.io:5000/team/app:v1";
        assert_eq!(credential_fingerprint(r, &none), "");
        assert_ne!(credential_fingerprint(r, &a), "");
        assert_ne!(credential_fingerprint(r, &a), credential_fingerprint(r, &b));
        assert_eq!(credential_fingerprint("other.io/x:1", &a), "");
    }
}
