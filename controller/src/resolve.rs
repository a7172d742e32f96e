//! Resolving image references to per-platform manifest digests. Behind a small trait so the
//! policy reconciler does not depend on how the artifact crate reads registries; the real
//! implementation ([`RegistryResolver`]) caches answers for a while.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use talaria_artifact::oci::registry::credentials::{Credential, Credentials};
use talaria_artifact::oci::store::{Store, StoreError};
use talaria_artifact::oci::{FormatError, Manifest, Platform};
use talaria_artifact::source::BoxFuture;

use crate::clients::{ClientError, Clients, store_reason};

/// Largest image config we read to learn a single-platform image's platform.
const MAX_CONFIG_BYTES: u64 = 4 << 20;

/// One platform's image manifest, as a reference resolved to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlatformManifest {
    pub platform: String,
    pub digest: String,
}

/// Resolution of a reference: the wanted platforms found, and the ones the image lacks.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Resolution {
    pub found: Vec<PlatformManifest>,
    pub missing: Vec<String>,
}

/// Why a reference could not be resolved. Cloneable (sources shared) because failures are
/// cached like answers.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ResolverError {
    #[error(transparent)]
    Client(Arc<ClientError>),
    #[error(transparent)]
    Manifest(Arc<StoreError>),
    #[error(transparent)]
    Format(Arc<FormatError>),
    #[error("reading the image config: {0}")]
    ReadConfig(Arc<StoreError>),
    #[error("image config {digest}: {message}")]
    BadConfig { digest: String, message: String },
    #[error("image is {actual} only; the policy wants {wanted}")]
    WrongPlatform { actual: String, wanted: String },
    #[error("no manifest for platform(s) {0}")]
    NoPlatform(String),
}

impl ResolverError {
    /// Metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            ResolverError::Client(e) => e.reason(),
            ResolverError::Manifest(e) | ResolverError::ReadConfig(e) => store_reason(e),
            ResolverError::Format(_) => "bad_manifest",
            ResolverError::BadConfig { .. } => "bad_config",
            ResolverError::WrongPlatform { .. } | ResolverError::NoPlatform(_) => "no_platform",
        }
    }
}

impl From<ClientError> for ResolverError {
    fn from(e: ClientError) -> Self {
        ResolverError::Client(Arc::new(e))
    }
}

/// Resolves image references to per-platform manifest digests.
pub trait Resolver: Send + Sync {
    /// `reference` is a full registry reference (`registry/repo:tag` or `@digest`).
    fn resolve<'a>(
        &'a self,
        reference: &'a str,
        platforms: &'a [String],
        credentials: &'a Credentials,
    ) -> BoxFuture<'a, Result<Resolution, ResolverError>>;
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
type Cached = (Instant, Result<Resolution, ResolverError>);

/// Which of `platforms` an image index offers (by its descriptors' platforms).
fn match_index(idx: &talaria_artifact::oci::ImageIndex, platforms: &[String]) -> Resolution {
    let mut out = Resolution::default();
    for want in platforms {
        let Some(wp) = Platform::parse(want) else {
            out.missing.push(want.clone());
            continue;
        };
        match idx.manifest_for(&wp) {
            Some(d) => out.found.push(PlatformManifest {
                platform: want.clone(),
                digest: d.digest.clone(),
            }),
            None => out.missing.push(want.clone()),
        }
    }
    out
}

/// Which of `platforms` a single-platform image (manifest `digest`, platform `actual`) is.
fn match_single(
    digest: &str,
    actual: &Platform,
    platforms: &[String],
) -> Result<Resolution, ResolverError> {
    let mut out = Resolution::default();
    for want in platforms {
        match Platform::parse(want) {
            Some(wp) if wp.matches(actual) => out.found.push(PlatformManifest {
                platform: want.clone(),
                digest: digest.to_string(),
            }),
            _ => out.missing.push(want.clone()),
        }
    }
    if out.found.is_empty() {
        return Err(ResolverError::WrongPlatform {
            actual: actual.to_string(),
            wanted: platforms.join(", "),
        });
    }
    Ok(out)
}

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

    fn cached(&self, key: &CacheKey) -> Option<Result<Resolution, ResolverError>> {
        let map = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let (at, r) = map.get(key)?;
        let ttl = if r.is_ok() { self.ttl_ok } else { self.ttl_err };
        (at.elapsed() < ttl).then(|| r.clone())
    }

    fn remember(&self, key: CacheKey, r: &Result<Resolution, ResolverError>) {
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
    ) -> Result<Resolution, ResolverError> {
        let (store, r) = self.clients.store(reference, creds)?;
        let raw = store.get_manifest(&r.reference()).await.map_err(|e| {
            self.clients.metrics.registry_request("manifest", "error");
            ResolverError::Manifest(Arc::new(e))
        })?;
        self.clients.metrics.registry_request("manifest", "ok");
        let out = match raw
            .parse()
            .map_err(|e| ResolverError::Format(Arc::new(e)))?
        {
            Manifest::Index(idx) => match_index(&idx, platforms),
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
                    .map_err(|e| ResolverError::ReadConfig(Arc::new(e)))?;
                let cfg: Cfg =
                    serde_json::from_slice(&bytes).map_err(|e| ResolverError::BadConfig {
                        digest: m.config.digest.clone(),
                        message: e.to_string(),
                    })?;
                let actual = Platform {
                    os: cfg.os,
                    architecture: cfg.architecture,
                    os_version: None,
                    variant: cfg.variant,
                };
                match_single(&raw.digest, &actual, platforms)?
            }
        };
        if out.found.is_empty() {
            return Err(ResolverError::NoPlatform(out.missing.join(", ")));
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
    ) -> BoxFuture<'a, Result<Resolution, ResolverError>> {
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

    #[test]
    fn a_single_platform_image_matches_only_its_platform() {
        let amd64 = Platform::parse("linux/amd64").expect("platform");
        let wanted = ["linux/amd64".to_string(), "linux/arm64".to_string()];
        let r = match_single("sha256:m", &amd64, &wanted).expect("found");
        assert_eq!(
            r.found,
            [PlatformManifest {
                platform: "linux/amd64".into(),
                digest: "sha256:m".into()
            }]
        );
        assert_eq!(r.missing, ["linux/arm64"]);
        let e = match_single("sha256:m", &amd64, &wanted[1..]).expect_err("wrong platform");
        assert_eq!(e.reason(), "no_platform");
        assert!(e.to_string().contains("wants linux/arm64"), "{e}");
    }
}
