//! Helpers shared by the node benchmarks: a talaria-node process on a fresh root, its
//! metrics page, registry storage hard-linking, and run statistics.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

const NODE_START_TIMEOUT: Duration = Duration::from_secs(30);

/// The talaria-node binary on a fresh root; stopped with SIGTERM (it unmounts its FUSE
/// layers), anything left mounted is detached.
pub struct NodeProc {
    child: Child,
    root: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl NodeProc {
    pub fn start(bin: &Path, dir: &Path, args: &[String]) -> Result<NodeProc> {
        let root = dir.join("root");
        let socket = dir.join("talaria.sock");
        let log = dir.join("node.log");
        let log_file = std::fs::File::create(&log).context("node log")?;
        let child = Command::new(bin)
            .arg("--root")
            .arg(&root)
            .arg("--socket")
            .arg(&socket)
            // The benchmarks publish artifacts as referrers, with no cluster.
            .arg("--unverified-referrers")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .context("spawn talaria-node")?;
        let mut node = NodeProc {
            child,
            root,
            socket,
            log,
        };
        wait_serving(&mut node.child, &node.socket, "talaria-node", &node.log)?;
        Ok(node)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        stop_and_unmount(&mut self.child, &self.root);
    }
}

/// Waits until `child` (named `what`, logging to `log`) accepts connections on `socket`;
/// fails with its log when it exits or is not serving within 30 s.
pub fn wait_serving(child: &mut Child, socket: &Path, what: &str, log: &Path) -> Result<()> {
    let log_text = || std::fs::read_to_string(log).unwrap_or_default();
    let t = Instant::now();
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        if let Some(status) = child.try_wait()? {
            bail!("{what} exited with {status}: {}", log_text());
        }
        ensure!(
            t.elapsed() < NODE_START_TIMEOUT,
            "{what} not serving after {NODE_START_TIMEOUT:?}: {}",
            log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Stops a snapshotter with SIGTERM (killed after 10 s) and detaches whatever is still
/// mounted under its root.
pub fn stop_and_unmount(child: &mut Child, root: &Path) {
    let _ = Command::new("kill")
        .args(["-s", "TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(10);
    while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    let root = root.to_string_lossy().into_owned();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    // Deepest first: a mount under another is detached before its parent.
    let mut points: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| p.starts_with(&root))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for point in points {
        let _ = nix::mount::umount2(point, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// `talaria-fuse-holder` on `dir/holder.sock`, as the chart runs it next to the agent;
/// killed when dropped (drop it after the agent).
pub struct HolderProc {
    child: Child,
    pub socket: PathBuf,
}

impl HolderProc {
    pub fn start(bin: &Path, dir: &Path) -> Result<HolderProc> {
        let socket = dir.join("holder.sock");
        let child = Command::new(bin)
            .arg("--socket")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawn talaria-fuse-holder")?;
        let holder = HolderProc { child, socket };
        let t = Instant::now();
        while !holder.socket.exists() {
            ensure!(
                t.elapsed() < NODE_START_TIMEOUT,
                "talaria-fuse-holder did not bind {}",
                holder.socket.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(holder)
    }

    /// The agent's flags to use it.
    pub fn node_args(&self) -> [String; 2] {
        [
            "--fuse-holder-socket".to_string(),
            self.socket.display().to_string(),
        ]
    }
}

impl Drop for HolderProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn http_get(addr: &str, path: &str) -> Result<String> {
    let mut s = std::net::TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut out = String::new();
    // Bounded: the node's metrics page is small.
    s.take(64 << 20).read_to_string(&mut out)?;
    Ok(out)
}

/// Hard-links a registry's storage tree into another's (same filesystem).
pub fn link_storage(from: &Path, to: &Path) -> Result<()> {
    let src = from.join("docker");
    let dst = to.join("docker");
    if dst.exists() {
        std::fs::remove_dir_all(&dst).with_context(|| format!("clear {}", dst.display()))?;
    }
    let out = Command::new("cp")
        .arg("-al")
        .arg(&src)
        .arg(to)
        .output()
        .context("run cp -al")?;
    ensure!(
        out.status.success(),
        "cp -al {} {}: {}",
        src.display(),
        to.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted
        .get(rank.clamp(1, sorted.len()) - 1)
        .copied()
        .unwrap_or(f64::NAN)
}

pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => v.get(n / 2).copied().unwrap_or(f64::NAN),
        _ => match (v.get(n / 2 - 1), v.get(n / 2)) {
            (Some(a), Some(b)) => (a + b) / 2.0,
            _ => f64::NAN,
        },
    }
}
