//! A real OCI registry: CNCF distribution 2.8 (Debian's `docker-registry`), plain HTTP,
//! filesystem storage in a temp dir, deletes enabled; optionally private (HTTP basic auth
//! from an htpasswd file, as distribution's `htpasswd` auth does it).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::process::Proc;
use crate::relay::Relay;
use crate::shaping::Netns;
use crate::{EnvError, free_port, http, tool};

const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Port the registry uses inside its own network namespace (nothing else lives there).
const NS_REGISTRY_PORT: u16 = 5001;
const NS_PUBLIC_PORT: u16 = 5000;

/// A running registry. Dropping it stops the process and removes its storage.
pub struct Registry {
    // Field order is drop order: the process (which prints its log tail on panic) first,
    // then the relay and namespace, the files last.
    proc: Option<Proc>,
    /// Only kept alive: it serves from its own thread.
    relay: Option<Relay>,
    netns: Option<Netns>,
    dir: TempDir,
    /// Address the registry listens on (inside the namespace when shaped).
    listen: SocketAddr,
    /// Address clients use.
    host: String,
    /// (username, password) when the registry requires authentication.
    auth: Option<(String, String)>,
    /// (realm, root certificate bundle) when it requires tokens of a token server.
    token: Option<(String, PathBuf)>,
}

impl Registry {
    /// Starts a registry on a free loopback port, blocking until `GET /v2/` answers 200.
    pub fn start() -> Result<Registry, EnvError> {
        Registry::start_on(Ipv4Addr::LOCALHOST)
    }

    /// Like [`Registry::start`], listening on `ip` (e.g. a node address pods can reach).
    pub fn start_on(ip: Ipv4Addr) -> Result<Registry, EnvError> {
        let mut last = None;
        // A free port can be taken by a parallel test between probing and binding; retry.
        for _ in 0..3 {
            let port = free_port()?;
            let listen = SocketAddr::from((ip, port));
            let mut reg = Registry::prepare(listen, listen.to_string(), None, None)?;
            reg.write_config()?;
            match reg.start_again() {
                Ok(()) => return Ok(reg),
                Err(e) if e.to_string().contains("address already in use") => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| EnvError::Shaping("registry did not start".into())))
    }

    /// Starts a private registry: every request needs HTTP basic auth as `username` with
    /// `password` (anonymous ones get 401 with a `Basic` challenge).
    pub fn start_with_auth(username: &str, password: &str) -> Result<Registry, EnvError> {
        let mut reg = Registry::start()?;
        reg.set_auth(Some((username, password)))?;
        Ok(reg)
    }

    /// Turns authentication on (`Some((username, password))`) or off, restarting the process
    /// on the same address and storage. Handy to fill a registry anonymously, then make it
    /// private.
    pub fn set_auth(&mut self, auth: Option<(&str, &str)>) -> Result<(), EnvError> {
        self.auth = auth.map(|(u, p)| (u.to_string(), p.to_string()));
        self.write_config()?;
        self.start_again()
    }

    /// Requires bearer tokens from `server` (distribution's `auth: token` mode), restarting
    /// the process on the same address and storage; replaces basic authentication. Call it
    /// again after [`crate::tokenauth::TokenServer::rotate_key`] to trust the new key.
    pub fn set_token_auth(
        &mut self,
        server: &crate::tokenauth::TokenServer,
    ) -> Result<(), EnvError> {
        self.auth = None;
        self.token = Some((server.realm(), server.root_cert_bundle()));
        self.write_config()?;
        self.start_again()
    }

    /// (username, password) of a private registry.
    pub fn auth(&self) -> Option<(&str, &str)> {
        self.auth.as_ref().map(|(u, p)| (u.as_str(), p.as_str()))
    }

    /// A docker `config.json` (also the `.dockerconfigjson` of a Kubernetes secret) with this
    /// registry's credentials; `{"auths":{}}` for an open registry.
    pub fn docker_config_json(&self) -> String {
        let mut auths = serde_json::Map::new();
        if let Some((u, p)) = &self.auth {
            auths.insert(
                self.host.clone(),
                serde_json::json!({"username": u, "password": p}),
            );
        }
        serde_json::json!({ "auths": auths }).to_string()
    }

