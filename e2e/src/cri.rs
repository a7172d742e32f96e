//! Kubernetes CRI against a private containerd, the way kubelet (or crictl) drives it.
//!
//! - [`CriContainerd`]: containerd 1.6 with its built-in CRI plugin enabled and set up to work
//!   offline: a locally built pause image (busybox `sleep`) imported as the sandbox image,
//!   host-network pods so no CNI plugin is needed, per-registry `hosts.toml` for plain-HTTP
//!   registries, runc state in its own dir, and a chosen snapshotter (overlayfs or a proxy
//!   plugin such as talaria-node).
//! - [`Cri`]: a small async client of the CRI v1 runtime and image services (hand-written
//!   protos in `e2e/proto/runtime/v1`), with helpers to run a container to completion and read
//!   its output, or to keep one running and find its init pid (to walk `/proc/PID/root`).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use talaria_testenv::cri::{CriContainerd, CriOptions};
//! use talaria_testenv::{images, registry::Registry};
//!
//! let registry = Registry::start()?;
//! images::busybox_image()?.push(&registry.host(), "library/busybox", "latest")?;
//! let env = CriContainerd::start(CriOptions::default())?; // blocking, like Containerd::start
//! env.allow_plain_http(&registry.host())?;
//! let cri = env.client().await?;
//! let image = format!("{}/library/busybox:latest", registry.host());
//! cri.pull_image(&image).await?;
//! let pod = cri.run_pod("demo").await?;
//! let out = cri.run_to_exit(&pod, "hello", &image, &["echo", "hi"], std::time::Duration::from_secs(30)).await?;
//! assert_eq!(out.stdout, "hi\n");
//! let running = cri.start_container(&pod, "sleeper", &image, &["sleep", "3600"]).await?;
//! let passwd = std::fs::read(format!("/proc/{}/root/etc/passwd", running.pid))?;
//! cri.remove_pod(&pod).await?;
//! # let _ = passwd; Ok(()) }
//! ```
//!
//! Everything still running when the [`CriContainerd`] is dropped is killed with it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use tempfile::TempDir;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::containerd::{Containerd, ContainerdOptions};
use crate::process::{run, run_ok, unmount_under};
use crate::{EnvError, tool};

/// The generated CRI v1 messages and clients (`runtime.v1`).
pub mod proto {
    tonic::include_proto!("runtime.v1");
}

use proto::image_service_client::ImageServiceClient;
use proto::runtime_service_client::RuntimeServiceClient;

/// containerd's CRI plugin keeps everything it manages in this namespace.
pub const CRI_NAMESPACE: &str = "k8s.io";
/// Name of the locally built sandbox image (the `.invalid` domain makes any pull attempt fail
/// fast instead of going to the internet).
pub const SANDBOX_IMAGE_NAME: &str = "talaria.invalid/pause";

const READY_TIMEOUT: Duration = Duration::from_secs(60);
const CTR_TIMEOUT: Duration = Duration::from_secs(120);
/// Default bound of one CRI call (pulls have their own, longer one).
const RPC_TIMEOUT: Duration = Duration::from_secs(120);
const PULL_TIMEOUT: Duration = Duration::from_secs(600);
const POLL: Duration = Duration::from_millis(20);
/// Container logs read back by the helpers are capped: tests print little.
const MAX_LOG_BYTES: u64 = 16 << 20;
static SEQ: AtomicU32 = AtomicU32::new(0);

