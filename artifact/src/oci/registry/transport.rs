//! One HTTP exchange with a registry and its bounded retries: attempts, backoff with
//! jitter, `Retry-After`, error bodies read within a cap.

use super::RegistryClient;
use super::RegistryError;
use super::Repository;
use super::RetryPolicy;
use super::auth::credential_kind;
use super::credentials;
use bytes::Bytes;
use bytes::BytesMut;
use reqwest::StatusCode;
use reqwest::header;
use reqwest::header::HeaderMap;
use std::time::Duration;
use std::time::Instant;
use tracing::warn;

/// What one attempt's failure means for the retry loop.
pub(super) enum Failure {
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
pub(super) struct Retrier {
    policy: RetryPolicy,
    op: String,
    url: String,
    pub(super) start: Instant,
    pub(super) attempts: u32,
}

impl Retrier {
    pub(super) async fn on(&mut self, f: Failure) -> Result<(), RegistryError> {
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

pub(super) fn is_loopback(host: &str) -> bool {
    let h = host
        .rsplit_once(':')
        .filter(|(h, p)| !h.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        .map_or(host, |(h, _)| h);
    let h = h.trim_start_matches('[').trim_end_matches(']');
    h == "localhost" || h == "::1" || h.starts_with("127.")
}

/// Parses `Retry-After`: seconds or an HTTP date; capped to an hour so a hostile value
/// cannot park us (the retrier's time budget caps it further).
pub(super) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
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
pub(super) fn error_message(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    pub(super) struct Errs {
        errors: Vec<Err1>,
    }
    #[derive(serde::Deserialize)]
    pub(super) struct Err1 {
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

pub(super) fn transport_reason(e: &reqwest::Error) -> String {
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
pub(super) const PREALLOCATE_MAX: u64 = 64 << 20;

/// Reads a whole body, at most `limit` bytes.
pub(super) async fn read_limited(
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

/// Most of an error body read (its message is truncated for logs anyway): a hostile or
/// broken registry cannot make us buffer an endless error page.
pub(super) const MAX_ERROR_BODY: usize = 64 << 10;

/// The start of an error response's body, at most [`MAX_ERROR_BODY`] bytes; the rest is
/// not read (the connection is dropped with the response).
pub(super) async fn error_body(mut resp: reqwest::Response) -> Bytes {
    let mut buf = BytesMut::new();
    while buf.len() < MAX_ERROR_BODY {
        match resp.chunk().await {
            Ok(Some(c)) => {
                let take = c.len().min(MAX_ERROR_BODY - buf.len());
                buf.extend_from_slice(&c[..take]);
            }
            _ => break,
        }
    }
    buf.freeze()
}

impl RegistryClient {
    pub(super) fn retrier(&self, op: &str, url: &str) -> Retrier {
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
    pub(super) async fn with_retries<T, Fut>(
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

    /// One request with authentication: answers one 401 challenge, then classifies the
    /// outcome for the retry loop. Statuses in `ok` (besides 2xx) are returned as responses.
    /// A 401 to a cached value drops it and authenticates once more; a 401 after that is an
    /// [`RegistryError::Auth`], never a loop.
    pub(super) async fn send_once(
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
                    let body = error_body(resp).await;
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
                    .and_then(credentials::parse_challenge);
                if let Some(ch) = challenge {
                    let entry = self.answer_challenge(repo, push, &ch, &credential).await?;
                    authorization = Some(entry.value.clone());
                    self.store_auth(key.clone(), entry);
                    continue;
                }
            }
            let after = retry_after(resp.headers());
            let body = error_body(resp).await;
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
}

#[cfg(test)]
mod tests {
    use super::*;
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
}
