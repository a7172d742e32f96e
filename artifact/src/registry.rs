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

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use reqwest::StatusCode;
use reqwest::header::{self, HeaderMap};
use sha2::{Digest as _, Sha256};
use tracing::{debug, warn};

use crate::auth::{self, Credential, Credentials};
use crate::source::{BoxFuture, RangeSource, SourceError};
use crate::store::oci::{
    self, Descriptor, FormatError, ImageIndex, MANIFEST_ACCEPT, MAX_MANIFEST_BYTES, Manifest,
    RawManifest,
};

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

/// A repository on a registry.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Repository {
    /// Registry host as the API is reached (`host[:port]`; Docker Hub resolved).
    pub registry: String,
    /// Repository name (`library/busybox`).
    pub name: String,
}

impl std::fmt::Display for Repository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.registry, self.name)
    }
}

/// A parsed registry image reference: repository plus tag and/or digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRef {
    pub repository: Repository,
    pub tag: Option<String>,
    pub digest: Option<String>,
}

impl ImageRef {
    /// Parses `registry/repo:tag`, `registry/repo@sha256:...`, `repo` (Docker Hub, `latest`).
    pub fn parse(s: &str) -> Result<ImageRef, RegistryError> {
        let r: oci_client::Reference =
            s.parse()
                .map_err(|e: oci_client::ParseError| RegistryError::BadReference {
                    reference: s.to_string(),
                    message: e.to_string(),
                })?;
        if let Some(d) = r.digest() {
            oci::digest_hex(d)?;
        }
        Ok(ImageRef {
            repository: Repository {
                registry: r.resolve_registry().to_string(),
                name: r.repository().to_string(),
            },
            tag: r.tag().map(str::to_string),
            digest: r.digest().map(str::to_string),
        })
    }

    /// The manifest reference to fetch: the digest when there is one, else the tag.
    pub fn reference(&self) -> String {
        self.digest
            .clone()
            .or_else(|| self.tag.clone())
            .unwrap_or_else(|| "latest".to_string())
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

type AuthKey = (String, String, bool);

/// A cached `Authorization` value and what it was made from.
struct CachedAuth {
    value: String,
    /// The credential it was obtained with: a different credential now (rotated, or learned
    /// from a later pull) makes the entry stale.
    credential: Credential,
    /// Bearer tokens from a token server: when to fetch the next one, and after when this
    /// one is no longer sent.
    refresh_at: Option<Instant>,
    expires_at: Option<Instant>,
    /// The challenge it answered, to fetch a fresh token before this one expires.
    challenge: Option<auth::Challenge>,
    /// A refresh is under way; others keep using the current value meanwhile.
    refreshing: bool,
}

/// What [`RegistryClient::current_auth`] found in the cache.
enum CacheLookup {
    Use(String),
    Refresh {
        value: String,
        challenge: auth::Challenge,
    },
    Nothing,
}

/// Lifetime of a token whose response has no `expires_in` (the distribution token spec's
/// default).
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// Longest token lifetime believed; a hostile `expires_in` cannot overflow a deadline.
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// When to fetch the next token: a quarter of the lifetime early, at most a minute early.
fn refresh_margin(lifetime: Duration) -> Duration {
    (lifetime / 4).min(Duration::from_secs(60))
}

/// What one attempt's failure means for the retry loop.
enum Failure {
    Retry {
        reason: String,
        after: Option<Duration>,
    },
    Fatal(RegistryError),
}

impl From<RegistryError> for Failure {
    fn from(e: RegistryError) -> Failure {
        Failure::Fatal(e)
    }
}

/// Bounded retries of one operation: attempts and total time, exponential backoff with
/// full jitter, `Retry-After` honoured (but never beyond the time budget).
struct Retrier {
    policy: RetryPolicy,
    op: String,
    url: String,
    start: Instant,
    attempts: u32,
}

impl Retrier {
    async fn on(&mut self, f: Failure) -> Result<(), RegistryError> {
        let (reason, after) = match f {
            Failure::Fatal(e) => return Err(e),
            Failure::Retry { reason, after } => (reason, after),
        };
        self.attempts += 1;
        let elapsed = self.start.elapsed();
        let exhausted = |attempts| RegistryError::Exhausted {
            op: self.op.clone(),
            url: self.url.clone(),
            attempts,
            elapsed,
            last: reason.clone(),
        };
        if self.attempts >= self.policy.max_attempts {
            return Err(exhausted(self.attempts));
        }
        let exp = self
            .policy
            .initial_backoff
            .saturating_mul(1u32 << self.attempts.saturating_sub(1).min(16));
        let cap = exp.min(self.policy.max_backoff);
        // Full jitter spreads retries of many clients hit by the same outage.
        let jittered = cap.mul_f64(0.5 + fastrand::f64() * 0.5);
        let delay = match after {
            Some(a) => a.max(jittered.min(Duration::from_millis(50))),
            None => jittered,
        };
        let remaining = self.policy.max_elapsed.saturating_sub(elapsed);
        if delay > remaining {
            return Err(exhausted(self.attempts));
        }
        warn!(op = %self.op, url = %self.url, attempt = self.attempts, ?delay, %reason, "retrying registry request");
        tokio::time::sleep(delay).await;
        Ok(())
    }
}

/// What kind of credential was used, for error messages (never the secret itself).
fn credential_kind(c: &Credential) -> &'static str {
    match c {
        Credential::Anonymous => "anonymous",
        Credential::Basic { .. } => "username and password",
        Credential::Bearer(_) => "static token",
    }
}

fn is_loopback(host: &str) -> bool {
    let h = host
        .rsplit_once(':')
        .filter(|(h, p)| !h.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        .map_or(host, |(h, _)| h);
    let h = h.trim_start_matches('[').trim_end_matches(']');
    h == "localhost" || h == "::1" || h.starts_with("127.")
}

/// Parses `Retry-After`: seconds or an HTTP date; capped to an hour so a hostile value
/// cannot park us (the retrier's time budget caps it further).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    let d = if let Ok(secs) = v.parse::<u64>() {
        Duration::from_secs(secs)
    } else {
        let at = httpdate::parse_http_date(v).ok()?;
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or_default()
    };
    Some(d.min(Duration::from_secs(3600)))
}

