//! A one-node Kubernetes cluster from real parts, the way users run Talaria: etcd +
//! kube-apiserver, kube-controller-manager (the controllers Deployments, DaemonSets and Services
//! need), kube-scheduler, kubelet on a CRI containerd (Debian's 1.6 or 2.x from
//! `hack/tools.sh`), a bridge CNI network from Debian's `containernetworking-plugins`, and
//! kube-proxy (iptables) so pods reach the apiserver and Services as in any cluster.
//!
//! Host specifics this VM needs (and CI machines like it): cgroup v1 in the hybrid layout with no
//! systemd as PID 1, so kubelet runs with the cgroupfs driver and `failCgroupV1: false`; `/` is
//! a private mount, so the cluster's own dir is made a shared mount (kubelet's Bidirectional
//! volumes and the snapshotter's FUSE mounts propagate through it).
//!
//! containerd runs under a supervisor that starts it again when it exits, as runit, s6 or
//! systemd's `Restart=` would: the chart's containerd-configure step (`restartMethod: signal`)
//! restarts it that way. [`Cluster::containerd_starts`] counts the starts.
//!
//! Host-global state (one cluster at a time per process: [`Cluster::start`] waits for the one
//! before to be dropped): the bridge `tlr0` with 10.244.0.0/24, kube-proxy's and kubelet's
//! iptables chains, kubelet's cgroups under `/kubepods`, two sysctls. Dropping the cluster
//! removes or restores them.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tempfile::TempDir;

use crate::apiserver::{KubeApi, KubeOptions};
use crate::process::{Proc, kill_processes_mentioning, run, run_ok, unmount_under};
use crate::registry::Registry;
use crate::{EnvError, free_port, tool};

/// The pod network (one node: one /24).
pub const POD_CIDR: &str = "10.244.0.0/24";
/// The bridge pods attach to.
pub const BRIDGE: &str = "tlr0";
/// Name of the node kubelet registers.
pub const NODE_NAME: &str = "talaria-e2e-node";
/// The sandbox image, pushed to the cluster's registry at start.
const PAUSE_REPO: &str = "e2e/pause";
const READY_TIMEOUT: Duration = Duration::from_secs(180);
/// Starts of containerd the supervisor makes at most.
const MAX_STARTS: u32 = 20;

/// Which containerd the node runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainerdVersion {
    /// Debian's containerd 1.6 (config version 2).
    V1,
    /// containerd 2.x built by `hack/tools.sh` as `containerd2` (config version 3).
    V2,
}

