//! A small fault-injecting HTTP proxy in front of the real registry: answers some requests
//! with 429/503, cuts a blob download mid-body, or corrupts a blob's bytes, and records
//! what it served so tests can assert on it.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Response, StatusCode};
use bytes::Bytes;

/// A fault to inject.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Answer the next `count` requests whose path contains `path_part` with 429 and a
    /// `Retry-After` of `retry_after` seconds.
    TooMany {
        path_part: String,
        count: u32,
        retry_after: u64,
    },
    /// Answer the next `count` matching requests with 503.
    Unavailable { path_part: String, count: u32 },
    /// For the next `count` full GETs of a matching blob, send `after` bytes, then break
    /// the connection.
    ResetAfter {
        path_part: String,
        after: usize,
        count: u32,
    },
    /// As `ResetAfter`, for ranged GETs.
    ResetRangeAfter {
        path_part: String,
        after: usize,
        count: u32,
    },
    /// Flip a byte in every GET of a matching blob.
    Corrupt { path_part: String },
    /// Require `Authorization: Bearer <token>` on /v2/ requests; the token is handed out
    /// at `/token` to clients presenting basic credentials `user:password`.
    Bearer {
        user: String,
        password: String,
        token: String,
    },
}

/// What the proxy served.
#[derive(Clone, Debug)]
pub struct Served {
    pub method: String,
    pub path: String,
    pub status: u16,
    pub range: Option<String>,
    pub injected: bool,
    pub at: Instant,
}

#[derive(Default)]
struct Shared {
    faults: Vec<Fault>,
    log: Vec<Served>,
}

pub struct Proxy {
    addr: std::net::SocketAddr,
    shared: Arc<Mutex<Shared>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Clone)]
struct Ctx {
    upstream: String,
    http: reqwest::Client,
    shared: Arc<Mutex<Shared>>,
}

impl Proxy {
    /// Starts a proxy on a free loopback port forwarding to `upstream` ("127.0.0.1:PORT").
    pub async fn start(upstream: &str) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Mutex::new(Shared::default()));
        // reqwest has no bundled TLS back end; the process default must exist first.
        talaria_artifact::oci::registry::install_crypto_provider();
        let ctx = Ctx {
            upstream: upstream.to_string(),
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            shared: shared.clone(),
        };
        let app = axum::Router::new().fallback(handle).with_state(ctx);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Proxy { addr, shared, task }
    }

    /// "127.0.0.1:PORT" of the proxy.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn add(&self, f: Fault) {
        self.shared.lock().unwrap().faults.push(f);
    }

    pub fn clear(&self) {
        self.shared.lock().unwrap().faults.clear();
    }

    pub fn log(&self) -> Vec<Served> {
        self.shared.lock().unwrap().log.clone()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

enum Action {
    Forward,
    Challenge,
    Token(Option<String>),
    Status(StatusCode, Option<u64>),
    Reset(usize),
    Corrupt,
}

fn decide(
    shared: &mut Shared,
    method: &str,
    path: &str,
    range: bool,
    authz: Option<&str>,
) -> Action {
    for f in shared.faults.iter() {
        if let Fault::Bearer {
            user,
            password,
            token,
        } = f
        {
            if path.starts_with("/token") {
                use base64::Engine;
                let want = format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
                );
                return Action::Token((authz == Some(want.as_str())).then(|| token.clone()));
            }
            if authz != Some(format!("Bearer {token}").as_str()) {
                return Action::Challenge;
            }
        }
    }
    for f in shared.faults.iter_mut() {
        match f {
            Fault::TooMany {
                path_part,
                count,
                retry_after,
            } if *count > 0 && path.contains(path_part.as_str()) => {
                *count -= 1;
                return Action::Status(StatusCode::TOO_MANY_REQUESTS, Some(*retry_after));
            }
            Fault::Unavailable { path_part, count }
                if *count > 0 && path.contains(path_part.as_str()) =>
            {
                *count -= 1;
                return Action::Status(StatusCode::SERVICE_UNAVAILABLE, None);
            }
            Fault::ResetAfter {
                path_part,
                after,
                count,
            } if *count > 0 && method == "GET" && !range && path.contains(path_part.as_str()) => {
                *count -= 1;
                return Action::Reset(*after);
            }
            Fault::ResetRangeAfter {
                path_part,
                after,
                count,
            } if *count > 0 && method == "GET" && range && path.contains(path_part.as_str()) => {
                *count -= 1;
                return Action::Reset(*after);
            }
            Fault::Corrupt { path_part }
                if method == "GET" && path.contains(path_part.as_str()) =>
            {
                return Action::Corrupt;
            }
            _ => {}
        }
    }
    Action::Forward
}

