//! A real OCI registry: CNCF distribution 2.8 (Debian's `docker-registry`), plain HTTP,
//! filesystem storage in a temp dir, deletes enabled.

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
    _relay: Option<Relay>,
    netns: Option<Netns>,
    dir: TempDir,
    /// Address the registry listens on (inside the namespace when shaped).
    listen: SocketAddr,
    /// Address clients use.
    host: String,
}

impl Registry {
    /// Starts a registry on a free loopback port, blocking until `GET /v2/` answers 200.
    pub fn start() -> Result<Registry, EnvError> {
        let mut last = None;
        // A free port can be taken by a parallel test between probing and binding; retry.
        for _ in 0..3 {
            let port = free_port()?;
            let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            let mut reg = Registry::prepare(listen, listen.to_string(), None, None)?;
            match reg.start_again() {
                Ok(()) => return Ok(reg),
                Err(e) if e.to_string().contains("address already in use") => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| EnvError::Shaping("registry did not start".into())))
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
        reg.start_again()?;
        Ok(reg)
    }

    fn prepare(
        listen: SocketAddr,
        host: String,
        relay: Option<Relay>,
        netns: Option<Netns>,
    ) -> Result<Registry, EnvError> {
        let dir = tempfile::Builder::new()
            .prefix("talaria-registry-")
            .tempdir()
            .map_err(|e| EnvError::io("creating the registry temp dir", e))?;
        let storage = dir.path().join("storage");
        std::fs::create_dir_all(&storage)
            .map_err(|e| EnvError::io(format!("creating {}", storage.display()), e))?;
        let config = format!(
            "version: 0.1\n\
             log:\n  level: info\n  fields:\n    service: registry\n\
             storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n  \
             maintenance:\n    uploadpurging:\n      enabled: false\n\
             http:\n  addr: {listen}\n  secret: talaria-test-secret\n  headers:\n    X-Content-Type-Options: [nosniff]\n",
            storage = storage.display(),
        );
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config)
            .map_err(|e| EnvError::io(format!("writing {}", config_path.display()), e))?;
        Ok(Registry {
            proc: None,
            _relay: relay,
            netns,
            dir,
            listen,
            host,
        })
    }

    /// "IP:PORT" clients use (plain HTTP).
    pub fn host(&self) -> String {
        self.host.clone()
    }

    /// `http://IP:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.host)
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
        loop {
            proc.check_alive()?;
            if let Ok(r) =
                http::request(&self.host, "GET", "/v2/", &[], &[], Duration::from_secs(5))
                && r.status == 200
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