/// containerd under a supervisor thread that starts it again whenever it exits.
struct Supervised {
    stop: Arc<AtomicBool>,
    starts: Arc<AtomicU32>,
    /// The running daemon's pid (0 between starts).
    pid: Arc<AtomicU32>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Supervised {
    fn start(
        cmd: impl Fn() -> Command + Send + 'static,
        log: PathBuf,
    ) -> Result<Supervised, EnvError> {
        let stop = Arc::new(AtomicBool::new(false));
        let starts = Arc::new(AtomicU32::new(0));
        // The first start is checked here, so a containerd that cannot start fails the test.
        let mut proc = Proc::spawn("containerd", cmd(), &log)?;
        starts.fetch_add(1, Ordering::SeqCst);
        let pid = Arc::new(AtomicU32::new(proc.pid().unwrap_or(0)));
        let (s, n, current) = (stop.clone(), starts.clone(), pid.clone());
        let thread = std::thread::Builder::new()
            .name("containerd-supervisor".into())
            .spawn(move || {
                loop {
                    if s.load(Ordering::SeqCst) {
                        proc.stop();
                        return;
                    }
                    if proc.check_alive().is_err() {
                        current.store(0, Ordering::SeqCst);
                        // As systemd's start limit: a containerd that keeps dying stays down.
                        if n.load(Ordering::SeqCst) >= MAX_STARTS {
                            tracing::error!("containerd exited {MAX_STARTS} times; not restarting");
                            return;
                        }
                        tracing::info!("containerd exited; the supervisor starts it again");
                        std::thread::sleep(Duration::from_millis(200));
                        match Proc::spawn("containerd", cmd(), &log) {
                            Ok(p) => {
                                proc = p;
                                current.store(proc.pid().unwrap_or(0), Ordering::SeqCst);
                                n.fetch_add(1, Ordering::SeqCst);
                            }
                            Err(e) => {
                                tracing::error!(error = %e, "restarting containerd");
                                std::thread::sleep(Duration::from_secs(1));
                            }
                        }
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
            .map_err(|e| EnvError::io("spawning the containerd supervisor", e))?;
        Ok(Supervised {
            stop,
            starts,
            pid,
            thread: Some(thread),
        })
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How to start the cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub containerd: ContainerdVersion,
}

/// A running one-node cluster. Dropping it stops every component and pod and removes the
/// host state it added.
pub struct Cluster {
    // Drop order: node components first, then containerd, registry, control plane, files.
    kubelet: Option<Proc>,
    proxy: Option<Proc>,
    scheduler: Option<Proc>,
    containerd: Option<Supervised>,
    registry: Registry,
    api: KubeApi,
    version: ContainerdVersion,
    node_ip: Ipv4Addr,
    /// Values of [`SYSCTLS`] before the cluster started.
    sysctls: Vec<(&'static str, String)>,
    dir: TempDir,
    _lock: tokio::sync::MutexGuard<'static, ()>,
}

static ONE_CLUSTER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

impl Cluster {
    /// Starts every component and waits until the node is Ready.
    pub async fn start(opts: ClusterOptions) -> Result<Cluster, EnvError> {
        let lock = ONE_CLUSTER.lock().await;
        let node_ip = node_ip()?;
        let dir = tempfile::Builder::new()
            .prefix("tlr-cl-")
            .tempdir()
            .map_err(|e| EnvError::io("creating the cluster temp dir", e))?;
        let d = dir.path().to_path_buf();
        let sysctls = host_prepare(&d)?;
        for sub in [
            "containerd/root",
            "containerd/state",
            "containerd/hosts",
            "runc",
            "cni/net.d",
            "cni/ipam",
            "kubelet",
            "pod-logs",
        ] {
            mkdir(&d.join(sub))?;
        }

        // The registry listens on the node's address: containerd pulls from it on the host and
        // pods (the controller, the snapshotter) reach it over the pod network.
        let registry = Registry::start_on(node_ip)?;
        let pause_image = push_pause_image(&registry)?;

        let mut kube_opts = KubeOptions::with_controller_manager();
        kube_opts.controllers = [
            "deployment-controller",
            "replicaset-controller",
            "daemonset-controller",
            "endpointslice-controller",
            "garbage-collector-controller",
            "namespace-controller",
            "serviceaccount-controller",
            "root-ca-certificate-publisher-controller",
            "pod-garbage-collector-controller",
            // Lifts the not-ready taint kubelet registers the node with.
            "node-lifecycle-controller",
        ]
        .map(String::from)
        .to_vec();
        kube_opts.advertise_address = Some(node_ip);
        let api = KubeApi::start_with(kube_opts).await?;

        let mut cluster = Cluster {
            kubelet: None,
            proxy: None,
            scheduler: None,
            containerd: None,
            registry,
            api,
            version: opts.containerd,
            node_ip,
            sysctls,
            dir,
            _lock: lock,
        };
        cluster.allow_plain_http(&cluster.registry.host())?;
        std::fs::write(
            cluster.cni_dir().join("10-talaria-e2e.conflist"),
            cni_config(&d),
        )
        .map_err(|e| EnvError::io("writing the CNI config", e))?;
        let config = containerd_config(opts.containerd, &d, &pause_image);
        std::fs::write(cluster.containerd_config_path(), config)
            .map_err(|e| EnvError::io("writing containerd's config", e))?;
        cluster.start_containerd()?;
        cluster.wait_cri().await?;
        cluster.start_node_components()?;
        cluster.wait_node_ready().await?;
        Ok(cluster)
    }

    /// The control plane (clients, kubeconfigs).
    pub fn api(&self) -> &KubeApi {
        &self.api
    }

    /// The registry pods pull from (plain HTTP on the node's address).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The config file containerd was started with (what the chart's configure step edits).
    pub fn containerd_config_path(&self) -> PathBuf {
        self.dir.path().join("containerd/config.toml")
    }

    /// containerd's gRPC (and CRI) socket.
    pub fn containerd_socket(&self) -> PathBuf {
        self.dir.path().join("containerd/containerd.sock")
    }

    /// How many times containerd was started (1 + restarts).
    pub fn containerd_starts(&self) -> u32 {
        self.containerd
            .as_ref()
            .map_or(0, |s| s.starts.load(Ordering::SeqCst))
    }

    /// Restarts containerd as a host's supervisor would after `systemctl restart`: SIGTERM,
    /// then waits until the supervisor started it again and its socket answers.
    pub fn restart_containerd(&self) -> Result<(), EnvError> {
        let sup = self
            .containerd
            .as_ref()
            .ok_or_else(|| EnvError::Cluster("containerd is not running".into()))?;
        let before = sup.starts.load(Ordering::SeqCst);
        let pid = sup.pid.load(Ordering::SeqCst);
        let pid = i32::try_from(pid)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| EnvError::Cluster("containerd is between restarts".into()))?;
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        let started = Instant::now();
        while sup.starts.load(Ordering::SeqCst) == before || !self.containerd_socket().exists() {
            if started.elapsed() > READY_TIMEOUT {
                return Err(self.containerd_timeout("a restart by the supervisor".into()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// A host directory for hostPath volumes (snapshotter root, socket dir): inside the
    /// cluster's shared mount, created if missing.
    pub fn host_dir(&self, name: &str) -> Result<PathBuf, EnvError> {
        let p = self.dir.path().join("host").join(name);
        mkdir(&p)?;
        Ok(p)
    }

    /// containerd's log.
    pub fn containerd_log(&self) -> PathBuf {
        self.dir.path().join("containerd.log")
    }

    /// kubelet's log.
    pub fn kubelet_log(&self) -> PathBuf {
        self.dir.path().join("kubelet.log")
    }

    /// Lets containerd pull from `host` over plain HTTP (read at pull time).
    pub fn allow_plain_http(&self, host: &str) -> Result<(), EnvError> {
        crate::cri::write_plain_http_hosts(&self.dir.path().join("containerd/hosts"), host)
            .map_err(|e| EnvError::Cluster(e.to_string()))
    }

    /// containerd did not get to `what` in time; with the tail of its log.
    fn containerd_timeout(&self, what: String) -> EnvError {
        EnvError::Timeout {
            name: "containerd".into(),
            what,
            waited: READY_TIMEOUT,
            log_tail: crate::process::log_tail(&self.containerd_log(), 40),
        }
    }

    fn cni_dir(&self) -> PathBuf {
        self.dir.path().join("cni/net.d")
    }

    fn start_containerd(&mut self) -> Result<(), EnvError> {
        let bin = match self.version {
            ContainerdVersion::V1 => tool("containerd")?,
            // The real path: its directory holds the matching shim, and the process name is
            // then `containerd`, as on any host.
            ContainerdVersion::V2 => std::fs::canonicalize(tool("containerd2")?)
                .map_err(|e| EnvError::io("resolving containerd2", e))?,
        };
        tool("runc")?;
        let mut path = std::env::var_os("PATH").unwrap_or_default();
        if let Some(bin_dir) = bin.parent() {
            let mut p = bin_dir.as_os_str().to_owned();
            p.push(":");
            p.push(&path);
            path = p;
        }
        let config = self.containerd_config_path();
        let cmd = move || {
            let mut c = Command::new(&bin);
            c.arg("--config").arg(&config).env("PATH", &path);
            c
        };
        self.containerd = Some(Supervised::start(cmd, self.containerd_log())?);
        let socket = self.containerd_socket();
        let started = Instant::now();
        while !socket.exists() {
            if started.elapsed() > READY_TIMEOUT {
                return Err(self.containerd_timeout(format!("{} to appear", socket.display())));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// CRI serves a moment after containerd's socket appears; kubelet exits if it does not.
    async fn wait_cri(&self) -> Result<(), EnvError> {
        let started = Instant::now();
        let log_root = self.dir.path().join("pod-logs");
        loop {
            let last = match crate::cri::Cri::connect(&self.containerd_socket(), &log_root).await {
                Ok(cri) => match cri.version().await {
                    Ok(_) => return Ok(()),
                    Err(e) => e.to_string(),
                },
                Err(e) => e.to_string(),
            };
            if started.elapsed() > READY_TIMEOUT {
                return Err(self.containerd_timeout(format!("CRI answering Version ({last})")));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn start_node_components(&mut self) -> Result<(), EnvError> {
        let d = self.dir.path().to_path_buf();
        let kubeconfig = self.api.kubeconfig().to_path_buf();

        let mut sched = Command::new(tool("kube-scheduler")?);
        sched
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg(format!(
                "--authentication-kubeconfig={}",
                kubeconfig.display()
            ))
            .arg(format!(
                "--authorization-kubeconfig={}",
                kubeconfig.display()
            ))
            .arg("--leader-elect=false")
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--secure-port={}", free_port()?));
        self.scheduler = Some(Proc::spawn(
            "kube-scheduler",
            sched,
            &d.join("kube-scheduler.log"),
        )?);

        let mut proxy = Command::new(tool("kube-proxy")?);
        proxy
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg("--proxy-mode=iptables")
            .arg("--cluster-cidr=10.244.0.0/16")
            .arg(format!("--hostname-override={NODE_NAME}"))
            // Leaves the host's conntrack table size alone.
            .arg("--conntrack-max-per-core=0")
            .arg(format!("--healthz-bind-address=127.0.0.1:{}", free_port()?))
            .arg(format!("--metrics-bind-address=127.0.0.1:{}", free_port()?));
        self.proxy = Some(Proc::spawn("kube-proxy", proxy, &d.join("kube-proxy.log"))?);

        self.start_kubelet(None)
    }

    /// Starts kubelet; with `image_service`, kubelet's image service is there
    /// (`imageServiceEndpoint`) instead of containerd's.
    fn start_kubelet(&mut self, image_service: Option<&Path>) -> Result<(), EnvError> {
        let d = self.dir.path().to_path_buf();
        let kubeconfig = self.api.kubeconfig().to_path_buf();
        let config = d.join("kubelet-config.json");
        let mut v: serde_json::Value = serde_json::from_str(&kubelet_config(
            &self.containerd_socket(),
            &self.api.ca_path(),
            &d,
            free_port()?,
        ))
        .map_err(|e| EnvError::io("kubelet's config", std::io::Error::other(e)))?;
        if let Some(p) = image_service {
            v["imageServiceEndpoint"] = json!(format!("unix://{}", p.display()));
        }
        let text = serde_json::to_string_pretty(&v).unwrap_or_default();
        std::fs::write(&config, text).map_err(|e| EnvError::io("writing kubelet's config", e))?;
        let mut kubelet = Command::new(tool("kubelet")?);
        kubelet
            .arg(format!("--config={}", config.display()))
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg(format!("--root-dir={}", d.join("kubelet").display()))
            .arg(format!("--hostname-override={NODE_NAME}"))
            .arg(format!("--node-ip={}", self.node_ip))
            .arg("--v=1");
        self.kubelet = Some(Proc::spawn("kubelet", kubelet, &self.kubelet_log())?);
        Ok(())
    }

    /// Restarts kubelet with its image service at `socket` (talaria-node's CRI image-service
    /// proxy), or back on containerd's with `None`; running pods keep running. Returns once
    /// the node is Ready again.
    pub async fn set_kubelet_image_service(
        &mut self,
        socket: Option<&Path>,
    ) -> Result<(), EnvError> {
        drop(self.kubelet.take());
        self.start_kubelet(socket)?;
        self.wait_node_ready().await
    }

    async fn wait_node_ready(&mut self) -> Result<(), EnvError> {
        use k8s_openapi::api::core::v1::Node;
        let client = self.api.client().await?;
        let nodes: kube::Api<Node> = kube::Api::all(client);
        let started = Instant::now();
        loop {
            for p in [&mut self.kubelet, &mut self.proxy, &mut self.scheduler]
                .into_iter()
                .flatten()
            {
                p.check_alive()?;
            }
            if let Ok(Some(node)) = nodes.get_opt(NODE_NAME).await
                && node_ready(&node)
            {
                return Ok(());
            }
            if started.elapsed() > READY_TIMEOUT {
                let kubelet = self.kubelet.as_ref().expect("started above");
                return Err(kubelet.timeout("node Ready", READY_TIMEOUT));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        drop(self.kubelet.take());
        // Pods' containers: their shims carry containerd's socket path.
        let socket = self.containerd_socket();
        kill_processes_mentioning(&socket.to_string_lossy());
        drop(self.scheduler.take());
        drop(self.proxy.take());
        if let Ok(bin) = tool("kube-proxy") {
            let mut c = Command::new(bin);
            c.arg("--cleanup");
            let _ = run(c, Duration::from_secs(30));
        }
        drop(self.containerd.take());
        kill_processes_mentioning(&socket.to_string_lossy());
        if let Ok(ip) = tool("ip") {
            let mut c = Command::new(ip);
            c.args(["link", "del", BRIDGE]);
            let _ = run(c, Duration::from_secs(10));
        }
        remove_kubelet_iptables();
        remove_kubepods_cgroups();
        restore_sysctls(&self.sysctls);
        let d = self.dir.path();
        unmount_under(d);
        let _ = nix::mount::umount2(d, nix::mount::MntFlags::MNT_DETACH);
        // Runc state of this containerd's namespaces.
        let _ = std::fs::remove_dir_all(d.join("runc"));
    }
}

/// The address of the interface the default route leaves by: reachable from the host and
/// from pods (through the bridge's gateway).
fn node_ip() -> Result<Ipv4Addr, EnvError> {
    let mut c = Command::new(tool("ip")?);
    c.args(["-4", "route", "get", "1.1.1.1"]);
    let out = run_ok(c, Duration::from_secs(10))?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_route_src(&text).ok_or_else(|| {
        EnvError::Cluster(format!(
            "no source address in `ip route get 1.1.1.1`: {text:?} (the cluster needs a non-loopback address)"
        ))
    })
}

/// `src A.B.C.D` of `ip route get` output.
fn parse_route_src(text: &str) -> Option<Ipv4Addr> {
    let mut words = text.split_whitespace();
    while let Some(w) = words.next() {
        if w == "src" {
            return words.next()?.parse().ok();
        }
    }
    None
}

/// Host settings the cluster needs: forwarding for pod traffic, bridged traffic through
/// iptables (Services reached from pods on the same bridge), and the cluster dir as a shared
/// mount (kubelet's Bidirectional volumes).
/// Returns the sysctls' earlier values, for [`restore_sysctls`].
fn host_prepare(dir: &Path) -> Result<Vec<(&'static str, String)>, EnvError> {
    if let Ok(modprobe) = tool("modprobe") {
        let mut c = Command::new(modprobe);
        c.arg("br_netfilter");
        let _ = run(c, Duration::from_secs(10));
    }
    let mut earlier = Vec::new();
    for key in SYSCTLS {
        if let Ok(v) = std::fs::read_to_string(key) {
            earlier.push((key, v));
        }
        let _ = std::fs::write(key, "1");
    }
    use nix::mount::{MsFlags, mount};
    mount(Some(dir), dir, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .map_err(|e| EnvError::io(format!("bind-mounting {}", dir.display()), e.into()))?;
    mount(
        None::<&str>,
        dir,
        None::<&str>,
        MsFlags::MS_SHARED | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| EnvError::io(format!("making {} a shared mount", dir.display()), e.into()))?;
    Ok(earlier)
}

/// Sysctls the cluster sets to 1 while it runs.
const SYSCTLS: [&str; 2] = [
    "/proc/sys/net/ipv4/ip_forward",
    "/proc/sys/net/bridge/bridge-nf-call-iptables",
];

fn restore_sysctls(earlier: &[(&'static str, String)]) {
    for (key, value) in earlier {
        let _ = std::fs::write(key, value);
    }
}

/// kubelet's own iptables chains (kube-proxy --cleanup leaves them): the canaries, the hint,
/// and KUBE-FIREWALL, which drops non-loopback traffic to 127.0.0.0/8 and would outlive the
/// test on the host.
fn remove_kubelet_iptables() {
    const RULES: &[&[&str]] = &[
        &["-t", "filter", "-D", "INPUT", "-j", "KUBE-FIREWALL"],
        &["-t", "filter", "-D", "OUTPUT", "-j", "KUBE-FIREWALL"],
        &["-t", "filter", "-F", "KUBE-FIREWALL"],
        &["-t", "filter", "-X", "KUBE-FIREWALL"],
        &["-t", "filter", "-X", "KUBE-KUBELET-CANARY"],
        &["-t", "nat", "-X", "KUBE-KUBELET-CANARY"],
        &["-t", "mangle", "-X", "KUBE-KUBELET-CANARY"],
        &["-t", "mangle", "-X", "KUBE-IPTABLES-HINT"],
    ];
    for bin in ["iptables", "ip6tables"] {
        let Ok(bin) = tool(bin) else { continue };
        for args in RULES {
            let mut c = Command::new(&bin);
            c.args(*args);
            // Missing chains (an earlier cleanup, no IPv6) are fine.
            let _ = run(c, Duration::from_secs(10));
        }
    }
}

/// kubelet leaves its QoS cgroups behind; they are empty once its pods are gone.
fn remove_kubepods_cgroups() {
    let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") else {
        return;
    };
    for h in hierarchies.flatten() {
        let root = h.path().join("kubepods");
        if root.is_dir() {
            remove_cgroup_tree(&root);
        }
    }
}

fn remove_cgroup_tree(dir: &Path) {
    if let Ok(children) = std::fs::read_dir(dir) {
        for c in children.flatten() {
            if c.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&c.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

fn mkdir(p: &Path) -> Result<(), EnvError> {
    std::fs::create_dir_all(p).map_err(|e| EnvError::io(format!("creating {}", p.display()), e))
}

fn node_ready(node: &k8s_openapi::api::core::v1::Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The sandbox image, pushed by digest.
fn push_pause_image(registry: &Registry) -> Result<String, EnvError> {
    let digest = crate::images::pause_image()?.push(&registry.host(), PAUSE_REPO, "1")?;
    Ok(format!("{}/{PAUSE_REPO}@{digest}", registry.host()))
}

/// containerd's config for `version`, CRI on the cluster's dirs, overlayfs as its snapshotter
/// (the chart's configure step registers talaria).
pub fn containerd_config(version: ContainerdVersion, dir: &Path, pause_image: &str) -> String {
    let d = dir.display();
    let common = format!(
        "root = \"{d}/containerd/root\"\nstate = \"{d}/containerd/state\"\n\n\
         [grpc]\n  address = \"{d}/containerd/containerd.sock\"\n\n\
         [ttrpc]\n  address = \"{d}/containerd/containerd.sock.ttrpc\"\n\n\
         [debug]\n  level = \"info\"\n\n"
    );
    match version {
        ContainerdVersion::V1 => {
            let cri = "plugins.\"io.containerd.grpc.v1.cri\"";
            format!(
                "version = 2\n{common}\
                 [plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{d}/containerd/opt\"\n\n\
                 [{cri}]\n  sandbox_image = \"{pause_image}\"\n  stream_server_address = \"127.0.0.1\"\n  \
                 stream_server_port = \"0\"\n  disable_apparmor = true\n  enable_selinux = false\n  \
                 restrict_oom_score_adj = true\n\n\
                 [{cri}.containerd]\n  snapshotter = \"overlayfs\"\n  default_runtime_name = \"runc\"\n\n\
                 [{cri}.containerd.runtimes.runc]\n  runtime_type = \"io.containerd.runc.v2\"\n\n\
                 [{cri}.containerd.runtimes.runc.options]\n  Root = \"{d}/runc\"\n\n\
                 [{cri}.cni]\n  conf_dir = \"{d}/cni/net.d\"\n  bin_dir = \"/usr/lib/cni\"\n\n\
                 [{cri}.registry]\n  config_path = \"{d}/containerd/hosts\"\n"
            )
        }
        ContainerdVersion::V2 => {
            let images = "plugins.\"io.containerd.cri.v1.images\"";
            let runtime = "plugins.\"io.containerd.cri.v1.runtime\"";
            // The erofs snapshotter loads without mkfs.erofs, but then its differ fails the
            // transfer service's start, and with it CRI: off, as on hosts without erofs-utils.
            format!(
                "version = 3\ndisabled_plugins = [\"io.containerd.snapshotter.v1.erofs\"]\n{common}\
                 [{images}]\n  snapshotter = \"overlayfs\"\n\n\
                 [{images}.pinned_images]\n  sandbox = \"{pause_image}\"\n\n\
                 [{images}.registry]\n  config_path = \"{d}/containerd/hosts\"\n\n\
                 [{runtime}]\n  disable_apparmor = true\n  enable_selinux = false\n  \
                 restrict_oom_score_adj = true\n\n\
                 [{runtime}.containerd]\n  default_runtime_name = \"runc\"\n\n\
                 [{runtime}.containerd.runtimes.runc]\n  runtime_type = \"io.containerd.runc.v2\"\n\n\
                 [{runtime}.containerd.runtimes.runc.options]\n  Root = \"{d}/runc\"\n\n\
                 [{runtime}.cni]\n  conf_dir = \"{d}/cni/net.d\"\n  bin_dirs = [\"/usr/lib/cni\"]\n\n\
                 [plugins.\"io.containerd.grpc.v1.cri\"]\n  stream_server_address = \"127.0.0.1\"\n  \
                 stream_server_port = \"0\"\n"
            )
        }
    }
}

/// The pod network: a bridge with host-local addresses, masquerading out of the node.
pub fn cni_config(dir: &Path) -> String {
    let v = json!({
        "cniVersion": "1.0.0",
        "name": "talaria-e2e",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": true,
                "ipMasq": true,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{ "subnet": POD_CIDR }]],
                    "routes": [{ "dst": "0.0.0.0/0" }],
                    "dataDir": dir.join("cni/ipam"),
                }
            },
            { "type": "portmap", "capabilities": { "portMappings": true } }
        ]
    });
    serde_json::to_string_pretty(&v).unwrap_or_default()
}

/// kubelet's config for this host: cgroupfs on cgroup v1, no swap check, no eviction on the
/// CI machine's disk, no image garbage collection, authentication by client certificate.
pub fn kubelet_config(containerd_socket: &Path, ca: &Path, dir: &Path, port: u16) -> String {
    let v = json!({
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "cgroupDriver": "cgroupfs",
        "failCgroupV1": false,
        "failSwapOn": false,
        "containerRuntimeEndpoint": format!("unix://{}", containerd_socket.display()),
        "address": "0.0.0.0",
        "port": port,
        "readOnlyPort": 0,
        "healthzPort": 0,
        "authentication": {
            "anonymous": { "enabled": false },
            "webhook": { "enabled": false },
            "x509": { "clientCAFile": ca },
        },
        "authorization": { "mode": "AlwaysAllow" },
        "podCIDR": POD_CIDR,
        "podLogsDir": dir.join("pod-logs"),
        "resolvConf": "/etc/resolv.conf",
        "evictionHard": {
            "memory.available": "1Mi",
            "nodefs.available": "1%",
            "imagefs.available": "1%",
        },
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "enforceNodeAllocatable": [],
        "localStorageCapacityIsolation": false,
        "serializeImagePulls": false,
        "syncFrequency": "5s",
        "nodeStatusUpdateFrequency": "5s",
        "shutdownGracePeriod": "0s",
        "maxPods": 60,
    });
    serde_json::to_string_pretty(&v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_source_address_is_parsed() {
        let out = "1.1.1.1 via 192.0.2.1 dev eth0 src 192.0.2.2 uid 0 \n    cache \n";
        assert_eq!(parse_route_src(out), Some(Ipv4Addr::new(192, 0, 2, 2)));
        assert_eq!(parse_route_src("unreachable"), None);
        assert_eq!(parse_route_src("x src"), None);
    }

    #[test]
    fn containerd_configs_name_their_version_and_cri_tables() {
        let d = Path::new("/c");
        let v2 = containerd_config(ContainerdVersion::V1, d, "r/p@sha256:1");
        assert!(v2.starts_with("version = 2\n"), "{v2}");
        assert!(v2.contains("sandbox_image = \"r/p@sha256:1\""), "{v2}");
        let v3 = containerd_config(ContainerdVersion::V2, d, "r/p@sha256:1");
        assert!(v3.starts_with("version = 3\n"), "{v3}");
        assert!(
            v3.contains("[plugins.\"io.containerd.cri.v1.images\"]"),
            "{v3}"
        );
        assert!(v3.contains("sandbox = \"r/p@sha256:1\""), "{v3}");
    }

    #[test]
    fn kubelet_config_is_cgroupfs_on_cgroup_v1() {
        let c: serde_json::Value = serde_json::from_str(&kubelet_config(
            Path::new("/s.sock"),
            Path::new("/ca"),
            Path::new("/d"),
            1,
        ))
        .expect("json");
        assert_eq!(c["cgroupDriver"], "cgroupfs");
        assert_eq!(c["failCgroupV1"], false);
        assert_eq!(c["containerRuntimeEndpoint"], "unix:///s.sock");
    }
}