async fn handle(State(ctx): State<Ctx>, req: Request) -> Response<Body> {
    let method = req.method().as_str().to_string();
    let path_q = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let range = req
        .headers()
        .get("range")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let authz = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let host = req
        .headers()
        .get("host")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let action = {
        let mut s = ctx.shared.lock().unwrap();
        decide(&mut s, &method, &path_q, range.is_some(), authz.as_deref())
    };
    let record = |status: u16, injected: bool| {
        ctx.shared.lock().unwrap().log.push(Served {
            method: method.clone(),
            path: path_q.clone(),
            status,
            range: range.clone(),
            injected,
            at: Instant::now(),
        });
    };
    match &action {
        Action::Challenge => {
            record(401, true);
            let mut r = Response::new(Body::from(
                r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#,
            ));
            *r.status_mut() = StatusCode::UNAUTHORIZED;
            let ch = format!(r#"Bearer realm="http://{host}/token",service="test-proxy""#);
            r.headers_mut()
                .insert("www-authenticate", HeaderValue::from_str(&ch).unwrap());
            return r;
        }
        Action::Token(tok) => {
            let (code, body) = match tok {
                Some(t) => (StatusCode::OK, format!(r#"{{"token":"{t}"}}"#)),
                None => (StatusCode::UNAUTHORIZED, "bad credentials".to_string()),
            };
            record(code.as_u16(), true);
            let mut r = Response::new(Body::from(body));
            *r.status_mut() = code;
            return r;
        }
        _ => {}
    }
    if let Action::Status(code, after) = action {
        record(code.as_u16(), true);
        let mut r = Response::new(Body::from(
            r#"{"errors":[{"code":"TOOMANYREQUESTS","message":"injected by the test proxy"}]}"#,
        ));
        *r.status_mut() = code;
        if let Some(a) = after {
            r.headers_mut().insert(
                "retry-after",
                HeaderValue::from_str(&a.to_string()).unwrap(),
            );
        }
        return r;
    }

    // Forward, keeping the Host header so the registry builds Location URLs that point
    // back at the proxy.
    let url = format!("http://{}{}", ctx.upstream, path_q);
    let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut up = ctx.http.request(m, &url);
    for (k, v) in req.headers() {
        up = up.header(k.as_str(), v.as_bytes());
    }
    let body = axum::body::to_bytes(req.into_body(), 1 << 30)
        .await
        .unwrap();
    let resp = match up.body(body).send().await {
        Ok(r) => r,
        Err(e) => {
            record(502, false);
            let mut r = Response::new(Body::from(format!("proxy: {e}")));
            *r.status_mut() = StatusCode::BAD_GATEWAY;
            return r;
        }
    };
    let status = resp.status();
    let headers = resp.headers().clone();
    let data: Bytes = resp.bytes().await.unwrap_or_default();
    let mut out = match action {
        Action::Reset(after) if status.is_success() && data.len() > after => {
            record(status.as_u16(), true);
            let head = data.slice(..after);
            // Send the first bytes, then fail the body: the server drops the connection
            // before Content-Length bytes were sent.
            use futures::StreamExt;
            // The pause lets the first bytes reach the client before the break.
            let stream = futures::stream::once(async move { Ok::<Bytes, std::io::Error>(head) })
                .chain(futures::stream::once(async {
                    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                    Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionReset,
                        "injected reset",
                    ))
                }));
            Response::new(Body::from_stream(stream))
        }
        Action::Corrupt if status.is_success() && !data.is_empty() => {
            record(status.as_u16(), true);
            let mut v = data.to_vec();
            let mid = v.len() / 2;
            v[mid] ^= 0x55;
            Response::new(Body::from(v))
        }
        _ => {
            record(status.as_u16(), false);
            Response::new(Body::from(data))
        }
    };
    *out.status_mut() = StatusCode::from_u16(status.as_u16()).unwrap();
    for (k, v) in headers.iter() {
        if k.as_str() == "transfer-encoding" {
            continue;
        }
        out.headers_mut().insert(
            axum::http::HeaderName::from_bytes(k.as_str().as_bytes()).unwrap(),
            HeaderValue::from_bytes(v.as_bytes()).unwrap(),
        );
    }
    out
}