/// Why a CRI call or the CRI setup failed.
#[derive(Debug, thiserror::Error)]
pub enum CriError {
    #[error(transparent)]
    Env(#[from] EnvError),

    #[error("connecting to CRI at {}: {source}", socket.display())]
    Connect {
        socket: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },

    #[error("CRI {call} ({subject}): {status}")]
    Rpc {
        call: &'static str,
        subject: String,
        status: Box<tonic::Status>,
    },

    #[error("CRI {call} ({subject}): no answer within {waited:?}")]
    RpcTimeout {
        call: &'static str,
        subject: String,
        waited: Duration,
    },

    #[error("{what} not reached within {waited:?}: {detail}")]
    Timeout {
        what: String,
        waited: Duration,
        detail: String,
    },

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    #[error("unexpected CRI answer to {call}: {detail}")]
    Unexpected { call: &'static str, detail: String },
}

fn io_err(context: impl Into<String>, source: std::io::Error) -> CriError {
    CriError::Io {
        context: context.into(),
        source,
    }
}

/// Which snapshotter the CRI plugin unpacks images with and runs containers on.
#[derive(Debug, Clone, Default)]
pub enum CriSnapshotter {
    /// containerd's own overlayfs snapshotter.
    #[default]
    Overlayfs,
    /// A proxy (remote) snapshotter served on `socket`, registered as `[proxy_plugins.NAME]`,
    /// e.g. talaria-node. It must be serving before [`CriContainerd::start`] (the sandbox image
    /// is unpacked onto it).
    Proxy { name: String, socket: PathBuf },
}

impl CriSnapshotter {
    /// The name containerd knows the snapshotter by.
    pub fn name(&self) -> &str {
        match self {
            CriSnapshotter::Overlayfs => "overlayfs",
            CriSnapshotter::Proxy { name, .. } => name,
        }
    }
}

/// How to start a CRI-enabled containerd.
#[derive(Debug, Clone, Default)]
pub struct CriOptions {
    pub snapshotter: CriSnapshotter,
    /// More TOML appended to containerd's config (after the CRI tables).
    pub extra_config: String,
}

/// A running containerd with its CRI plugin, ready for [`Cri`] clients. Dropping it kills every
/// pod and container it runs, then containerd (see [`Containerd`]), and removes its files.
pub struct CriContainerd {
    // Field order is drop order: containerd (and what it mounted) goes before the dir holding
    // the runc state, registry hosts and pod logs.
    containerd: Containerd,
    dir: TempDir,
    snapshotter: String,
    sandbox_image: String,
}

impl CriContainerd {
    /// Starts containerd with CRI (blocking), imports the sandbox image and waits until the
    /// CRI runtime service answers.
    pub fn start(opts: CriOptions) -> Result<CriContainerd, CriError> {
        let dir = tempfile::Builder::new()
            .prefix("tlr-cri-")
            .tempdir()
            .map_err(|e| io_err("creating the CRI temp dir", e))?;
        for sub in ["runc", "hosts", "cni/net.d", "cni/bin", "pods"] {
            let d = dir.path().join(sub);
            std::fs::create_dir_all(&d)
                .map_err(|e| io_err(format!("creating {}", d.display()), e))?;
        }
        let sandbox_image = format!("{SANDBOX_IMAGE_NAME}:1");
        let config = cri_config(dir.path(), &opts, &sandbox_image);
        let containerd = Containerd::start_with(ContainerdOptions {
            extra_config: config,
            enable_cri: true,
        })?;
        let env = CriContainerd {
            containerd,
            dir,
            snapshotter: opts.snapshotter.name().to_string(),
            sandbox_image,
        };
        env.import_sandbox_image()?;
        env.wait_ready()?;
        Ok(env)
    }

    /// The containerd underneath (its socket, log, `ctr` helpers).
    pub fn containerd(&self) -> &Containerd {
        &self.containerd
    }

    /// containerd's gRPC socket, which also serves CRI.
    pub fn socket(&self) -> &Path {
        self.containerd.socket()
    }

    /// The snapshotter CRI uses ("overlayfs" or the proxy plugin's name).
    pub fn snapshotter(&self) -> &str {
        &self.snapshotter
    }

    /// The sandbox (pause) image reference, present in the k8s.io namespace.
    pub fn sandbox_image(&self) -> &str {
        &self.sandbox_image
    }

    /// Where pods' log directories are created.
    pub fn pod_log_root(&self) -> PathBuf {
        self.dir.path().join("pods")
    }

    /// Lets CRI pull from `host` ("127.0.0.1:5000") over plain HTTP. Takes effect for the next
    /// pull: containerd reads the per-host files at pull time.
    pub fn allow_plain_http(&self, host: &str) -> Result<(), CriError> {
        write_plain_http_hosts(&self.dir.path().join("hosts"), host)
    }

    /// A client of this containerd's CRI services.
    pub async fn client(&self) -> Result<Cri, CriError> {
        Cri::connect(self.socket(), &self.pod_log_root()).await
    }

    /// `ctr --address SOCK --namespace k8s.io` ready for more arguments.
    pub fn ctr_k8s_command(&self) -> Result<Command, CriError> {
        let mut c = Command::new(tool("ctr")?);
        c.arg("--address")
            .arg(self.socket())
            .arg("--namespace")
            .arg(CRI_NAMESPACE);
        Ok(c)
    }

    fn import_sandbox_image(&self) -> Result<(), CriError> {
        let image = crate::images::pause_image()?;
        let layout = self.dir.path().join("pause-layout");
        image.write_layout(&layout, "1")?;
        let tar = self.dir.path().join("pause.tar");
        crate::images::layout_to_tar(&layout, &tar)?;
        let mut c = self.ctr_k8s_command()?;
        c.args(["images", "import", "--base-name", SANDBOX_IMAGE_NAME])
            .arg("--snapshotter")
            .arg(&self.snapshotter)
            .arg(&tar);
        let res = run_ok(c, CTR_TIMEOUT);
        let _ = std::fs::remove_file(&tar);
        let _ = std::fs::remove_dir_all(&layout);
        res?;
        Ok(())
    }

    /// CRI initialises after containerd serves gRPC; until then its calls fail with "server is
    /// not initialized yet".
    fn wait_ready(&self) -> Result<(), CriError> {
        // A real CRI call is the honest check. It runs on a runtime of its own in a thread of
        // its own, so this blocking start also works inside a test's async runtime.
        let socket = self.socket().to_path_buf();
        let log_root = self.pod_log_root();
        let image = self.sandbox_image.clone();
        let check = std::thread::spawn(move || -> Result<(), CriError> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| io_err("building a runtime for the CRI readiness check", e))?;
            rt.block_on(async move {
                let cri = Cri::connect(&socket, &log_root).await?;
                let started = Instant::now();
                loop {
                    // The sandbox image must also be visible to CRI (it learns about the
                    // import from containerd's event stream).
                    let last = match cri.version().await {
                        Ok(_) => match cri.image_status(&image).await {
                            Ok(Some(_)) => return Ok(()),
                            Ok(None) => "sandbox image not yet known to CRI".to_string(),
                            Err(e) => e.to_string(),
                        },
                        Err(e) => e.to_string(),
                    };
                    if started.elapsed() > READY_TIMEOUT {
                        return Err(CriError::Timeout {
                            what: "CRI ready".into(),
                            waited: READY_TIMEOUT,
                            detail: last,
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        });
        let res = check.join().map_err(|_| CriError::Unexpected {
            call: "Version",
            detail: "the readiness check thread panicked".into(),
        })?;
        res.map_err(|e| match e {
            CriError::Timeout {
                what,
                waited,
                detail,
            } => CriError::Timeout {
                what,
                waited,
                detail: format!(
                    "{detail}; containerd log tail:\n{}",
                    crate::process::log_tail(&self.containerd.log_path(), 30)
                ),
            },
            other => other,
        })
    }

    /// Kills every CRI task (pods and containers) so nothing outlives the test.
    fn kill_cri_tasks(&self) {
        let Ok(mut ls) = self.ctr_k8s_command() else {
            return;
        };
        ls.args(["tasks", "ls", "-q"]);
        let Ok(out) = run(ls, Duration::from_secs(10)) else {
            return;
        };
        for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            for args in [
                &["tasks", "kill", "--all", "--signal", "SIGKILL", id][..],
                &["tasks", "delete", "--force", id][..],
            ] {
                if let Ok(mut c) = self.ctr_k8s_command() {
                    c.args(args);
                    let _ = run(c, Duration::from_secs(10));
                }
            }
        }
    }
}

impl Drop for CriContainerd {
    fn drop(&mut self) {
        self.kill_cri_tasks();
        // containerd's own Drop runs next (field order); then the temp dir goes. Nothing
        // should be mounted under it, but a stray mount must not make its removal fail.
        unmount_under(self.dir.path());
    }
}

/// Writes `HOSTS_DIR/HOST/hosts.toml` (containerd's `config_path` layout) so that pulls from
/// `host` ("127.0.0.1:5000") go over plain HTTP.
pub fn write_plain_http_hosts(hosts_dir: &Path, host: &str) -> Result<(), CriError> {
    if host.is_empty() || host.contains('/') || host.contains("..") {
        return Err(CriError::Unexpected {
            call: "allow_plain_http",
            detail: format!("{host:?} is not a registry host[:port]"),
        });
    }
    let d = hosts_dir.join(host);
    std::fs::create_dir_all(&d).map_err(|e| io_err(format!("creating {}", d.display()), e))?;
    let file = d.join("hosts.toml");
    // containerd 1.6 rejects a hosts.toml without a `host` table ("invalid `host` tree")
    // and falls back to HTTPS (loopback hosts excepted), so the host is listed explicitly.
    let text = format!(
        "server = \"http://{host}\"\n\n[host.\"http://{host}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
    );
    std::fs::write(&file, text).map_err(|e| io_err(format!("writing {}", file.display()), e))
}

/// The CRI tables for containerd 1.6's config (version 2).
fn cri_config(dir: &Path, opts: &CriOptions, sandbox_image: &str) -> String {
    let d = dir.display();
    let mut s = String::new();
    if let CriSnapshotter::Proxy { name, socket } = &opts.snapshotter {
        s.push_str(&format!(
            "[proxy_plugins.\"{name}\"]\n  type = \"snapshot\"\n  address = \"{}\"\n\n",
            socket.display()
        ));
    }
    let cri = "plugins.\"io.containerd.grpc.v1.cri\"";
    s.push_str(&format!(
        // stream_server_port 0: instances run in parallel and the default port is fixed.
        // disable_apparmor: the default profile may not be loaded on a CI host.
        // disable_snapshot_annotations = false: remote snapshotters need the image labels.
        "[{cri}]\n  sandbox_image = \"{sandbox_image}\"\n  stream_server_address = \"127.0.0.1\"\n  \
         stream_server_port = \"0\"\n  disable_apparmor = true\n  enable_selinux = false\n  \
         restrict_oom_score_adj = true\n\n\
         [{cri}.containerd]\n  snapshotter = \"{snap}\"\n  default_runtime_name = \"runc\"\n  \
         disable_snapshot_annotations = false\n\n\
         [{cri}.containerd.runtimes.runc]\n  runtime_type = \"io.containerd.runc.v2\"\n\n\
         [{cri}.containerd.runtimes.runc.options]\n  Root = \"{d}/runc\"\n\n\
         [{cri}.cni]\n  conf_dir = \"{d}/cni/net.d\"\n  bin_dir = \"{d}/cni/bin\"\n\n\
         [{cri}.registry]\n  config_path = \"{d}/hosts\"\n\n{extra}\n",
        snap = opts.snapshotter.name(),
        extra = opts.extra_config,
    ));
    s
}

/// A pod sandbox made by [`Cri::run_pod`]: its id and the config containers must repeat.
#[derive(Debug, Clone)]
pub struct PodSandbox {
    pub id: String,
    pub config: proto::PodSandboxConfig,
    /// Where the pod's container logs are written (`NAME.log` per container).
    pub log_dir: PathBuf,
}

/// A container that ran to its end.
#[derive(Debug, Clone)]
pub struct ContainerRun {
    pub id: String,
    pub exit_code: i32,
    /// Its stdout and stderr, from the CRI log file.
    pub stdout: String,
    pub stderr: String,
}

/// A started container and the host pid of its init process.
#[derive(Debug, Clone)]
pub struct RunningContainer {
    pub id: String,
    pub pid: u32,
}

impl RunningContainer {
    /// The container's root file system as seen from the host.
    pub fn root(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root", self.pid))
    }
}

/// A CRI v1 client (runtime and image services) over containerd's unix socket.
#[derive(Clone)]
pub struct Cri {
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
    log_root: PathBuf,
    rpc_timeout: Duration,
    pull_timeout: Duration,
}

impl Cri {
    /// Connects to the CRI socket; pods get their log dirs under `log_root`.
    pub async fn connect(socket: &Path, log_root: &Path) -> Result<Cri, CriError> {
        let s = socket.to_path_buf();
        let channel = Endpoint::from_static("http://localhost")
            .connect_timeout(Duration::from_secs(10))
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let s = s.clone();
                async move { UnixStream::connect(s).await.map(TokioIo::new) }
            }))
            .await
            .map_err(|source| CriError::Connect {
                socket: socket.to_path_buf(),
                source,
            })?;
        Ok(Cri {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
            log_root: log_root.to_path_buf(),
            rpc_timeout: RPC_TIMEOUT,
            pull_timeout: PULL_TIMEOUT,
        })
    }

    /// Changes the bounds on calls (default 120 s) and on pulls (default 600 s).
    pub fn with_timeouts(mut self, rpc: Duration, pull: Duration) -> Cri {
        self.rpc_timeout = rpc;
        self.pull_timeout = pull;
        self
    }

    /// The raw runtime service client, for calls the helpers do not cover.
    pub fn runtime_client(&self) -> RuntimeServiceClient<Channel> {
        self.runtime.clone()
    }

    /// The raw image service client.
    pub fn image_client(&self) -> ImageServiceClient<Channel> {
        self.images.clone()
    }

    pub async fn version(&self) -> Result<proto::VersionResponse, CriError> {
        let mut c = self.runtime.clone();
        let req = proto::VersionRequest {
            version: "v1".into(),
        };
        self.call("Version", "", self.rpc_timeout, c.version(req))
            .await
    }

    // --- images ---

    /// Pulls `image` without credentials; returns the image id ("sha256:...").
    pub async fn pull_image(&self, image: &str) -> Result<String, CriError> {
        self.pull_image_with(proto::PullImageRequest {
            image: Some(image_spec(image)),
            auth: None,
            sandbox_config: None,
        })
        .await
    }

    /// Pulls with a full request (credentials, sandbox config); returns the image id.
    pub async fn pull_image_with(&self, req: proto::PullImageRequest) -> Result<String, CriError> {
        let subject = req
            .image
            .as_ref()
            .map(|i| i.image.clone())
            .unwrap_or_default();
        let mut c = self.images.clone();
        let resp = self
            .call("PullImage", &subject, self.pull_timeout, c.pull_image(req))
            .await?;
        Ok(resp.image_ref)
    }

    /// The image known to CRI by `image` (name, name@digest or id), or `None`.
    pub async fn image_status(&self, image: &str) -> Result<Option<proto::Image>, CriError> {
        let mut c = self.images.clone();
        let req = proto::ImageStatusRequest {
            image: Some(image_spec(image)),
            verbose: false,
        };
        let resp = self
            .call("ImageStatus", image, self.rpc_timeout, c.image_status(req))
            .await?;
        Ok(resp.image)
    }

    pub async fn list_images(&self) -> Result<Vec<proto::Image>, CriError> {
        let mut c = self.images.clone();
        let req = proto::ListImagesRequest { filter: None };
        let resp = self
            .call("ListImages", "", self.rpc_timeout, c.list_images(req))
            .await?;
        Ok(resp.images)
    }

    pub async fn remove_image(&self, image: &str) -> Result<(), CriError> {
        let mut c = self.images.clone();
        let req = proto::RemoveImageRequest {
            image: Some(image_spec(image)),
        };
        self.call("RemoveImage", image, self.rpc_timeout, c.remove_image(req))
            .await
            .map(|_| ())
    }

    // --- pods ---

    /// Runs a pod sandbox on the host network (no CNI involved) with its own PID and IPC
    /// namespaces. `name` should be unique among this client's live pods.
    pub async fn run_pod(&self, name: &str) -> Result<PodSandbox, CriError> {
        let uid = format!(
            "{}-{}-{}",
            name,
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let log_dir = self.log_root.join(&uid);
        std::fs::create_dir_all(&log_dir)
            .map_err(|e| io_err(format!("creating {}", log_dir.display()), e))?;
        let config = proto::PodSandboxConfig {
            metadata: Some(proto::PodSandboxMetadata {
                name: name.into(),
                uid,
                namespace: "talaria-test".into(),
                attempt: 0,
            }),
            log_directory: log_dir.to_string_lossy().into_owned(),
            linux: Some(proto::LinuxPodSandboxConfig {
                security_context: Some(proto::LinuxSandboxSecurityContext {
                    namespace_options: Some(host_network()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut c = self.runtime.clone();
        let req = proto::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        };
        let resp = self
            .call(
                "RunPodSandbox",
                name,
                self.rpc_timeout,
                c.run_pod_sandbox(req),
            )
            .await?;
        Ok(PodSandbox {
            id: resp.pod_sandbox_id,
            config,
            log_dir,
        })
    }

    /// Stops and removes the pod with all its containers.
    pub async fn remove_pod(&self, pod: &PodSandbox) -> Result<(), CriError> {
        let mut c = self.runtime.clone();
        let id = pod.id.clone();
        self.call(
            "StopPodSandbox",
            &pod.id,
            self.rpc_timeout,
            c.stop_pod_sandbox(proto::StopPodSandboxRequest {
                pod_sandbox_id: id.clone(),
            }),
        )
        .await?;
        self.call(
            "RemovePodSandbox",
            &pod.id,
            self.rpc_timeout,
            c.remove_pod_sandbox(proto::RemovePodSandboxRequest { pod_sandbox_id: id }),
        )
        .await
        .map(|_| ())
    }

    // --- containers ---

    /// A container config for `image` running `command` (entrypoint override; empty keeps the
    /// image's), logging to `NAME.log` in the pod's log dir, on the host network like its pod.
    pub fn container_config(name: &str, image: &str, command: &[&str]) -> proto::ContainerConfig {
        proto::ContainerConfig {
            metadata: Some(proto::ContainerMetadata {
                name: name.into(),
                attempt: 0,
            }),
            image: Some(image_spec(image)),
            command: command.iter().map(|s| s.to_string()).collect(),
            log_path: format!("{name}.log"),
            linux: Some(proto::LinuxContainerConfig {
                security_context: Some(proto::LinuxContainerSecurityContext {
                    namespace_options: Some(proto::NamespaceOption {
                        network: proto::NamespaceMode::Node as i32,
                        // Its own PID namespace, as kubelet does by default.
                        pid: proto::NamespaceMode::Container as i32,
                        ipc: proto::NamespaceMode::Pod as i32,
                        target_id: String::new(),
                    }),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        }
    }

    /// Creates a container in `pod`; returns its id.
    pub async fn create_container(
        &self,
        pod: &PodSandbox,
        config: proto::ContainerConfig,
    ) -> Result<String, CriError> {
        let subject = config
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default();
        let mut c = self.runtime.clone();
        let req = proto::CreateContainerRequest {
            pod_sandbox_id: pod.id.clone(),
            config: Some(config),
            sandbox_config: Some(pod.config.clone()),
        };
        let resp = self
            .call(
                "CreateContainer",
                &subject,
                self.rpc_timeout,
                c.create_container(req),
            )
            .await?;
        Ok(resp.container_id)
    }

    /// Starts a created container.
    pub async fn start_container_id(&self, id: &str) -> Result<(), CriError> {
        let mut c = self.runtime.clone();
        let req = proto::StartContainerRequest {
            container_id: id.into(),
        };
        self.call(
            "StartContainer",
            id,
            self.rpc_timeout,
            c.start_container(req),
        )
        .await
        .map(|_| ())
    }

    /// Stops a container, killing it after `grace`.
    pub async fn stop_container(&self, id: &str, grace: Duration) -> Result<(), CriError> {
        let mut c = self.runtime.clone();
        let req = proto::StopContainerRequest {
            container_id: id.into(),
            timeout: i64::try_from(grace.as_secs()).unwrap_or(i64::MAX),
        };
        self.call(
            "StopContainer",
            id,
            self.rpc_timeout + grace,
            c.stop_container(req),
        )
        .await
        .map(|_| ())
    }

    pub async fn remove_container(&self, id: &str) -> Result<(), CriError> {
        let mut c = self.runtime.clone();
        let req = proto::RemoveContainerRequest {
            container_id: id.into(),
        };
        self.call(
            "RemoveContainer",
            id,
            self.rpc_timeout,
            c.remove_container(req),
        )
        .await
        .map(|_| ())
    }

    /// The container's status and, with `verbose`, containerd's extra info (JSON under "info").
    pub async fn container_status(
        &self,
        id: &str,
        verbose: bool,
    ) -> Result<(proto::ContainerStatus, HashMap<String, String>), CriError> {
        let mut c = self.runtime.clone();
        let req = proto::ContainerStatusRequest {
            container_id: id.into(),
            verbose,
        };
        let resp = self
            .call(
                "ContainerStatus",
                id,
                self.rpc_timeout,
                c.container_status(req),
            )
            .await?;
        let status = resp.status.ok_or_else(|| CriError::Unexpected {
            call: "ContainerStatus",
            detail: format!("no status for {id}"),
        })?;
        Ok((status, resp.info))
    }

    /// The host pid of the container's init process (from containerd's verbose info).
    pub async fn container_pid(&self, id: &str) -> Result<u32, CriError> {
        let (_, info) = self.container_status(id, true).await?;
        let raw = info.get("info").ok_or_else(|| CriError::Unexpected {
            call: "ContainerStatus",
            detail: format!("verbose status of {id} has no \"info\""),
        })?;
        let doc: serde_json::Value =
            serde_json::from_str(raw).map_err(|e| CriError::Unexpected {
                call: "ContainerStatus",
                detail: format!("info of {id} is not JSON: {e}"),
            })?;
        doc.get("pid")
            .and_then(serde_json::Value::as_u64)
            .and_then(|p| u32::try_from(p).ok())
            .filter(|p| *p > 0)
            .ok_or_else(|| CriError::Unexpected {
                call: "ContainerStatus",
                detail: format!("info of {id} has no running pid"),
            })
    }

    /// Polls until the container has exited; returns its final status.
    pub async fn wait_exited(
        &self,
        id: &str,
        timeout: Duration,
    ) -> Result<proto::ContainerStatus, CriError> {
        let started = Instant::now();
        loop {
            let (status, _) = self.container_status(id, false).await?;
            if status.state == proto::ContainerState::ContainerExited as i32 {
                return Ok(status);
            }
            if started.elapsed() > timeout {
                return Err(CriError::Timeout {
                    what: format!("exit of container {id}"),
                    waited: timeout,
                    detail: format!("state {} ({})", status.state, status.reason),
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Runs `command` in `image` inside `pod` until it exits (bounded by `timeout`); returns
    /// its exit code and output. The container is removed afterwards.
    pub async fn run_to_exit(
        &self,
        pod: &PodSandbox,
        name: &str,
        image: &str,
        command: &[&str],
        timeout: Duration,
    ) -> Result<ContainerRun, CriError> {
        let id = self
            .create_container(pod, Cri::container_config(name, image, command))
            .await?;
        self.start_container_id(&id).await?;
        let status = self.wait_exited(&id, timeout).await?;
        let (stdout, stderr) = read_container_log(&pod.log_dir.join(format!("{name}.log")))?;
        self.remove_container(&id).await?;
        Ok(ContainerRun {
            id,
            exit_code: status.exit_code,
            stdout,
            stderr,
        })
    }

    /// Creates and starts a long-lived container; returns its id and init pid.
    pub async fn start_container(
        &self,
        pod: &PodSandbox,
        name: &str,
        image: &str,
        command: &[&str],
    ) -> Result<RunningContainer, CriError> {
        let id = self
            .create_container(pod, Cri::container_config(name, image, command))
            .await?;
        self.start_container_id(&id).await?;
        let pid = self.container_pid(&id).await?;
        Ok(RunningContainer { id, pid })
    }

    /// Runs `cmd` in a running container (like `crictl exec -s`), bounded by `timeout`.
    pub async fn exec_sync(
        &self,
        id: &str,
        cmd: &[&str],
        timeout: Duration,
    ) -> Result<proto::ExecSyncResponse, CriError> {
        let mut c = self.runtime.clone();
        let req = proto::ExecSyncRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: i64::try_from(timeout.as_secs().max(1)).unwrap_or(i64::MAX),
        };
        // A little slack so the runtime's own timeout answers first.
        self.call(
            "ExecSync",
            id,
            timeout + Duration::from_secs(10),
            c.exec_sync(req),
        )
        .await
    }

    async fn call<T>(
        &self,
        call: &'static str,
        subject: &str,
        limit: Duration,
        fut: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, CriError> {
        match tokio::time::timeout(limit, fut).await {
            Ok(Ok(resp)) => Ok(resp.into_inner()),
            Ok(Err(status)) => Err(CriError::Rpc {
                call,
                subject: subject.to_string(),
                status: Box::new(status),
            }),
            Err(_) => Err(CriError::RpcTimeout {
                call,
                subject: subject.to_string(),
                waited: limit,
            }),
        }
    }
}

fn image_spec(image: &str) -> proto::ImageSpec {
    proto::ImageSpec {
        image: image.into(),
        annotations: HashMap::new(),
    }
}

fn host_network() -> proto::NamespaceOption {
    proto::NamespaceOption {
        network: proto::NamespaceMode::Node as i32,
        pid: proto::NamespaceMode::Pod as i32,
        ipc: proto::NamespaceMode::Pod as i32,
        target_id: String::new(),
    }
}

/// Reads a CRI container log file (capped) and splits it into (stdout, stderr).
pub fn read_container_log(path: &Path) -> Result<(String, String), CriError> {
    use std::io::Read;
    let file =
        std::fs::File::open(path).map_err(|e| io_err(format!("opening {}", path.display()), e))?;
    let mut text = String::new();
    file.take(MAX_LOG_BYTES)
        .read_to_string(&mut text)
        .map_err(|e| io_err(format!("reading {}", path.display()), e))?;
    Ok(parse_cri_log(&text))
}

/// Splits CRI log lines ("TIMESTAMP STREAM TAG CONTENT", TAG "F" for a full line, "P" for a
/// partial one) into (stdout, stderr). Lines that do not parse are skipped.
pub fn parse_cri_log(text: &str) -> (String, String) {
    let (mut out, mut err) = (String::new(), String::new());
    for line in text.lines() {
        let mut parts = line.splitn(4, ' ');
        let (Some(_ts), Some(stream), Some(tag)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let content = parts.next().unwrap_or("");
        let target = match stream {
            "stdout" => &mut out,
            "stderr" => &mut err,
            _ => continue,
        };
        target.push_str(content);
        if tag != "P" {
            target.push('\n');
        }
    }
    (out, err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cri_log_lines_split_by_stream_and_join_partials() {
        let log = "2026-01-01T00:00:00.1Z stdout F hello world\n\
                   2026-01-01T00:00:00.2Z stderr P par\n\
                   2026-01-01T00:00:00.3Z stderr F tial\n\
                   garbage\n\
                   2026-01-01T00:00:00.4Z stdout F \n";
        let (out, err) = parse_cri_log(log);
        assert_eq!(out, "hello world\n\n");
        assert_eq!(err, "partial\n");
    }

    #[test]
    fn config_names_the_snapshotter_and_registers_a_proxy() {
        let opts = CriOptions {
            snapshotter: CriSnapshotter::Proxy {
                name: "talaria".into(),
                socket: PathBuf::from("/run/t.sock"),
            },
            extra_config: "# extra\n".into(),
        };
        let c = cri_config(Path::new("/tmp/x"), &opts, "p:1");
        assert!(c.contains("[proxy_plugins.\"talaria\"]"), "{c}");
        assert!(c.contains("address = \"/run/t.sock\""), "{c}");
        assert!(c.contains("snapshotter = \"talaria\""), "{c}");
        assert!(c.contains("sandbox_image = \"p:1\""), "{c}");
        assert!(c.contains("config_path = \"/tmp/x/hosts\""), "{c}");
        assert!(c.ends_with("# extra\n\n"), "{c}");
        let c = cri_config(Path::new("/tmp/x"), &CriOptions::default(), "p:1");
        assert!(c.contains("snapshotter = \"overlayfs\""), "{c}");
        assert!(!c.contains("proxy_plugins"), "{c}");
    }
}