    /// Starts a registry in its own network namespace, behind a veth pair limited to
    /// `rate_mbit` in each direction and a relay adding `delay_ms` of round-trip time
    /// (see [`crate::relay`]: this kernel has no netem). [`Registry::host`] is then
    /// `10.213.N.2:5000`, reachable only from this machine.
    pub fn start_shaped(rate_mbit: u32, delay_ms: u32) -> Result<Registry, EnvError> {
        let netns = Netns::create(rate_mbit)?;
        let public = SocketAddr::V4(SocketAddrV4::new(netns.ns_ip(), NS_PUBLIC_PORT));
        let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, NS_REGISTRY_PORT));
        let relay = Relay::start(
            Some(&netns.name),
            public,
            listen,
            Duration::from_millis(u64::from(delay_ms)),
        )?;
        let mut reg = Registry::prepare(listen, public.to_string(), Some(relay), Some(netns))?;
        reg.write_config()?;
        reg.start_again()?;
        Ok(reg)
    }

    fn prepare(
        listen: SocketAddr,
        host: String,
        relay: Option<Relay>,
        netns: Option<Netns>,
    ) -> Result<Registry, EnvError> {
        // TALARIA_REGISTRY_DIR, when set, holds the registries' storage instead of the temp
        // dir: the startup bench keeps GiBs of images there, on disk, while its runs use a
        // tmpfs.
        let base = std::env::var_os("TALARIA_REGISTRY_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let dir = tempfile::Builder::new()
            .prefix("talaria-registry-")
            .tempdir_in(&base)
            .map_err(|e| {
                EnvError::io(format!("creating a registry dir in {}", base.display()), e)
            })?;
        let storage = dir.path().join("storage");
        std::fs::create_dir_all(&storage)
            .map_err(|e| EnvError::io(format!("creating {}", storage.display()), e))?;
        Ok(Registry {
            proc: None,
            relay,
            netns,
            dir,
            listen,
            host,
            auth: None,
            token: None,
        })
    }

    /// Writes `config.yml` (and the htpasswd file of a private registry).
    fn write_config(&self) -> Result<(), EnvError> {
        let storage = self.storage_dir();
        let mut config = format!(
            "version: 0.1\n\
             log:\n  level: info\n  fields:\n    service: registry\n\
             storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n  \
             maintenance:\n    uploadpurging:\n      enabled: false\n\
             http:\n  addr: {listen}\n  secret: talaria-test-secret\n  headers:\n    X-Content-Type-Options: [nosniff]\n",
            storage = storage.display(),
            listen = self.listen,
        );
        if let Some((user, password)) = &self.auth {
            // distribution only accepts bcrypt entries; the lowest cost keeps startup fast.
            let hash = bcrypt::hash(password, 4).map_err(|e| {
                EnvError::io("hashing the registry password", std::io::Error::other(e))
            })?;
            let path = self.dir.path().join("htpasswd");
            std::fs::write(&path, format!("{user}:{hash}\n"))
                .map_err(|e| EnvError::io(format!("writing {}", path.display()), e))?;
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: talaria-test\n    path: {}\n",
                path.display()
            ));
        } else if let Some((realm, bundle)) = &self.token {
            config.push_str(&format!(
                "auth:\n  token:\n    realm: {realm}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
                crate::tokenauth::SERVICE,
                crate::tokenauth::ISSUER,
                bundle.display()
            ));
        }
        let config_path = self.dir.path().join("config.yml");
        std::fs::write(&config_path, config)
            .map_err(|e| EnvError::io(format!("writing {}", config_path.display()), e))
    }

    /// "IP:PORT" clients use (plain HTTP).
    pub fn host(&self) -> String {
        self.host.clone()
    }

    /// `http://IP:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.host)
    }

    /// Bytes a shaped registry has sent over its link so far (`None` for an unshaped one).
    pub fn bytes_sent(&self) -> Option<u64> {
        self.relay.as_ref().map(Relay::bytes_down)
    }

    /// Where blobs and manifests are stored on disk.
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// The registry's log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("registry.log")
    }

    /// Stops the registry process (storage is kept), e.g. to test unavailability.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop();
        }
    }

    /// (Re)starts the process on the same address and storage; blocks until ready.
    pub fn start_again(&mut self) -> Result<(), EnvError> {
        self.stop();
        let bin = tool("docker-registry")?;
        let config = self.dir.path().join("config.yml");
        let cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new(tool("ip")?);
                c.args(["netns", "exec", &ns.name]).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let mut cmd = cmd;
        cmd.arg("serve").arg(&config);
        let mut proc = Proc::spawn("registry", cmd, &self.log_path())?;
        let started = Instant::now();
        let authorization = self.auth.as_ref().map(|(u, p)| basic_auth(u, p));
        let headers: Vec<(&str, &str)> = authorization
            .iter()
            .map(|a| ("Authorization", a.as_str()))
            .collect();
        loop {
            proc.check_alive()?;
            if let Ok(r) = http::request(
                &self.host,
                "GET",
                "/v2/",
                &headers,
                &[],
                Duration::from_secs(5),
            ) && (r.status == 200 || (self.token.is_some() && r.status == 401))
            {
                break;
            }
            if started.elapsed() > READY_TIMEOUT {
                return Err(proc.timeout("GET /v2/ -> 200", READY_TIMEOUT));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        tracing::debug!(host = %self.host, listen = %self.listen, "registry ready");
        self.proc = Some(proc);
        Ok(())
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(|p| p.check_alive().is_ok())
    }

    /// The temp dir holding config, storage and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// `Basic base64(user:password)`.
pub fn basic_auth(username: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64(format!("{username}:{password}").as_bytes())
    )
}

/// Standard base64 with padding (small inputs only: credentials).
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk.first().copied().unwrap_or(0),
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_known_vectors() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(basic_auth("user", "pass"), "Basic dXNlcjpwYXNz");
    }

    #[test]
    fn a_private_registry_refuses_anonymous_requests() {
        let mut reg = Registry::start_with_auth("talaria", "s3cret").expect("private registry");
        let t = Duration::from_secs(10);
        let anon = http::request(&reg.host(), "GET", "/v2/", &[], &[], t).expect("GET /v2/");
        assert_eq!(anon.status, 401);
        assert!(
            anon.header("www-authenticate")
                .is_some_and(|h| h.starts_with("Basic")),
            "{:?}",
            anon.headers
        );
        let wrong = basic_auth("talaria", "nope");
        let r = http::request(
            &reg.host(),
            "GET",
            "/v2/",
            &[("Authorization", &wrong)],
            &[],
            t,
        )
        .expect("GET /v2/ wrong password");
        assert_eq!(r.status, 401);
        let cfg: serde_json::Value =
            serde_json::from_str(&reg.docker_config_json()).expect("docker config json");
        assert_eq!(cfg["auths"][reg.host()]["username"], "talaria");
        // Back to open: anonymous requests pass again, on the same address.
        reg.set_auth(None).expect("open again");
        let anon = http::request(&reg.host(), "GET", "/v2/", &[], &[], t).expect("GET /v2/");
        assert_eq!(anon.status, 200);
    }
}
