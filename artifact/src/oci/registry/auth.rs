//! The client side of registry authentication: `Authorization` values cached per
//! (host, repository, push), bearer tokens fetched from a challenge's realm and refreshed
//! before they expire.

use super::RegistryClient;
use super::RegistryError;
use super::Repository;
use super::credentials;
use super::credentials::Credential;
use super::transport::Failure;
use super::transport::error_message;
use super::transport::transport_reason;
use super::transport::{error_body, read_limited};
use std::time::Duration;
use std::time::Instant;
use tracing::debug;
use tracing::warn;

pub(super) type AuthKey = (String, String, bool);

/// A cached `Authorization` value and what it was made from.
pub(super) struct CachedAuth {
    pub(super) value: String,
    /// The credential it was obtained with: a different credential now (rotated, or learned
    /// from a later pull) makes the entry stale.
    credential: Credential,
    /// Bearer tokens from a token server: when to fetch the next one, and after when this
    /// one is no longer sent.
    refresh_at: Option<Instant>,
    expires_at: Option<Instant>,
    /// The challenge it answered, to fetch a fresh token before this one expires.
    challenge: Option<credentials::Challenge>,
    /// A refresh is under way; others keep using the current value meanwhile.
    refreshing: bool,
}

/// What [`RegistryClient::current_auth`] found in the cache.
pub(super) enum CacheLookup {
    Use(String),
    Refresh {
        value: String,
        challenge: credentials::Challenge,
    },
    Nothing,
}

/// Lifetime of a token whose response has no `expires_in` (the distribution token spec's
/// default).
pub(super) const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// Longest token lifetime believed; a hostile `expires_in` cannot overflow a deadline.
pub(super) const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Most of a token response read (real ones are a few KiB).
const MAX_TOKEN_BODY: u64 = 1 << 20;

/// When to fetch the next token: a quarter of the lifetime early, at most a minute early.
pub(super) fn refresh_margin(lifetime: Duration) -> Duration {
    (lifetime / 4).min(Duration::from_secs(60))
}

/// What kind of credential was used, for error messages (never the secret itself).
pub(super) fn credential_kind(c: &Credential) -> &'static str {
    match c {
        Credential::Anonymous => "anonymous",
        Credential::Basic { .. } => "username and password",
        Credential::Bearer(_) => "static token",
    }
}

impl RegistryClient {
    /// The cached `Authorization` for `key` usable with `credential` now. A value made
    /// with another credential or past its expiry is dropped; one due for refresh is
    /// refreshed here, before it expires (on failure the still valid value is used).
    pub(super) async fn current_auth(
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

    pub(super) fn store_auth(&self, key: AuthKey, entry: CachedAuth) {
        self.inner
            .auth
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, entry);
    }

    /// Drops cached values equal to `value` (the one a registry just refused) for `key`
    /// and its push twin.
    pub(super) fn drop_auth(&self, key: &AuthKey, value: &str) {
        let mut map = self.inner.auth.lock().unwrap_or_else(|p| p.into_inner());
        for push in [key.2, true] {
            let k = (key.0.clone(), key.1.clone(), push);
            if map.get(&k).is_some_and(|e| e.value == value) {
                map.remove(&k);
            }
        }
    }

    /// Produces an `Authorization` value for a challenge with `cred`.
    pub(super) async fn answer_challenge(
        &self,
        repo: &Repository,
        push: bool,
        ch: &credentials::Challenge,
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
                    Ok(fixed(credentials::basic_header(username, password)))
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
                // The credential goes to the realm: only over TLS, unless the realm's host is
                // one this client reaches over plain HTTP anyway (listed insecure, loopback).
                let url = reqwest::Url::parse(realm)
                    .map_err(|e| fatal(format!("token realm {realm:?}: {e}")))?;
                let realm_host = match (url.host_str(), url.port()) {
                    (Some(h), Some(p)) => format!("{h}:{p}"),
                    (Some(h), None) => h.to_string(),
                    (None, _) => return Err(fatal(format!("token realm {realm:?} has no host"))),
                };
                match url.scheme() {
                    "https" => {}
                    "http" if self.scheme(&realm_host) == "http" => {}
                    s => {
                        return Err(fatal(format!(
                            "token realm {realm} is {s}, not https (list {realm_host} as an \
                             insecure registry to allow it)"
                        )));
                    }
                }
                let mut req = self.inner.http.get(url).query(&query);
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
                if !status.is_success() {
                    let body = error_body(resp).await;
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
                let body = read_limited(resp, MAX_TOKEN_BODY, "token response").await?;
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
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::oci::registry::credentials::Credentials;
    use crate::oci::registry::{RegistryConfig, RetryPolicy};

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
        let learned = Arc::new(credentials::LearnedCredentials::new(
            8,
            Duration::from_secs(600),
        ));
        let creds = Credentials::new().with_source(learned.clone());
        let (client, repo) = token_client(creds);
        let repo = repo(&srv);
        // No credential yet: the token server refuses; an auth error.
        let e = client.get_blob_range(&repo, BLOB, 0, 4).await.unwrap_err();
        assert!(matches!(e, RegistryError::Auth { .. }), "{e}");
        // Learned after the client was made: used at the next request.
        assert!(learn(&learned, &srv.host, "r", basic("pw")));
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
    async fn a_plain_http_token_realm_gets_no_credential() {
        let client = RegistryClient::new(RegistryConfig::default()).unwrap();
        let repo = Repository {
            registry: "registry.example".into(),
            name: "team/app".into(),
        };
        let ch = credentials::parse_challenge(
            r#"Bearer realm="http://auth.example/token",service="registry.example""#,
        )
        .unwrap();
        // Refused before any request: the password would cross the network in clear.
        let e = match client
            .answer_challenge(&repo, false, &ch, &basic("pw"))
            .await
        {
            Err(Failure::Fatal(e)) => e,
            Err(_) => panic!("expected a fatal error, got a retry"),
            Ok(_) => panic!("a plain-HTTP realm was answered"),
        };
        assert!(e.to_string().contains("not https"), "{e}");
        let odd = credentials::parse_challenge(r#"Bearer realm="ftp://auth.example/t""#).unwrap();
        assert!(
            client
                .answer_challenge(&repo, false, &odd, &basic("pw"))
                .await
                .is_err()
        );
    }

    /// A pull's credential, offered and confirmed (the pull succeeded).
    fn learn(l: &credentials::LearnedCredentials, host: &str, repo: &str, c: Credential) -> bool {
        l.offer(host, repo, c).is_some_and(|o| l.confirm(o))
    }

    #[tokio::test]
    async fn changed_credential_replaces_the_cached_token() {
        let srv = token_server::start("old", Some(3600)).await;
        let learned = Arc::new(credentials::LearnedCredentials::new(
            8,
            Duration::from_secs(600),
        ));
        learn(&learned, &srv.host, "r", basic("old"));
        let (client, repo) = token_client(Credentials::new().with_source(learned.clone()));
        let repo = repo(&srv);
        client.get_blob_range(&repo, BLOB, 0, 4).await.unwrap();
        // Rotated: the server wants the new password; the old token stays valid on the
        // server, yet a new credential must not keep using a token of the old one.
        srv.state.lock().unwrap().password = "new".into();
        assert!(learn(&learned, &srv.host, "r", basic("new")));
        assert!(!learn(&learned, &srv.host, "r", basic("new")));
        client.get_blob_range(&repo, BLOB, 0, 4).await.unwrap();
        let s = srv.state.lock().unwrap();
        assert_eq!(s.issued, 2, "a token fetched with the new credential");
    }
}
