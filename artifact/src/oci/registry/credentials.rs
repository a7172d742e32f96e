//! Registry credentials and authentication challenges.
//!
//! Credentials come from a docker `config.json` (`auths` map) or from the data of a Kubernetes
//! `kubernetes.io/dockerconfigjson` secret (the same JSON under the `.dockerconfigjson` key).
//! The registry client answers `WWW-Authenticate` challenges: `Basic` with the host's
//! username/password, `Bearer` by fetching a token from the challenge's realm.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use serde::Deserialize;
use tracing::{debug, warn};

/// Errors reading credentials.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("reading docker config {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing docker config JSON ({what}): {source}")]
    Json {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("docker config entry for {host}: `auth` is not base64 of `user:password`")]
    BadAuthField { host: String },
    #[error("secret data has no `.dockerconfigjson` (or legacy `.dockercfg`) key")]
    MissingSecretKey,
}

/// One registry's credential.
#[derive(Clone, PartialEq, Eq, Default)]
pub enum Credential {
    #[default]
    Anonymous,
    Basic {
        username: String,
        password: String,
    },
    /// A registry token used as is (`Authorization: Bearer ...`), e.g. an identity token
    /// already exchanged, or a token for registries that accept static bearer tokens.
    Bearer(String),
}

// Never print secrets in logs or error messages.
impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::Anonymous => write!(f, "Anonymous"),
            Credential::Basic { username, .. } => write!(f, "Basic({username}, ***)"),
            Credential::Bearer(_) => write!(f, "Bearer(***)"),
        }
    }
}

/// Credentials by registry host (`host[:port]`, normalized), plus dynamic sources consulted
/// first, at the time of each lookup (see [`Credentials::with_source`]).
#[derive(Clone, Default)]
pub struct Credentials {
    by_host: HashMap<String, Credential>,
    sources: Vec<Arc<dyn CredentialSource>>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("by_host", &self.by_host)
            .field("sources", &self.sources.len())
            .finish()
    }
}

/// A source of credentials asked at request time, so a credential learned or changed after
/// a client was made is used by it.
pub trait CredentialSource: Send + Sync {
    /// The credential for `repository` on `host` (normalized, see [`normalize_host`]), or
    /// `None` when this source has none.
    fn lookup(&self, host: &str, repository: &str) -> Option<Credential>;
}

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, DockerAuthEntry>,
}

#[derive(Deserialize, Default)]
struct DockerAuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default, rename = "identitytoken")]
    identity_token: Option<String>,
    #[serde(default, rename = "registrytoken")]
    registry_token: Option<String>,
}

/// Normalizes a registry key of a docker config: strips a scheme and a path, maps Docker
/// Hub's historical names to `docker.io`.
pub fn normalize_host(key: &str) -> String {
    let s = key
        .trim()
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let host = s.split('/').next().unwrap_or(s).to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".to_string()
        }
        _ => host,
    }
}

impl Credentials {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the credential of one registry host.
    pub fn insert(&mut self, host: &str, credential: Credential) {
        self.by_host.insert(normalize_host(host), credential);
    }

    /// The credential for a host (anonymous when none is known).
    pub fn get(&self, host: &str) -> Credential {
        self.by_host
            .get(&normalize_host(host))
            .cloned()
            .unwrap_or_default()
    }

    pub fn is_empty(&self) -> bool {
        self.by_host.is_empty() && self.sources.is_empty()
    }

    /// Adds every credential of `other`; `other` wins on the same host. Its sources are
    /// asked after ours.
    pub fn merge(&mut self, other: Credentials) {
        self.by_host.extend(other.by_host);
        self.sources.extend(other.sources);
    }

    /// Adds a dynamic source, asked (after sources added before it) ahead of the static
    /// credentials.
    pub fn with_source(mut self, source: Arc<dyn CredentialSource>) -> Self {
        self.sources.push(source);
        self
    }

    /// The credential for `repository` on `host` now: the first source that has one, else
    /// the static credential of the host, else anonymous.
    pub fn resolve(&self, host: &str, repository: &str) -> Credential {
        let host = normalize_host(host);
        for s in &self.sources {
            if let Some(c) = s.lookup(&host, repository) {
                return c;
            }
        }
        self.by_host.get(&host).cloned().unwrap_or_default()
    }

