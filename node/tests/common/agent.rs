//! The talaria-node binary as a separately killable process on its own root and socket (the
//! tests of restarts and takeovers), and the fd holder it hands its FUSE connections to.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The talaria-node binary on `root`, serving `socket`; stopped (and its log tail printed on
/// a failing test) when dropped, with whatever it left mounted under its root.
pub struct Agent {
    child: Option<Child>,
    pub root: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    pub args: Vec<String>,
    /// The binary (another build of talaria-node for an upgrade).
    pub bin: PathBuf,
}

impl Agent {
    /// An agent on `dir/root` serving `dir/talaria.sock`, using artifacts among registry
    /// referrers (these tests publish them that way, with no cluster).
    pub fn start(dir: &Path, args: &[String]) -> Agent {
        let mut a = Agent::new(dir, args);
        a.spawn();
        a
    }

    /// As [`Agent::start`], not started yet.
    pub fn new(dir: &Path, args: &[String]) -> Agent {
        Agent {
            child: None,
            root: dir.join("root"),
            socket: dir.join("talaria.sock"),
            log: dir.join("node.log"),
            args: args.to_vec(),
            bin: PathBuf::from(env!("CARGO_BIN_EXE_talaria-node")),
        }
    }

    /// The command [`Agent::spawn`] runs.
    pub fn command(&self) -> Command {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open node log");
        let mut c = Command::new(&self.bin);
        c.arg("--root")
            .arg(&self.root)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--log")
            .arg("talaria_node=debug,info")
            .arg("--unverified-referrers")
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        c
    }

    /// Starts the agent; returns once it serves its socket.
    pub fn spawn(&mut self) {
        // A killed agent leaves its socket file: readiness is a fresh one answering.
        let _ = fs::remove_file(&self.socket);
        let child = self.command().spawn().expect("spawn talaria-node");
        self.child = Some(child);
        let started = Instant::now();
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            if let Some(status) = self.child_mut().try_wait().expect("try_wait") {
                panic!("talaria-node exited with {status}:\n{}", self.log_tail(60));
            }
            assert!(
                started.elapsed() < START_TIMEOUT,
                "talaria-node did not serve {} within {START_TIMEOUT:?}:\n{}",
                self.socket.display(),
                self.log_tail(60)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("node is running")
    }

    pub fn pid(&mut self) -> u32 {
        self.child_mut().id()
    }

    pub fn log_tail(&self, n: usize) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    pub fn kill(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("node is running");
        c.kill().expect("SIGKILL talaria-node");
        c.wait().expect("reap talaria-node")
    }

    /// SIGTERM, and waits for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("node is running");
        terminate(&mut c, Duration::from_secs(30)).expect("talaria-node ignored SIGTERM")
    }

    /// Lines of /proc/self/mountinfo of FUSE mounts under the agent's root.
    pub fn fuse_mounts(&self) -> Vec<String> {
        let root = self.root.to_string_lossy().into_owned();
        fs::read_to_string("/proc/self/mountinfo")
            .expect("mountinfo")
            .lines()
            .filter(|l| {
                let point = l.split(' ').nth(4).unwrap_or("");
                let fstype = l.split(" - ").nth(1).unwrap_or("");
                point.starts_with(&root) && fstype.starts_with("fuse")
            })
            .map(str::to_string)
            .collect()
    }
}

/// SIGTERM to `c`, then its exit status within `wait` (`None`: still running).
fn terminate(c: &mut Child, wait: Duration) -> Option<ExitStatus> {
    let _ = Command::new("kill")
        .args(["-s", "TERM", &c.id().to_string()])
        .status();
    let deadline = Instant::now() + wait;
    loop {
        if let Ok(Some(s)) = c.try_wait() {
            return Some(s);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGTERM first: without a holder the agent unmounts its layers on a clean stop.
            if terminate(&mut c, Duration::from_secs(10)).is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        // Whatever is still mounted under the root (a killed agent's layers, or layers left
        // to a holder) goes too.
        talaria_testenv::unmount_under(&self.root);
        super::keep_node_log(&self.root, &self.log);
        if std::thread::panicking() {
            eprintln!(
                "--- talaria-node log (last lines) ---\n{}",
                self.log_tail(80)
            );
        }
    }
}

/// The `talaria-fuse-holder` binary on `dir/holder.sock`; killed when dropped.
pub struct FdHolder {
    child: Child,
    pub socket: PathBuf,
    log: PathBuf,
}

impl FdHolder {
    pub fn start(dir: &Path) -> FdHolder {
        let socket = dir.join("holder.sock");
        let log = dir.join("holder.log");
        let _ = fs::remove_file(&socket);
        let child = Command::new(env!("CARGO_BIN_EXE_talaria-fuse-holder"))
            .arg("--socket")
            .arg(&socket)
            .arg("--log")
            .arg("debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).expect("holder log"))
            .spawn()
            .expect("spawn talaria-fuse-holder");
        let started = Instant::now();
        while !socket.exists() {
            assert!(
                started.elapsed() < START_TIMEOUT,
                "talaria-fuse-holder did not bind {}",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        FdHolder { child, socket, log }
    }

    /// `--fuse-holder-socket` for an agent.
    pub fn agent_args(&self) -> Vec<String> {
        vec![
            "--fuse-holder-socket".into(),
            self.socket.display().to_string(),
        ]
    }

    /// Resident memory (`VmRSS`) in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status =
            fs::read_to_string(format!("/proc/{}/status", self.child.id())).expect("holder status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmRSS")
    }

    /// Open file descriptors.
    pub fn fds(&self) -> usize {
        fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .expect("holder fds")
            .count()
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for FdHolder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- fd holder log ---\n{}", self.log_text());
        }
    }
}