/// The registry's error message from an error body (`{"errors":[{"code","message"}]}`),
/// else the body's start.
fn error_message(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Errs {
        errors: Vec<Err1>,
    }
    #[derive(serde::Deserialize)]
    struct Err1 {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    if let Ok(e) = serde_json::from_slice::<Errs>(body)
        && !e.errors.is_empty()
    {
        return e
            .errors
            .iter()
            .map(|e| format!("{}: {}", e.code, e.message))
            .collect::<Vec<_>>()
            .join("; ");
    }
    let text = String::from_utf8_lossy(&body[..body.len().min(300)]);
    let text = text.trim();
    if text.is_empty() {
        "(no body)".to_string()
    } else {
        text.to_string()
    }
}

fn transport_reason(e: &reqwest::Error) -> String {
    // The source chain carries the useful part (connection refused / reset).
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// Most a body's buffer is sized to up front from its Content-Length.
const PREALLOCATE_MAX: u64 = 64 << 20;

/// Reads a whole body, at most `limit` bytes.
async fn read_limited(
    mut resp: reqwest::Response,
    limit: u64,
    what: &str,
) -> Result<Bytes, Failure> {
    // Sized once when the registry says how much is coming (within the limit): growing by
    // doubling copies a 4 MiB range about twice and faults in each new buffer.
    let size = resp
        .content_length()
        .unwrap_or(0)
        .min(limit)
        .min(PREALLOCATE_MAX);
    let mut buf = BytesMut::with_capacity(size as usize);
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => {
                if buf.len() as u64 + c.len() as u64 > limit {
                    return Err(Failure::Fatal(RegistryError::TooLarge {
                        what: what.to_string(),
                        limit,
                    }));
                }
                buf.extend_from_slice(&c);
            }
            Ok(None) => return Ok(buf.freeze()),
            Err(e) => {
                return Err(Failure::Retry {
                    reason: format!("reading body of {what}: {}", transport_reason(&e)),
                    after: None,
                });
            }
        }
    }
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

    fn scheme(&self, host: &str) -> &'static str {
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

    fn retrier(&self, op: &str, url: &str) -> Retrier {
        Retrier {
            policy: self.inner.cfg.retry.clone(),
            op: op.to_string(),
            url: url.to_string(),
            start: Instant::now(),
            attempts: 0,
        }
    }

    /// Runs `attempt` until it succeeds, fails fatally, or the retry budget of `op` is spent
    /// (see [`Retrier`]). Every request of the client goes through here, so all share one
    /// retry behaviour.
    async fn with_retries<T, Fut>(
        &self,
        op: &str,
        url: &str,
        mut attempt: impl FnMut() -> Fut,
    ) -> Result<T, RegistryError>
    where
        Fut: std::future::Future<Output = Result<T, Failure>>,
    {
        let mut r = self.retrier(op, url);
        loop {
            match attempt().await {
                Ok(v) => return Ok(v),
                Err(f) => r.on(f).await?,
            }
        }
    }

    /// The cached `Authorization` for `key` usable with `credential` now. A value made
    /// with another credential or past its expiry is dropped; one due for refresh is
    /// refreshed here, before it expires (on failure the still valid value is used).
    async fn current_auth(
        &self,
        repo: &Repository,
        key: &AuthKey,
        credential: &Credential,
    ) -> Option<String> {
        let found = {
            let mut map = self.inner.auth.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            // A push token also allows pulls.
            let push_key = (key.0.clone(), key.1.clone(), true);
            let mut lookup = CacheLookup::Nothing;
            for (k, exact) in [(key, true), (&push_key, false)] {
                let Some(e) = map.get_mut(k) else { continue };
                if &e.credential != credential || e.expires_at.is_some_and(|x| x <= now) {
                    map.remove(k);
                    continue;
                }
                let due = e.refresh_at.is_some_and(|r| r <= now);
                lookup = match (&e.challenge, due) {
                    (_, false) => CacheLookup::Use(e.value.clone()),
                    (Some(ch), true) if exact && !e.refreshing => {
                        e.refreshing = true;
                        CacheLookup::Refresh {
                            value: e.value.clone(),
                            challenge: ch.clone(),
                        }
                    }
                    // Someone else refreshes it, or it is a push token we do not refresh
                    // for a pull: still valid, so use it.
                    _ => CacheLookup::Use(e.value.clone()),
                };
                break;
            }
            lookup
        };
        match found {
            CacheLookup::Use(v) => Some(v),
            CacheLookup::Nothing => None,
            CacheLookup::Refresh { value, challenge } => {
                match self
                    .answer_challenge(repo, key.2, &challenge, credential)
                    .await
                {
                    Ok(fresh) => {
                        debug!(registry = %repo.registry, repository = %repo.name, "refreshed registry token before expiry");
                        let v = fresh.value.clone();
                        self.store_auth(key.clone(), fresh);
                        Some(v)
                    }
                    Err(f) => {
                        let reason = match f {
                            Failure::Retry { reason, .. } => reason,
                            Failure::Fatal(e) => e.to_string(),
                        };
                        warn!(registry = %repo.registry, %reason, "refreshing registry token failed; using the current one until it expires");
                        let mut map = self.inner.auth.lock().unwrap_or_else(|p| p.into_inner());
                        if let Some(e) = map.get_mut(key) {
                            e.refreshing = false;
                            // Try again a little later, not on every request.
                            e.refresh_at = Some(Instant::now() + Duration::from_secs(1));
                        }
                        Some(value)
                    }
                }
            }
        }
    }

    fn store_auth(&self, key: AuthKey, entry: CachedAuth) {
        self.inner
            .auth
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, entry);
    }

    /// Drops cached values equal to `value` (the one a registry just refused) for `key`
    /// and its push twin.
    fn drop_auth(&self, key: &AuthKey, value: &str) {
        let mut map = self.inner.auth.lock().unwrap_or_else(|p| p.into_inner());
        for push in [key.2, true] {
            let k = (key.0.clone(), key.1.clone(), push);
            if map.get(&k).is_some_and(|e| e.value == value) {
                map.remove(&k);
            }
        }
    }

    /// One request with authentication: answers one 401 challenge, then classifies the
    /// outcome for the retry loop. Statuses in `ok` (besides 2xx) are returned as responses.
    /// A 401 to a cached value drops it and authenticates once more; a 401 after that is an
    /// [`RegistryError::Auth`], never a loop.
    async fn send_once(
        &self,
        op: &str,
        repo: &Repository,
        push: bool,
        url: &str,
        ok: &[StatusCode],
        build: &(dyn Fn(&reqwest::Client) -> reqwest::RequestBuilder + Send + Sync),
    ) -> Result<reqwest::Response, Failure> {
        let key = (repo.registry.clone(), repo.name.clone(), push);
        // Looked up per request: a credential learned or rotated since is used at once.
        let credential = self
            .inner
            .cfg
            .credentials
            .resolve(&repo.registry, &repo.name);
        let mut authorization = self.current_auth(repo, &key, &credential).await;
        let mut answered_challenge = false;
        loop {
            let mut req = build(&self.inner.http);
            if let Some(a) = &authorization {
                req = req.header(header::AUTHORIZATION, a);
            }
            let sent = std::time::Instant::now();
            let resp = match req.send().await {
                Ok(r) => {
                    // The request timeline of a start (`--log talaria_artifact=debug`).
                    tracing::debug!(
                        op,
                        url,
                        status = r.status().as_u16(),
                        ms = sent.elapsed().as_millis() as u64,
                        "registry answered"
                    );
                    r
                }
                Err(e) => {
                    return Err(Failure::Retry {
                        reason: transport_reason(&e),
                        after: None,
                    });
                }
            };
            let status = resp.status();
            if status.is_success() || ok.contains(&status) {
                return Ok(resp);
            }
            if status == StatusCode::UNAUTHORIZED {
                if let Some(a) = authorization.take() {
                    // Expired or revoked: never send it again.
                    self.drop_auth(&key, &a);
                }
                if answered_challenge {
                    let body = resp.bytes().await.unwrap_or_default();
                    return Err(Failure::Fatal(RegistryError::Auth {
                        host: repo.registry.clone(),
                        message: format!(
                            "{op} {url}: HTTP 401 with fresh credentials ({}): {}",
                            credential_kind(&credential),
                            error_message(&body)
                        ),
                    }));
                }
                answered_challenge = true;
                let challenge = resp
                    .headers()
                    .get(header::WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(auth::parse_challenge);
                if let Some(ch) = challenge {
                    let entry = self.answer_challenge(repo, push, &ch, &credential).await?;
                    authorization = Some(entry.value.clone());
                    self.store_auth(key.clone(), entry);
                    continue;
                }
            }
            let after = retry_after(resp.headers());
            let body = resp.bytes().await.unwrap_or_default();
            let message = error_message(&body);
            // A 500 on a read is retried too: distribution answers 500 to a HEAD/GET that
            // races a concurrent commit of the same blob.
            let read = op.starts_with("GET") || op.starts_with("HEAD");
            return Err(match status.as_u16() {
                429 | 502 | 503 | 504 => Failure::Retry {
                    reason: format!("HTTP {}: {message}", status.as_u16()),
                    after,
                },
                500 if read => Failure::Retry {
                    reason: format!("HTTP {}: {message}", status.as_u16()),
                    after,
                },
                code => Failure::Fatal(RegistryError::Status {
                    op: op.to_string(),
                    url: url.to_string(),
                    status: code,
                    message,
                }),
            });
        }
    }

    /// Produces an `Authorization` value for a challenge with `cred`.
    async fn answer_challenge(
        &self,
        repo: &Repository,
        push: bool,
        ch: &auth::Challenge,
        cred: &Credential,
    ) -> Result<CachedAuth, Failure> {
        let fatal = |message: String| {
            Failure::Fatal(RegistryError::Auth {
                host: repo.registry.clone(),
                message,
            })
        };
        let fixed = |value: String| CachedAuth {
            value,
            credential: cred.clone(),
            refresh_at: None,
            expires_at: None,
            challenge: None,
            refreshing: false,
        };
        match ch.scheme.as_str() {
            "basic" => match cred {
                Credential::Basic { username, password } => {
                    Ok(fixed(auth::basic_header(username, password)))
                }
                _ => Err(fatal(
                    "registry wants basic auth; no credentials for it".into(),
                )),
            },
            "bearer" => {
                if let Credential::Bearer(t) = cred {
                    return Ok(fixed(format!("Bearer {t}")));
                }
                let realm = ch
                    .params
                    .get("realm")
                    .ok_or_else(|| fatal("bearer challenge without realm".into()))?;
                let scope = format!(
                    "repository:{}:{}",
                    repo.name,
                    if push { "pull,push" } else { "pull" }
                );
                let mut query: Vec<(&str, &str)> = vec![("scope", &scope)];
                if let Some(s) = ch.params.get("service") {
                    query.push(("service", s));
                }
                let mut req = self.inner.http.get(realm).query(&query);
                if let Credential::Basic { username, password } = cred {
                    req = req.basic_auth(username, Some(password));
                }
                // The lifetime counts from before the request: never later than the
                // server's clock would have it.
                let asked = Instant::now();
                let resp = req.send().await.map_err(|e| Failure::Retry {
                    reason: format!("token request to {realm}: {}", transport_reason(&e)),
                    after: None,
                })?;
                let status = resp.status();
                let body = resp.bytes().await.unwrap_or_default();
                if !status.is_success() {
                    if matches!(status.as_u16(), 429 | 502 | 503 | 504) {
                        return Err(Failure::Retry {
                            reason: format!("token request: HTTP {status}"),
                            after: None,
                        });
                    }
                    return Err(fatal(format!(
                        "token request to {realm} ({}): HTTP {status}: {}",
                        credential_kind(cred),
                        error_message(&body)
                    )));
                }
                #[derive(serde::Deserialize)]
                struct Tok {
                    #[serde(default)]
                    token: Option<String>,
                    #[serde(default)]
                    access_token: Option<String>,
                    #[serde(default)]
                    expires_in: Option<i64>,
                }
                let t: Tok = serde_json::from_slice(&body)
                    .map_err(|e| fatal(format!("token response is not JSON: {e}")))?;
                let tok = t
                    .token
                    .or(t.access_token)
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| fatal("token response has no token".into()))?;
                let lifetime = match t.expires_in {
                    Some(s) if s > 0 => Duration::from_secs(s as u64).min(MAX_TOKEN_LIFETIME),
                    _ => DEFAULT_TOKEN_LIFETIME,
                };
                let expires_at = asked + lifetime;
                Ok(CachedAuth {
                    value: format!("Bearer {tok}"),
                    credential: cred.clone(),
                    refresh_at: Some(expires_at - refresh_margin(lifetime)),
                    expires_at: Some(expires_at),
                    challenge: Some(ch.clone()),
                    refreshing: false,
                })
            }
            other => Err(fatal(format!("unsupported auth scheme {other}"))),
        }
    }

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
    fn range_request(
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

    fn upload_url(&self, host: &str, location: &str, digest: &str) -> String {
        let base = if location.starts_with("http://") || location.starts_with("https://") {
            location.to_string()
        } else {
            format!("{}://{}{}", self.scheme(host), host, location)
        };
        let sep = if base.contains('?') { '&' } else { '?' };
        // Digests are `sha256:<hex>`; only the colon needs escaping.
        format!("{base}{sep}digest={}", digest.replace(':', "%3A"))
    }

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
async fn read_skipping(
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

    fn finish(&mut self) -> Result<(), RegistryError> {
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

    async fn raw_chunk(&mut self) -> Result<Option<Bytes>, RegistryError> {
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
    async fn open(&mut self) -> Result<(), RegistryError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A token-auth endpoint in process: `/token` hands out numbered tokens (basic
    /// credentials must match `password`), `/v2/...` accepts only the current token.
    /// In-process because it exercises the client's token bookkeeping (expiry, revocation),
    /// which the real registry's htpasswd mode cannot.
    mod token_server {
        use std::sync::{Arc, Mutex};

        use axum::extract::{Request, State};
        use axum::http::{HeaderValue, StatusCode};
        use axum::response::{IntoResponse, Response};
        use base64::Engine;

        #[derive(Default)]
        pub struct S {
            pub password: String,
            pub expires_in: Option<u64>,
            /// Tokens issued so far; the valid one is `tok-<issued>`.
            pub issued: u32,
            /// Requests to /v2/ answered 401.
            pub refused: u32,
            /// Whether /v2/ refuses even the current token.
            pub reject_all: bool,
        }

        pub struct Server {
            pub host: String,
            pub state: Arc<Mutex<S>>,
            task: tokio::task::JoinHandle<()>,
        }

        impl Drop for Server {
            fn drop(&mut self) {
                self.task.abort();
            }
        }

        async fn handle(State(st): State<Arc<Mutex<S>>>, req: Request) -> Response {
            let host = req
                .headers()
                .get("host")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let authz = req
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let mut s = st.lock().unwrap();
            if req.uri().path() == "/token" {
                let want = format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(format!("u:{}", s.password))
                );
                if authz.as_deref() != Some(want.as_str()) {
                    return StatusCode::UNAUTHORIZED.into_response();
                }
                s.issued += 1;
                let body = match s.expires_in {
                    Some(e) => format!(r#"{{"token":"tok-{}","expires_in":{e}}}"#, s.issued),
                    None => format!(r#"{{"token":"tok-{}"}}"#, s.issued),
                };
                return body.into_response();
            }
            if !s.reject_all
                && s.issued > 0
                && authz.as_deref() == Some(format!("Bearer tok-{}", s.issued).as_str())
            {
                return "0123456789".into_response();
            }
            s.refused += 1;
            let mut r = StatusCode::UNAUTHORIZED.into_response();
            let ch = format!(r#"Bearer realm="http://{host}/token",service="t""#);
            r.headers_mut()
                .insert("www-authenticate", HeaderValue::from_str(&ch).unwrap());
            r
        }

        pub async fn start(password: &str, expires_in: Option<u64>) -> Server {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let host = listener.local_addr().unwrap().to_string();
            let state = Arc::new(Mutex::new(S {
                password: password.into(),
                expires_in,
                ..S::default()
            }));
            let app = axum::Router::new()
                .fallback(handle)
                .with_state(state.clone());
            let task = tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            });
            Server { host, state, task }
        }
    }

    const BLOB: &str = "sha256:84d89877f0d4041efb6bf91a16f0248f2fd573e6af05c19f96bedb9f882f7882";

    fn token_client(
        creds: Credentials,
    ) -> (RegistryClient, impl Fn(&token_server::Server) -> Repository) {
        let client = RegistryClient::new(RegistryConfig {
            credentials: creds,
            retry: RetryPolicy {
                max_attempts: 1,
                ..RetryPolicy::default()
            },
            ..RegistryConfig::default()
        })
        .unwrap();
        (client, |s: &token_server::Server| Repository {
            registry: s.host.clone(),
            name: "r".into(),
        })
    }

    fn basic(password: &str) -> Credential {
        Credential::Basic {
            username: "u".into(),
            password: password.into(),
        }
    }

    #[tokio::test]
    async fn token_is_refreshed_before_it_expires() {
        let srv = token_server::start("pw", Some(2)).await;
        let mut creds = Credentials::new();
        creds.insert(&srv.host, basic("pw"));
        let (client, repo) = token_client(creds);
        let repo = repo(&srv);
        assert_eq!(
            &client.get_blob_range(&repo, BLOB, 0, 4).await.unwrap()[..],
            b"0123"
        );
        assert_eq!(srv.state.lock().unwrap().refused, 1, "the first request");
        client.get_blob_range(&repo, BLOB, 0, 4).await.unwrap();
        assert_eq!(srv.state.lock().unwrap().issued, 1, "token reused");
        // Past the refresh point (1.5 s of 2 s), before expiry: a new token is fetched
        // ahead of the request, which is therefore never refused.
        tokio::time::sleep(Duration::from_millis(1600)).await;
        client.get_blob_range(&repo, BLOB, 0, 4).await.unwrap();
        let s = srv.state.lock().unwrap();
        assert_eq!(s.issued, 2);
        assert_eq!(s.refused, 1, "no 401 for the refreshed token");
    }

    #[tokio::test]
    async fn revoked_token_reauthenticates_once_then_fails_as_auth() {
        let srv = token_server::start("pw", Some(3600)).await;
        let learned = Arc::new(auth::LearnedCredentials::new(8, Duration::from_secs(600)));
        let creds = Credentials::new().with_source(learned.clone());
        let (client, repo) = token_client(creds);
        let repo = repo(&srv);
        // No credential yet: the token server refuses; an auth error.
        let e = client.get_blob_range(&repo, BLOB, 0, 4).await.unwrap_err();
        assert!(matches!(e, RegistryError::Auth { .. }), "{e}");
        // Learned after the client was made: used at the next request.
        assert!(learned.remember(&srv.host, "r", basic("pw")));
        client.get_blob_range(&repo, BLOB, 0, 4).await.unwrap();
        assert_eq!(srv.state.lock().unwrap().issued, 1);
        // The server forgets the token (restart, revocation): the 401 drops it and one new
        // token is fetched.
        srv.state.lock().unwrap().issued = 5;
        client.get_blob_range(&repo, BLOB, 0, 4).await.unwrap();
        assert_eq!(srv.state.lock().unwrap().issued, 6);
        // Tokens issued but never accepted: the cached one is refused, one new token is
        // fetched and refused too, then an auth error (no loop).
        let (refused_before, issued_before) = {
            let mut s = srv.state.lock().unwrap();
            s.reject_all = true;
            (s.refused, s.issued)
        };
        let e = client.get_blob_range(&repo, BLOB, 0, 4).await.unwrap_err();
        assert!(matches!(e, RegistryError::Auth { .. }), "{e}");
        let s = srv.state.lock().unwrap();
        assert_eq!(s.refused - refused_before, 2);
        assert_eq!(s.issued - issued_before, 1);
    }

    #[tokio::test]
    async fn changed_credential_replaces_the_cached_token() {
        let srv = token_server::start("old", Some(3600)).await;
        let learned = Arc::new(auth::LearnedCredentials::new(8, Duration::from_secs(600)));
        learned.remember(&srv.host, "r", basic("old"));
        let (client, repo) = token_client(Credentials::new().with_source(learned.clone()));
        let repo = repo(&srv);
        client.get_blob_range(&repo, BLOB, 0, 4).await.unwrap();
        // Rotated: the server wants the new password; the old token stays valid on the
        // server, yet a new credential must not keep using a token of the old one.
        srv.state.lock().unwrap().password = "new".into();
        assert!(learned.remember(&srv.host, "r", basic("new")));
        assert!(!learned.remember(&srv.host, "r", basic("new")));
        client.get_blob_range(&repo, BLOB, 0, 4).await.unwrap();
        let s = srv.state.lock().unwrap();
        assert_eq!(s.issued, 2, "a token fetched with the new credential");
    }

    #[test]
    fn loopback_detection() {
        assert!(is_loopback("127.0.0.1:5000"));
        assert!(is_loopback("localhost"));
        assert!(is_loopback("[::1]:80"));
        assert!(!is_loopback("registry.example:5000"));
    }

    #[test]
    fn retry_after_parsing() {
        let mut h = HeaderMap::new();
        h.insert(header::RETRY_AFTER, "3".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        h.insert(header::RETRY_AFTER, "999999999".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3600)));
        h.insert(header::RETRY_AFTER, "garbage".parse().unwrap());
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn error_messages() {
        assert_eq!(
            error_message(
                br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#
            ),
            "MANIFEST_UNKNOWN: manifest unknown"
        );
        assert_eq!(error_message(b""), "(no body)");
    }

    #[test]
    fn references() {
        let r = ImageRef::parse("127.0.0.1:5000/a/b:v1").unwrap();
        assert_eq!(r.repository.registry, "127.0.0.1:5000");
        assert_eq!(r.repository.name, "a/b");
        assert_eq!(r.reference(), "v1");
        let d = ImageRef::parse(&format!("reg.io/x@{}", oci::EMPTY_DIGEST)).unwrap();
        assert_eq!(d.reference(), oci::EMPTY_DIGEST);
        assert!(ImageRef::parse("not a reference").is_err());
        assert!(ImageRef::parse("reg.io/x@sha256:short").is_err());
    }
}
