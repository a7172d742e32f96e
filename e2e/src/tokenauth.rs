//! A token server for the registry's `auth: token` mode (the distribution token spec): it
//! answers `GET /token?service=..&scope=repository:NAME:pull` for one user (HTTP basic) with
//! an ES256 JWT signed by a key whose self-signed certificate the registry trusts, and a
//! short `expires_in`. Used with [`crate::registry::Registry::set_token_auth`] to test token
//! caching, refresh and re-authentication against the real registry.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rcgen::{CertificateParams, KeyPair, SigningKey};
use tempfile::TempDir;

use crate::EnvError;

/// The `service` the registry and its tokens name.
pub const SERVICE: &str = "talaria-test-registry";
/// The tokens' issuer.
pub const ISSUER: &str = "talaria-test-token-server";

struct Signer {
    key: KeyPair,
    cert_der: Vec<u8>,
}

struct State {
    user: String,
    password: String,
    expires_in: u64,
    issued: u32,
    signer: Signer,
}

/// A running token server; stops when dropped.
pub struct TokenServer {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    dir: TempDir,
}

fn new_signer() -> Result<Signer, EnvError> {
    let err = |e: rcgen::Error| EnvError::io("token signing key", std::io::Error::other(e));
    let key = KeyPair::generate().map_err(err)?;
    let cert = CertificateParams::new(vec!["talaria-token-server".to_string()])
        .map_err(err)?
        .self_signed(&key)
        .map_err(err)?;
    Ok(Signer {
        key,
        cert_der: cert.der().to_vec(),
    })
}

fn pem(der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// An ASN.1 DER ECDSA signature (SEQUENCE of r, s) as JWS wants it: r || s, 32 bytes each.
fn der_to_raw(sig: &[u8]) -> Option<Vec<u8>> {
    let mut i = 2usize; // SEQUENCE tag and (short) length: P-256 signatures are < 128 bytes
    let mut out = Vec::with_capacity(64);
    for _ in 0..2 {
        if *sig.get(i)? != 0x02 {
            return None;
        }
        let len = *sig.get(i + 1)? as usize;
        let int = sig.get(i + 2..i + 2 + len)?;
        let int = &int[int.len().saturating_sub(32)..];
        out.extend(std::iter::repeat_n(0u8, 32 - int.len()));
        out.extend_from_slice(int);
        i += 2 + len;
    }
    Some(out)
}

impl TokenServer {
    /// Starts a token server for `user`/`password` handing out tokens valid `expires_in`
    /// seconds.
    pub fn start(user: &str, password: &str, expires_in: u64) -> Result<TokenServer, EnvError> {
        let dir = tempfile::Builder::new()
            .prefix("tlr-token-")
            .tempdir()
            .map_err(|e| EnvError::io("creating the token server dir", e))?;
        let listener = TcpListener::bind("127.0.0.1:0")
            .map_err(|e| EnvError::io("binding the token server", e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| EnvError::io("token server address", e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| EnvError::io("token server listener", e))?;
        let state = Arc::new(Mutex::new(State {
            user: user.to_string(),
            password: password.to_string(),
            expires_in,
            issued: 0,
            signer: new_signer()?,
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let mut server = TokenServer {
            addr,
            state: state.clone(),
            stop: stop.clone(),
            thread: None,
            dir,
        };
        server.write_bundle()?;
        let thread = std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => {
                        let _ = serve(s, &state);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        server.thread = Some(thread);
        Ok(server)
    }

    /// The realm the registry sends clients to.
    pub fn realm(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    /// The PEM file of the signing certificate (the registry's `rootcertbundle`).
    pub fn root_cert_bundle(&self) -> PathBuf {
        self.dir.path().join("root.pem")
    }

    /// Lifetime of the tokens handed out from now on.
    pub fn set_expires_in(&self, seconds: u64) {
        if let Ok(mut s) = self.state.lock() {
            s.expires_in = seconds;
        }
    }

    /// Tokens handed out so far.
    pub fn issued(&self) -> u32 {
        self.state.lock().map(|s| s.issued).unwrap_or(0)
    }

    /// A new signing key and certificate: tokens signed before are no longer trusted once
    /// the registry restarts with the new bundle.
    pub fn rotate_key(&self) -> Result<(), EnvError> {
        let signer = new_signer()?;
        if let Ok(mut s) = self.state.lock() {
            s.signer = signer;
        }
        self.write_bundle()
    }

    fn write_bundle(&self) -> Result<(), EnvError> {
        let der = self
            .state
            .lock()
            .map(|s| s.signer.cert_der.clone())
            .unwrap_or_default();
        let path = self.root_cert_bundle();
        std::fs::write(&path, pem(&der))
            .map_err(|e| EnvError::io(format!("writing {}", path.display()), e))
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn respond(s: &mut TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    write!(
        s,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

fn serve(mut s: TcpStream, state: &Mutex<State>) -> std::io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(s.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let target = line.split(' ').nth(1).unwrap_or("").to_string();
    let mut authorization = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':')
            && k.trim().eq_ignore_ascii_case("authorization")
        {
            authorization = Some(v.trim().to_string());
        }
    }
    let query = target.split_once('?').map(|(_, q)| q).unwrap_or("");
    let scope = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == "scope")
        .map(|(_, v)| {
            v.replace("%3A", ":")
                .replace("%2F", "/")
                .replace("%2C", ",")
        })
        .unwrap_or_default();
    let mut st = state
        .lock()
        .map_err(|_| std::io::Error::other("token server state poisoned"))?;
    let want = format!(
        "Basic {}",
        STANDARD.encode(format!("{}:{}", st.user, st.password))
    );
    if authorization.as_deref() != Some(want.as_str()) {
        drop(st);
        return respond(
            &mut s,
            "401 Unauthorized",
            r#"{"details":"bad credentials"}"#,
        );
    }
    // scope = repository:NAME:ACTIONS (NAME has no colon in these tests).
    let mut parts = scope.splitn(3, ':');
    let (kind, name, actions) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
    );
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    st.issued += 1;
    let header = serde_json::json!({
        "alg": "ES256",
        "typ": "JWT",
        "x5c": [STANDARD.encode(&st.signer.cert_der)],
    });
    let claims = serde_json::json!({
        "iss": ISSUER,
        "sub": st.user,
        "aud": SERVICE,
        "exp": now + st.expires_in,
        "nbf": now.saturating_sub(5),
        "iat": now.saturating_sub(5),
        "jti": format!("t{}", st.issued),
        "access": [{
            "type": kind,
            "name": name,
            "actions": actions.split(',').filter(|a| !a.is_empty()).collect::<Vec<_>>(),
        }],
    });
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let sig = st
        .signer
        .key
        .sign(signing_input.as_bytes())
        .map_err(std::io::Error::other)?;
    let raw = der_to_raw(&sig).ok_or_else(|| std::io::Error::other("ECDSA signature"))?;
    let token = format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(raw));
    let body = serde_json::json!({ "token": token, "expires_in": st.expires_in }).to_string();
    drop(st);
    respond(&mut s, "200 OK", &body)
}