    /// Parses a docker `config.json` (`{"auths": {"host": {"auth": "base64(user:pass)"}}}`).
    /// Credential helpers (`credsStore`) are not run: only inline credentials are used.
    pub fn from_docker_config_json(bytes: &[u8]) -> Result<Self, AuthError> {
        let cfg: DockerConfig =
            serde_json::from_slice(bytes).map_err(|source| AuthError::Json {
                what: "config.json".into(),
                source,
            })?;
        Self::from_auths(cfg.auths)
    }

    fn from_auths(auths: BTreeMap<String, DockerAuthEntry>) -> Result<Self, AuthError> {
        let mut out = Credentials::new();
        for (key, entry) in auths {
            let host = normalize_host(&key);
            let cred = if let Some(token) = entry.registry_token.filter(|t| !t.is_empty()) {
                Credential::Bearer(token)
            } else if let (Some(u), Some(p)) = (&entry.username, &entry.password) {
                Credential::Basic {
                    username: u.clone(),
                    password: p.clone(),
                }
            } else if let Some(auth) = entry.auth.filter(|a| !a.is_empty()) {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(auth.trim())
                    .map_err(|_| AuthError::BadAuthField { host: host.clone() })?;
                let text = String::from_utf8(decoded)
                    .map_err(|_| AuthError::BadAuthField { host: host.clone() })?;
                let (u, p) = text
                    .split_once(':')
                    .ok_or_else(|| AuthError::BadAuthField { host: host.clone() })?;
                Credential::Basic {
                    username: u.to_string(),
                    password: p.to_string(),
                }
            } else if let Some(token) = entry.identity_token.filter(|t| !t.is_empty()) {
                // An identity token is a refresh token; registries accepting it as a static
                // bearer token are the common case this supports.
                Credential::Bearer(token)
            } else {
                continue;
            };
            out.by_host.insert(host, cred);
        }
        Ok(out)
    }

