//! OCI distribution client: manifests, blobs (whole, streamed, ranged), pushes, referrers.
//!
//! Image references are parsed with `oci_client::Reference` (the docker reference grammar
//! and Docker Hub defaults). The HTTP exchanges themselves are made here on `reqwest` (the
//! HTTP stack oci-client is built on) because `oci_client::Client` does not give us what
//! Talaria needs: its errors drop the response headers (no `Retry-After`), it has no retry or
//! resumption of a broken blob stream, it does not return a manifest's media type with its
//! raw bytes, and it has no referrers tag-schema fallback.
//!
//! Every pulled manifest and whole blob is checked against its digest; a streamed blob is
//! checked when it ends; a ranged read cannot be, so its callers check span digests.

mod auth;
mod blobs;
pub mod credentials;
mod manifests;
mod reference;
mod referrers;
mod transport;

pub use blobs::{BlobStream, RangeStream, RegistryBlobSource};
pub use reference::{ImageRef, Repository};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::oci::FormatError;
use auth::{AuthKey, CachedAuth};
use credentials::Credentials;
use transport::{is_loopback, transport_reason};

/// How failed requests are retried.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Attempts per operation, the first included.
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// No retry starts after this much time since the operation began.
    pub max_elapsed: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 6,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
            max_elapsed: Duration::from_secs(120),
        }
    }
}

/// Registry client settings.
#[derive(Clone, Debug)]
pub struct RegistryConfig {
    pub credentials: Credentials,
    /// Hosts (`host[:port]`) spoken to over plain HTTP.
    pub insecure_hosts: Vec<String>,
    /// Loopback hosts (`localhost`, `127.0.0.1`, `[::1]`) use plain HTTP, as docker does.
    pub loopback_insecure: bool,
    pub retry: RetryPolicy,
    pub connect_timeout: Duration,
    /// Longest wait for the next bytes of a response.
    pub read_timeout: Duration,
    pub user_agent: String,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            credentials: Credentials::default(),
            insecure_hosts: Vec::new(),
            loopback_insecure: true,
            retry: RetryPolicy::default(),
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(60),
            user_agent: concat!("talaria/", env!("CARGO_PKG_VERSION")).to_string(),
        }
    }
}

/// Errors of registry operations; every variant names the operation and URL.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{op} {url}: HTTP {status}: {message}")]
    Status {
        op: String,
        url: String,
        status: u16,
        message: String,
    },
    #[error("{op} {url}: gave up after {attempts} attempts in {elapsed:?}; last error: {last}")]
    Exhausted {
        op: String,
        url: String,
        attempts: u32,
        elapsed: Duration,
        last: String,
    },
    #[error("{op} {url}: {message}")]
    Transport {
        op: String,
        url: String,
        message: String,
    },
    #[error("{what}: content does not match its digest: expected {expected}, got {actual}")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("{what}: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        what: String,
        expected: u64,
        actual: u64,
    },
    #[error("{what}: larger than the limit of {limit} bytes")]
    TooLarge { what: String, limit: u64 },
    #[error("authenticating to {host}: {message}")]
    Auth { host: String, message: String },
    #[error("invalid image reference {reference:?}: {message}")]
    BadReference { reference: String, message: String },
    #[error("building HTTP client: {0}")]
    Client(String),
    #[error(transparent)]
    Format(#[from] FormatError),
}

impl RegistryError {
    /// Whether the registry answered 404 (manifest/blob unknown, or an API it lacks).
    pub fn is_not_found(&self) -> bool {
        matches!(self, RegistryError::Status { status: 404, .. })
    }
}

/// An OCI distribution client. Cheap to clone; clones share connections and tokens.
#[derive(Clone)]
pub struct RegistryClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    cfg: RegistryConfig,
    /// `Authorization` values by (host, repository, push).
    auth: Mutex<HashMap<AuthKey, CachedAuth>>,
}

/// Makes rustls' ring back end the process default (kube's TLS uses ring as well, so every
/// client in a Talaria process shares one back end). Idempotent; a provider installed
/// earlier by the program wins.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl RegistryClient {
    pub fn new(cfg: RegistryConfig) -> Result<RegistryClient, RegistryError> {
        // reqwest is built without a bundled back end; it uses the process default.
        install_crypto_provider();
        let http = reqwest::Client::builder()
            .connect_timeout(cfg.connect_timeout)
            .read_timeout(cfg.read_timeout)
            .user_agent(cfg.user_agent.clone())
            .build()
            .map_err(|e| RegistryError::Client(transport_reason(&e)))?;
        Ok(RegistryClient {
            inner: Arc::new(Inner {
                http,
                cfg,
                auth: Mutex::new(HashMap::new()),
            }),
        })
    }

    pub fn config(&self) -> &RegistryConfig {
        &self.inner.cfg
    }

    pub(super) fn scheme(&self, host: &str) -> &'static str {
        let cfg = &self.inner.cfg;
        if (cfg.loopback_insecure && is_loopback(host))
            || cfg.insecure_hosts.iter().any(|h| h == host)
        {
            "http"
        } else {
            "https"
        }
    }

    fn url(&self, repo: &Repository, tail: &str) -> String {
        format!(
            "{}://{}/v2/{}/{}",
            self.scheme(&repo.registry),
            repo.registry,
            repo.name,
            tail
        )
    }
}
