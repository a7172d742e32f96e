//! Child processes that die with the test: own process group, killed in Drop, and a parent-
//! death signal so that even a SIGKILLed test process or a handle kept in a `static` (never
//! dropped) does not leave daemons behind.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::EnvError;

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, and test threads exit
/// after every test. All children are therefore forked by one thread that lives as long as the
/// process, so the signal means "the test process is gone".
fn spawner() -> &'static Mutex<mpsc::Sender<SpawnRequest>> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("talaria-testenv-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("spawning the process-spawner thread");
        Mutex::new(tx)
    })
}

fn spawn_via_spawner(mut cmd: Command) -> std::io::Result<Child> {
    cmd.process_group(0);
    // SAFETY: the closure runs between fork and exec and only calls prctl(2), which is
    // async-signal-safe; it touches no memory shared with the parent.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
        });
    }
    let (tx, rx) = mpsc::channel();
    {
        let sender = spawner()
            .lock()
            .map_err(|_| std::io::Error::other("spawner lock poisoned"))?;
        sender
            .send((cmd, tx))
            .map_err(|_| std::io::Error::other("spawner thread is gone"))?;
    }
    rx.recv()
        .map_err(|_| std::io::Error::other("spawner thread dropped the request"))?
}

/// A long-running component process writing stdout+stderr to a log file.
pub(crate) struct Proc {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    pub(crate) fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Proc, EnvError> {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| EnvError::io(format!("opening log {}", log.display()), e))?;
        let err = out
            .try_clone()
            .map_err(|e| EnvError::io("duplicating the log file handle", e))?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        tracing::debug!(component = name, command = ?cmd, "starting");
        let child =
            spawn_via_spawner(cmd).map_err(|e| EnvError::io(format!("starting {name}"), e))?;
        Ok(Proc {
            name: name.to_string(),
            child: Some(child),
            log: log.to_path_buf(),
        })
    }

    /// The process id while it has not been stopped.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// An error if the process has exited (with its log tail), Ok while it runs.
    pub(crate) fn check_alive(&mut self) -> Result<(), EnvError> {
        let Some(child) = self.child.as_mut() else {
            return Err(self.exited("stopped"));
        };
        match child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(self.exited(&status.to_string())),
            Err(e) => Err(EnvError::io(format!("checking {}", self.name), e)),
        }
    }

    fn exited(&self, status: &str) -> EnvError {
        EnvError::Exited {
            name: self.name.clone(),
            status: status.to_string(),
            log_tail: log_tail(&self.log, 40),
        }
    }

    pub(crate) fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }

    pub(crate) fn timeout(&self, what: &str, waited: Duration) -> EnvError {
        EnvError::Timeout {
            name: self.name.clone(),
            what: what.to_string(),
            waited,
            log_tail: self.log_tail(40),
        }
    }

    /// SIGTERM to the process group, SIGKILL after a grace period; always reaps.
    pub(crate) fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let Ok(raw) = i32::try_from(child.id()) else {
            let _ = child.kill();
            let _ = child.wait();
            return;
        };
        let pgid = Pid::from_raw(raw);
        let _ = killpg(pgid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= deadline => {
                    let _ = killpg(pgid, Signal::SIGKILL);
                    let _ = child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        // Helpers forked into the same group may outlive the leader.
        let _ = killpg(pgid, Signal::SIGKILL);
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- {} log tail ({}) ----\n{}\n---- end of {} log ----",
                self.name,
                self.log.display(),
                self.log_tail(60),
                self.name
            );
        }
        self.stop();
    }
}

/// The last `lines` lines of a log file (at most 64 KiB read).
pub(crate) fn log_tail(path: &Path, lines: usize) -> String {
    let read = || -> std::io::Result<String> {
        let mut f = File::open(path)?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    match read() {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

const MAX_OUTPUT: u64 = 64 * 1024 * 1024;

/// Runs a short command to completion with a time limit, capturing its output.
pub(crate) fn run(mut cmd: Command, timeout: Duration) -> Result<Output, EnvError> {
    let desc = describe(&cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child =
        spawn_via_spawner(cmd).map_err(|e| EnvError::io(format!("running `{desc}`"), e))?;
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let out_thread = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(p) = stdout {
            // Our commands print little; cap it anyway.
            let _ = p.take(MAX_OUTPUT).read_to_end(&mut buf);
        }
        buf
    });
    let err_thread = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(p) = stderr {
            let _ = p.take(MAX_OUTPUT).read_to_end(&mut buf);
        }
        buf
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                if let Ok(raw) = i32::try_from(child.id()) {
                    let _ = killpg(Pid::from_raw(raw), Signal::SIGKILL);
                }
                let _ = child.wait();
                return Err(EnvError::Command {
                    command: desc,
                    status: format!("timed out after {timeout:?}"),
                    stderr: String::new(),
                });
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(EnvError::io(format!("waiting for `{desc}`"), e)),
        }
    };
    let stdout = out_thread.join().unwrap_or_default();
    let stderr = err_thread.join().unwrap_or_default();
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// Like [`run`], but a non-zero exit is an error carrying stderr.
pub(crate) fn run_ok(cmd: Command, timeout: Duration) -> Result<Output, EnvError> {
    let desc = describe(&cmd);
    let out = run(cmd, timeout)?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(EnvError::Command {
            command: desc,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

pub(crate) fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// Lazily unmounts every mount point at or below `dir`, deepest first, so that a temp dir
/// holding leftover overlay/FUSE mounts can be removed.
pub fn unmount_under(dir: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mount_path(p)))
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        if let Err(e) = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH) {
            tracing::warn!(path = %p.display(), error = %e, "unmount failed");
        }
    }
}

/// mountinfo escapes space, tab, newline and backslash as \ooo octal.
fn unescape_mount_path(p: &str) -> String {
    let bytes = p.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(Ok(v)) = p.get(i + 1..i + 4).map(|oct| u8::from_str_radix(oct, 8))
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// SIGKILLs every process whose command line contains `needle` (e.g. containerd shims that
/// detached from our process group but name our socket).
pub(crate) fn kill_processes_mentioning(needle: &str) {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    let me = std::process::id();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if u32::try_from(pid).ok() == Some(me) {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if text.contains(needle) {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(unescape_mount_path(r"/tmp/a\040b\134c"), "/tmp/a b\\c");
        assert_eq!(unescape_mount_path(r"/tmp/x\0"), r"/tmp/x\0");
    }

    #[test]
    fn run_enforces_its_time_limit() {
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let started = Instant::now();
        let err = run(cmd, Duration::from_millis(200)).expect_err("must time out");
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(err.to_string().contains("timed out"), "{err}");
    }
}