    /// Reads a docker `config.json` file.
    pub fn from_docker_config_file(path: &Path) -> Result<Self, AuthError> {
        let bytes = std::fs::read(path).map_err(|source| AuthError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_docker_config_json(&bytes)
    }

    /// Parses the `data` of a `kubernetes.io/dockerconfigjson` secret (values already
    /// base64-decoded, as a Kubernetes client hands them out). The legacy
    /// `kubernetes.io/dockercfg` form (`.dockercfg`, the `auths` map without the wrapper) is
    /// accepted too.
    pub fn from_k8s_secret_data(data: &BTreeMap<String, Vec<u8>>) -> Result<Self, AuthError> {
        if let Some(json) = data.get(".dockerconfigjson") {
            return Self::from_docker_config_json(json);
        }
        if let Some(json) = data.get(".dockercfg") {
            let auths: BTreeMap<String, DockerAuthEntry> =
                serde_json::from_slice(json).map_err(|source| AuthError::Json {
                    what: ".dockercfg".into(),
                    source,
                })?;
            return Self::from_auths(auths);
        }
        Err(AuthError::MissingSecretKey)
    }
}

/// Credentials learned from image pulls (kubelet sends the pull secret's credential with
/// every CRI `PullImage`), per registry host and repository, never per host alone: a
/// credential is only ever used for the repository it was sent for.
///
/// A credential is *offered* when its pull starts and *confirmed* when containerd answers
/// the pull with success; a failed pull withdraws it. A lookup prefers confirmed
/// credentials (the one that last worked first) and uses an offered one only while its
/// repository has none confirmed (the lazy mounts of that very pull need it), so a pull
/// with a wrong secret never replaces one that works. Memory only, bounded in repositories
/// and in credentials per repository; a credential not confirmed again within the time to
/// live is forgotten.
pub struct LearnedCredentials {
    max_repositories: usize,
    ttl: Duration,
    inner: Mutex<Learned>,
}

/// Confirmed credentials kept per repository (the ones that worked last).
const CONFIRMED_PER_REPO: usize = 3;
/// Credentials of pulls in flight kept per repository.
const OFFERED_PER_REPO: usize = 4;

#[derive(Default)]
struct Learned {
    by_repo: HashMap<(String, String), RepoCredentials>,
    next_offer: u64,
}

#[derive(Default)]
struct RepoCredentials {
    /// Most recently confirmed first.
    confirmed: Vec<LearnedEntry>,
    /// Of pulls in flight, oldest first, with their offer ids.
    offered: Vec<(u64, LearnedEntry)>,
}

impl RepoCredentials {
    fn touched(&self) -> Option<Instant> {
        let c = self.confirmed.iter().map(|e| e.refreshed);
        c.chain(self.offered.iter().map(|(_, e)| e.refreshed)).max()
    }
}

#[derive(Clone)]
struct LearnedEntry {
    credential: Credential,
    refreshed: Instant,
}

/// A credential offered by a pull in flight; give it back to
/// [`LearnedCredentials::confirm`] or [`LearnedCredentials::withdraw`].
#[derive(Debug)]
pub struct Offer {
    key: (String, String),
    id: u64,
}

impl LearnedCredentials {
    pub fn new(max_repositories: usize, ttl: Duration) -> Self {
        LearnedCredentials {
            max_repositories: max_repositories.max(1),
            ttl,
            inner: Mutex::new(Learned::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Learned> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Offers the credential of a pull of `repository` on `host` that is starting.
    /// Anonymous pulls offer nothing.
    pub fn offer(&self, host: &str, repository: &str, credential: Credential) -> Option<Offer> {
        if credential == Credential::Anonymous {
            return None;
        }
        let key = (normalize_host(host), repository.to_string());
        let now = Instant::now();
        let mut g = self.lock();
        let ttl = self.ttl;
        g.by_repo.retain(|_, r| {
            r.confirmed
                .retain(|e| now.duration_since(e.refreshed) <= ttl);
            r.offered
                .retain(|(_, e)| now.duration_since(e.refreshed) <= ttl);
            !r.confirmed.is_empty() || !r.offered.is_empty()
        });
        g.next_offer += 1;
        let id = g.next_offer;
        let r = g.by_repo.entry(key.clone()).or_default();
        r.offered.push((
            id,
            LearnedEntry {
                credential,
                refreshed: now,
            },
        ));
        if r.offered.len() > OFFERED_PER_REPO {
            r.offered.remove(0);
        }
        // Bounded: the least recently touched repositories go first.
        while g.by_repo.len() > self.max_repositories {
            let Some(oldest) = g
                .by_repo
                .iter()
                .min_by_key(|(_, r)| r.touched())
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            g.by_repo.remove(&oldest);
        }
        Some(Offer { key, id })
    }

    /// The pull of `offer` succeeded: its credential becomes the repository's first.
    /// Returns whether it differs from the one that worked last (new or rotated).
    pub fn confirm(&self, offer: Offer) -> bool {
        let mut g = self.lock();
        let Some(r) = g.by_repo.get_mut(&offer.key) else {
            return false;
        };
        let Some(pos) = r.offered.iter().position(|(id, _)| *id == offer.id) else {
            return false;
        };
        let (_, mut entry) = r.offered.remove(pos);
        entry.refreshed = Instant::now();
        let changed = r
            .confirmed
            .first()
            .is_none_or(|e| e.credential != entry.credential);
        r.confirmed.retain(|e| e.credential != entry.credential);
        r.confirmed.insert(0, entry);
        r.confirmed.truncate(CONFIRMED_PER_REPO);
        debug!(host = %offer.key.0, repository = %offer.key.1, changed, "pull credential confirmed");
        changed
    }

    /// The pull of `offer` failed: its credential is not kept.
    pub fn withdraw(&self, offer: Offer) {
        let mut g = self.lock();
        if let Some(r) = g.by_repo.get_mut(&offer.key) {
            r.offered.retain(|(id, _)| *id != offer.id);
            if r.confirmed.is_empty() && r.offered.is_empty() {
                g.by_repo.remove(&offer.key);
            }
        }
    }

    /// Repositories with a credential.
    pub fn len(&self) -> usize {
        self.lock().by_repo.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl CredentialSource for LearnedCredentials {
    fn lookup(&self, host: &str, repository: &str) -> Option<Credential> {
        let g = self.lock();
        let fresh = |e: &&LearnedEntry| e.refreshed.elapsed() <= self.ttl;
        let r = g.by_repo.get(&(host.to_string(), repository.to_string()))?;
        r.confirmed
            .iter()
            .find(fresh)
            .or_else(|| r.offered.iter().rev().map(|(_, e)| e).find(fresh))
            .map(|e| e.credential.clone())
    }
}

/// A docker `config.json` read again when it changes (checked at most every
/// [`DockerConfigFile::CHECK_EVERY`]), e.g. a mounted secret that Kubernetes updates.
pub struct DockerConfigFile {
    path: PathBuf,
    state: Mutex<FileState>,
}

struct FileState {
    credentials: Credentials,
    /// Modification time and length of the version read.
    stamp: Option<(SystemTime, u64)>,
    checked: Instant,
}

impl DockerConfigFile {
    pub const CHECK_EVERY: Duration = Duration::from_secs(2);

    /// Reads the file; an unreadable or malformed file is an error here (later changes that
    /// do not parse are logged and the last good version kept).
    pub fn open(path: &Path) -> Result<Self, AuthError> {
        let stamp = file_stamp(path).map_err(|source| AuthError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let credentials = Credentials::from_docker_config_file(path)?;
        Ok(DockerConfigFile {
            path: path.to_path_buf(),
            state: Mutex::new(FileState {
                credentials,
                stamp: Some(stamp),
                checked: Instant::now(),
            }),
        })
    }

    fn refresh(&self, st: &mut FileState) {
        st.checked = Instant::now();
        let stamp = match file_stamp(&self.path) {
            Ok(s) => Some(s),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                warn!(path = %self.path.display(), error = %e, "docker config unreadable; keeping the last version");
                return;
            }
        };
        if stamp == st.stamp {
            return;
        }
        match stamp {
            None => {
                debug!(path = %self.path.display(), "docker config removed");
                st.credentials = Credentials::default();
                st.stamp = None;
            }
            Some(_) => match Credentials::from_docker_config_file(&self.path) {
                Ok(c) => {
                    debug!(path = %self.path.display(), "docker config changed; reloaded");
                    st.credentials = c;
                    st.stamp = stamp;
                }
                Err(e) => {
                    warn!(path = %self.path.display(), error = %e, "docker config does not parse; keeping the last version");
                    // Not retried until the file changes again.
                    st.stamp = stamp;
                }
            },
        }
    }
}

fn file_stamp(path: &Path) -> std::io::Result<(SystemTime, u64)> {
    let md = std::fs::metadata(path)?;
    Ok((md.modified()?, md.len()))
}

impl CredentialSource for DockerConfigFile {
    fn lookup(&self, host: &str, repository: &str) -> Option<Credential> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.checked.elapsed() >= Self::CHECK_EVERY {
            self.refresh(&mut st);
        }
        match st.credentials.resolve(host, repository) {
            Credential::Anonymous => None,
            c => Some(c),
        }
    }
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Challenge {
    /// Lower-cased scheme: `basic` or `bearer`.
    pub scheme: String,
    /// Parameters (`realm`, `service`, `scope`, ...), keys lower-cased.
    pub params: BTreeMap<String, String>,
}

/// Parses one challenge (`Bearer realm="...",service="...",scope="..."`). Only the first
/// challenge of the header is read; registries send one.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = match header.split_once(char::is_whitespace) {
        Some((s, r)) => (s, r),
        None => (header, ""),
    };
    if scheme.is_empty() {
        return None;
    }
    let mut params = BTreeMap::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace() || *c == ',') {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c == ',' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        if key.is_empty() {
            break;
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek() != Some(&'=') {
            // A token68 or a bare word: not a parameter we use.
            continue;
        }
        chars.next();
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        if let Some(n) = chars.next() {
                            value.push(n);
                        }
                    }
                    '"' => break,
                    _ => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                value.push(c);
                chars.next();
            }
            value = value.trim().to_string();
        }
        params.insert(key.to_ascii_lowercase(), value);
    }
    Some(Challenge {
        scheme: scheme.to_ascii_lowercase(),
        params,
    })
}

/// `Authorization` header value for basic credentials.
pub fn basic_header(username: &str, password: &str) -> String {
    let raw = format!("{username}:{password}");
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_config_auth_field_and_hub_alias() {
        let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cr:et");
        let json = format!(
            r#"{{"auths":{{"https://index.docker.io/v1/":{{"auth":"{auth}"}},
                 "reg.example:5000":{{"username":"bob","password":"pw"}},
                 "tok.example":{{"registrytoken":"T"}}, "empty.example":{{}}}}}}"#
        );
        let c = Credentials::from_docker_config_json(json.as_bytes()).unwrap();
        assert_eq!(
            c.get("docker.io"),
            Credential::Basic {
                username: "alice".into(),
                password: "s3cr:et".into()
            }
        );
        assert_eq!(
            c.get("REG.example:5000"),
            Credential::Basic {
                username: "bob".into(),
                password: "pw".into()
            }
        );
        assert_eq!(c.get("tok.example"), Credential::Bearer("T".into()));
        assert_eq!(c.get("empty.example"), Credential::Anonymous);
        assert_eq!(c.get("other"), Credential::Anonymous);
    }

    #[test]
    fn bad_auth_field_is_an_error_not_a_panic() {
        let json = r#"{"auths":{"h":{"auth":"!!!"}}}"#;
        assert!(matches!(
            Credentials::from_docker_config_json(json.as_bytes()),
            Err(AuthError::BadAuthField { .. })
        ));
        let nocolon = base64::engine::general_purpose::STANDARD.encode("nocolon");
        let json = format!(r#"{{"auths":{{"h":{{"auth":"{nocolon}"}}}}}}"#);
        assert!(Credentials::from_docker_config_json(json.as_bytes()).is_err());
        assert!(Credentials::from_docker_config_json(b"not json").is_err());
    }

    #[test]
    fn k8s_secret_data() {
        let mut data = BTreeMap::new();
        data.insert(
            ".dockerconfigjson".to_string(),
            br#"{"auths":{"r.io":{"username":"u","password":"p"}}}"#.to_vec(),
        );
        let c = Credentials::from_k8s_secret_data(&data).unwrap();
        assert!(matches!(c.get("r.io"), Credential::Basic { .. }));
        let mut legacy = BTreeMap::new();
        legacy.insert(
            ".dockercfg".to_string(),
            br#"{"r.io":{"username":"u","password":"p"}}"#.to_vec(),
        );
        assert!(matches!(
            Credentials::from_k8s_secret_data(&legacy)
                .unwrap()
                .get("r.io"),
            Credential::Basic { .. }
        ));
        assert!(matches!(
            Credentials::from_k8s_secret_data(&BTreeMap::new()),
            Err(AuthError::MissingSecretKey)
        ));
    }

    #[test]
    fn challenge_parsing() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#,
        )
        .unwrap();
        assert_eq!(c.scheme, "bearer");
        assert_eq!(c.params["realm"], "https://auth.example/token");
        assert_eq!(c.params["scope"], "repository:a/b:pull,push");
        let b = parse_challenge(r#"Basic realm="Registry Realm""#).unwrap();
        assert_eq!(b.scheme, "basic");
        assert_eq!(b.params["realm"], "Registry Realm");
        assert!(parse_challenge("").is_none());
        // Malformed input must not panic.
        let _ = parse_challenge(r#"Bearer realm="unterminated"#);
        let _ = parse_challenge("Bearer ,,,=,==\"");
    }

    fn basic(p: &str) -> Credential {
        Credential::Basic {
            username: "u".into(),
            password: p.into(),
        }
    }

    #[test]
    fn learned_credentials_per_repository_confirmed_first_bounded_and_expiring() {
        let l = LearnedCredentials::new(2, Duration::from_secs(3600));
        assert!(l.offer("r.io", "a", Credential::Anonymous).is_none());
        assert!(l.is_empty());
        // An offered credential serves its repository until one is confirmed.
        let o1 = l.offer("https://R.io", "a", basic("1")).unwrap();
        assert_eq!(l.lookup("r.io", "a"), Some(basic("1")));
        assert!(l.confirm(o1));
        let again = l.offer("r.io", "a", basic("1")).unwrap();
        assert!(!l.confirm(again), "same credential");
        // A pull with a wrong secret neither replaces the working one nor stays.
        let bogus = l.offer("r.io", "a", basic("bogus")).unwrap();
        assert_eq!(l.lookup("r.io", "a"), Some(basic("1")), "confirmed first");
        l.withdraw(bogus);
        assert_eq!(l.lookup("r.io", "a"), Some(basic("1")));
        // Never for another repository, not even on the same host.
        assert_eq!(l.lookup("r.io", "other"), None);
        assert_eq!(l.lookup("x.io", "a"), None);
        // A rotated credential that worked goes first.
        let o2 = l.offer("r.io", "a", basic("2")).unwrap();
        assert!(l.confirm(o2));
        assert_eq!(l.lookup("r.io", "a"), Some(basic("2")));
        // A failed pull of an unknown repository leaves nothing.
        let lone = l.offer("r.io", "b", basic("9")).unwrap();
        l.withdraw(lone);
        assert_eq!(l.len(), 1);
        // Bounded in repositories: the least recently touched goes.
        l.offer("r.io", "b", basic("3")).map(|o| l.confirm(o));
        l.offer("s.io", "c", basic("4")).map(|o| l.confirm(o));
        assert_eq!(l.len(), 2);
        assert_eq!(l.lookup("r.io", "a"), None);
        let expired = LearnedCredentials::new(8, Duration::ZERO);
        let o = expired.offer("r.io", "a", basic("1")).unwrap();
        expired.confirm(o);
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(expired.lookup("r.io", "a"), None);
    }

    #[test]
    fn sources_come_first_and_docker_config_file_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(
            &path,
            r#"{"auths":{"r.io":{"username":"u","password":"1"}}}"#,
        )
        .unwrap();
        let file = Arc::new(DockerConfigFile::open(&path).unwrap());
        let learned = Arc::new(LearnedCredentials::new(8, Duration::from_secs(60)));
        let mut stat = Credentials::new();
        stat.insert("r.io", basic("static"));
        stat.insert("z.io", basic("z"));
        let creds = stat.with_source(learned.clone()).with_source(file.clone());
        assert_eq!(creds.resolve("r.io", "a"), basic("1"), "file before static");
        assert_eq!(creds.resolve("z.io", "a"), basic("z"));
        let offer = learned.offer("r.io", "a", basic("pulled")).unwrap();
        learned.confirm(offer);
        assert_eq!(creds.resolve("r.io", "a"), basic("pulled"));
        // Per repository only: another repository on the host gets the next source's.
        assert_eq!(creds.resolve("r.io", "b"), basic("1"));
        // The file changes (size differs): read again after the check interval.
        std::fs::write(
            &path,
            r#"{"auths":{"q.io":{"username":"u","password":"22"}}}"#,
        )
        .unwrap();
        file.state.lock().unwrap().checked -= DockerConfigFile::CHECK_EVERY;
        assert_eq!(file.lookup("q.io", "a"), Some(basic("22")));
        assert_eq!(file.lookup("r.io", "a"), None);
        // A broken file keeps the last good version.
        std::fs::write(&path, "not json at all, longer").unwrap();
        file.state.lock().unwrap().checked -= DockerConfigFile::CHECK_EVERY;
        assert_eq!(file.lookup("q.io", "a"), Some(basic("22")));
        assert!(DockerConfigFile::open(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn debug_hides_secrets() {
        let s = format!(
            "{:?}",
            Credential::Basic {
                username: "u".into(),
                password: "hunter2".into()
            }
        );
        assert!(!s.contains("hunter2"));
    }
}
