//! A private containerd (Debian's 1.6) with runc: own root, state and socket in a temp dir,
//! and its own namespace so runc state never collides with another instance.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::process::{Proc, kill_processes_mentioning, run, run_ok, unmount_under};
use crate::{EnvError, tool};

const READY_TIMEOUT: Duration = Duration::from_secs(60);
const CTR_TIMEOUT: Duration = Duration::from_secs(120);
static SEQ: AtomicU32 = AtomicU32::new(0);

/// How to start containerd.
#[derive(Debug, Clone, Default)]
pub struct ContainerdOptions {
    /// TOML appended to the generated config (version 2), e.g. a `[proxy_plugins.NAME]` table
    /// registering a snapshotter.
    pub extra_config: String,
    /// Keep the CRI plugin (off by default: nothing here speaks CRI, and it adds startup time
    /// and CNI errors).
    pub enable_cri: bool,
}

/// A running containerd. Dropping it kills its containers, shims and daemon, unmounts what is
/// left under its dirs and removes them.
pub struct Containerd {
    proc: Option<Proc>,
    dir: TempDir,
    socket: PathBuf,
    namespace: String,
}

impl Containerd {
    /// Starts containerd with the default options.
    pub fn start() -> Result<Containerd, EnvError> {
        Containerd::start_with(ContainerdOptions::default())
    }

    /// Starts containerd with `extra_config` appended to its config.
    pub fn start_with_config(extra_config: &str) -> Result<Containerd, EnvError> {
        Containerd::start_with(ContainerdOptions {
            extra_config: extra_config.to_string(),
            ..Default::default()
        })
    }

    /// Starts containerd and blocks until `ctr version` answers.
    pub fn start_with(opts: ContainerdOptions) -> Result<Containerd, EnvError> {
        let bin = tool("containerd")?;
        tool("runc")?;
        tool("containerd-shim-runc-v2")?;
        // Short prefix: the socket path must fit in sun_path (108 bytes).
        let dir = tempfile::Builder::new()
            .prefix("tlr-ctd-")
            .tempdir()
            .map_err(|e| EnvError::io("creating the containerd temp dir", e))?;
        let root = dir.path().join("root");
        let state = dir.path().join("state");
        for d in [&root, &state] {
            std::fs::create_dir_all(d)
                .map_err(|e| EnvError::io(format!("creating {}", d.display()), e))?;
        }
        let socket = dir.path().join("containerd.sock");
        let disabled = if opts.enable_cri {
            ""
        } else {
            "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n"
        };
        let config = format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n{disabled}\n\
             [grpc]\n  address = \"{sock}\"\n\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n\n\
             [debug]\n  level = \"info\"\n\n\
             [plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{root}/opt\"\n\n{extra}\n",
            root = root.display(),
            state = state.display(),
            sock = socket.display(),
            extra = opts.extra_config,
        );
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, config)
            .map_err(|e| EnvError::io(format!("writing {}", config_path.display()), e))?;
        let mut cmd = Command::new(bin);
        cmd.arg("--config").arg(&config_path);
        let log = dir.path().join("containerd.log");
        let mut proc = Proc::spawn("containerd", cmd, &log)?;
        let namespace = format!(
            "talaria-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let mut c = Containerd {
            proc: None,
            dir,
            socket,
            namespace,
        };
        let started = Instant::now();
        loop {
            proc.check_alive()?;
            if c.socket.exists() {
                let mut v = c.ctr_command();
                v.arg("version");
                if run(v, Duration::from_secs(5)).is_ok_and(|o| o.status.success()) {
                    break;
                }
            }
            if started.elapsed() > READY_TIMEOUT {
                return Err(proc.timeout("`ctr version` answering", READY_TIMEOUT));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        c.proc = Some(proc);
        Ok(c)
    }

    /// The gRPC socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The containerd namespace `ctr` helpers use (unique per instance).
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// containerd's root dir (content store, snapshots).
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// The temp dir holding everything of this instance.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("containerd.log")
    }

    /// `ctr --address SOCK --namespace NS` ready for more arguments.
    pub fn ctr_command(&self) -> Command {
        let mut c = Command::new(tool("ctr").unwrap_or_else(|_| PathBuf::from("ctr")));
        c.arg("--address")
            .arg(&self.socket)
            .arg("--namespace")
            .arg(&self.namespace);
        c
    }

    /// Runs `ctr ARGS...` (time-limited); a non-zero exit is an error with ctr's stderr.
    pub fn ctr(&self, args: &[&str]) -> Result<Output, EnvError> {
        let mut c = self.ctr_command();
        c.args(args);
        run_ok(c, CTR_TIMEOUT)
    }

    /// Like [`Containerd::ctr`], returning stdout as text.
    pub fn ctr_stdout(&self, args: &[&str]) -> Result<String, EnvError> {
        Ok(String::from_utf8_lossy(&self.ctr(args)?.stdout).into_owned())
    }

    /// Imports an OCI layout directory as image `name` (e.g. "docker.io/library/busybox"):
    /// the layout's tag is appended (`name:latest`). Returns the full image name.
    pub fn import_layout(&self, layout: &Path, name: &str) -> Result<String, EnvError> {
        let tar = self.dir.path().join(format!(
            "import-{}.tar",
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        crate::images::layout_to_tar(layout, &tar)?;
        let tar_s = tar.to_string_lossy().into_owned();
        let res = self.ctr(&["images", "import", "--base-name", name, &tar_s]);
        let _ = std::fs::remove_file(&tar);
        let out = res?;
        let text = String::from_utf8_lossy(&out.stdout);
        let imported = text
            .lines()
            .find_map(|l| l.strip_prefix("unpacking "))
            .and_then(|l| l.split_whitespace().next())
            .map(str::to_string);
        match imported {
            Some(n) => Ok(n),
            None => Ok(format!("{name}:latest")),
        }
    }

    /// Pulls (and unpacks) `reference` from a plain-HTTP registry such as
    /// [`crate::registry::Registry`], e.g. "127.0.0.1:5000/repo:tag".
    pub fn pull_plain_http(&self, reference: &str) -> Result<(), EnvError> {
        self.ctr(&["images", "pull", "--plain-http", reference])
            .map(|_| ())
    }

    fn cleanup_tasks(&self) {
        let mut ls = self.ctr_command();
        ls.args(["tasks", "ls", "-q"]);
        let Ok(out) = run(ls, Duration::from_secs(10)) else {
            return;
        };
        for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let mut kill = self.ctr_command();
            kill.args(["tasks", "kill", "--all", "--signal", "SIGKILL", id]);
            let _ = run(kill, Duration::from_secs(10));
            let mut del = self.ctr_command();
            del.args(["tasks", "delete", "--force", id]);
            let _ = run(del, Duration::from_secs(10));
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if self.proc.is_some() {
            self.cleanup_tasks();
        }
        // Proc's Drop prints the log tail when panicking and stops the daemon.
        drop(self.proc.take());
        // Shims detach from containerd's process group but carry our socket path.
        kill_processes_mentioning(&self.socket.to_string_lossy());
        unmount_under(self.dir.path());
        let runc_state = Path::new("/run/containerd/runc").join(&self.namespace);
        let _ = std::fs::remove_dir_all(runc_state);
    }
}
