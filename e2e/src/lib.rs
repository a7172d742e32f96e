//! Test support: real registry, etcd + kube-apiserver and containerd, started on demand.
//!
//! Every component is a real process started from a temp dir of its own. Handles stop their
//! processes and remove their files when dropped, also while a test panics (then the tail of
//! the component's log goes to stderr). A component that cannot start is an error, never a
//! skip: run `hack/setup.sh` to install what is missing.
//!
//! - [`registry::Registry`]: CNCF distribution (Debian `docker-registry`), optionally behind a
//!   shaped link in its own network namespace ([`registry::Registry::start_shaped`]).
//! - [`apiserver::KubeApi`]: etcd + kube-apiserver (+ kube-controller-manager on request).
//! - [`containerd::Containerd`]: containerd with runc, own root/state/socket.
//! - [`images`]: builds OCI image layouts (busybox, or any files you describe).
//! - [`http`]: a minimal blocking HTTP/1.1 client for talking to the registry in tests.
//!
//! Processes are forked with their own process group and a parent-death signal, so they end
//! with the test process even if it is SIGKILLed or a handle sits in a `static`. Files of a
//! handle that is never dropped stay in /tmp.
//!
//! ```no_run
//! # async fn demo() -> Result<(), talaria_testenv::EnvError> {
//! use talaria_testenv::{apiserver::{KubeApi, KubeOptions}, containerd::Containerd, images, registry::Registry};
//!
//! let registry = Registry::start()?; // blocking; plain HTTP on 127.0.0.1:PORT
//! let digest = images::busybox_image()?.push(&registry.host(), "library/busybox", "latest")?;
//!
//! let kube = KubeApi::start_with(KubeOptions::with_controller_manager()).await?;
//! let client = kube.client().await?; // cluster-admin; see also client_for_service_account
//!
//! let ctd = Containerd::start_with_config("[proxy_plugins.talaria]\n  type = \"snapshot\"\n  address = \"/run/x.sock\"\n")?;
//! ctd.pull_plain_http(&format!("{}/library/busybox:latest", registry.host()))?;
//! let out = ctd.ctr_stdout(&["run", "--rm", "IMAGE", "ID", "/bin/echo", "hi"])?;
//! # let _ = (digest, client, out);
//! # Ok(()) }
//! ```

pub mod apiserver;
pub mod cluster;
pub mod containerd;
pub mod cri;
mod error;
pub mod hostile;
pub mod http;
pub mod images;
mod process;
pub mod registry;
pub mod relay;
mod shaping;
pub mod tokenauth;
pub mod tree;

pub use error::EnvError;
pub use process::unmount_under;

use std::path::PathBuf;

/// Directory holding the tools built by `hack/tools.sh`: `$TALARIA_TOOLS/bin`, by default
/// `~/.cache/talaria/tools/bin`.
pub fn tools_bin_dir() -> PathBuf {
    let base = match std::env::var_os("TALARIA_TOOLS") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => {
            let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
            PathBuf::from(home).join(".cache/talaria/tools")
        }
    };
    base.join("bin")
}

/// Finds an executable: first in [`tools_bin_dir`], then on `PATH`, then in the sbin dirs
/// (where Debian puts `ip`, `tc` and `runc`, which a non-login PATH may lack).
pub fn tool(name: &str) -> Result<PathBuf, EnvError> {
    let tools = tools_bin_dir();
    let mut dirs = vec![tools.clone()];
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    dirs.extend(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from));
    for dir in dirs {
        let candidate = dir.join(name);
        if is_executable(&candidate) {
            return Ok(candidate);
        }
    }
    Err(EnvError::ToolNotFound {
        name: name.to_string(),
        dir: tools,
    })
}

fn is_executable(path: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// A free TCP port on 127.0.0.1 (bound and released; callers retry if a race takes it).
pub fn free_port() -> Result<u16, EnvError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| EnvError::io("binding a probe socket on 127.0.0.1:0", e))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| EnvError::io("reading the probe socket address", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_tool_is_an_error_naming_the_fix() {
        let err = tool("talaria-no-such-tool").expect_err("must not be found");
        let msg = err.to_string();
        assert!(msg.contains("talaria-no-such-tool not found in"), "{msg}");
        assert!(msg.contains("run hack/setup.sh"), "{msg}");
    }

    #[test]
    fn handles_can_be_shared_between_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<registry::Registry>();
        send_sync::<apiserver::KubeApi>();
        send_sync::<containerd::Containerd>();
        send_sync::<EnvError>();
    }
}
