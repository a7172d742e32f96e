//! Talaria the way users run it (issue 22): `helm install` of `charts/talaria` with the images
//! `hack/images.sh` builds, on a one-node cluster from real parts (etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler, kubelet, kube-proxy, bridge CNI), once on Debian's
//! containerd 1.6 and once on containerd 2.x. The chart's containerd-configure step edits the
//! node's real containerd config and restarts it through the test's supervisor
//! (`restartMethod: signal`).
//!
//! Needs root, `hack/setup.sh` and `hack/tools.sh` (kubelet, containerd2...). The images are
//! built once per run (a release build in its own target dir, cached across runs).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Event, Namespace, Pod};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
    PostParams,
};
use serde_json::json;
use talaria_testenv::cluster::{Cluster, ClusterOptions, ContainerdVersion};
use talaria_testenv::images::{self, ImageBuilder, LayerBuilder};
use talaria_testenv::{http, tool};

const NS: &str = "talaria-system";
const RELEASE: &str = "talaria";
/// Image pulls, the containerd restart and pod starts on a 2-core CI machine.
const ROLLOUT: Duration = Duration::from_secs(300);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf()
}

/// The OCI layouts `hack/images.sh` writes, with their digests: (dir, {name: digest}).
fn talaria_images() -> &'static (PathBuf, BTreeMap<String, String>) {
    static IMAGES: OnceLock<(PathBuf, BTreeMap<String, String>)> = OnceLock::new();
    IMAGES.get_or_init(|| {
        let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
        let out = PathBuf::from(home).join(".cache/talaria/images");
        let res = Command::new("bash")
            .arg(repo_root().join("hack/images.sh"))
            .arg(&out)
            // Its own self-check is the images test's business, not this one's.
            .env("CHECK", "0")
            .output()
            .expect("running hack/images.sh");
        assert!(
            res.status.success(),
            "hack/images.sh failed: {}",
            String::from_utf8_lossy(&res.stderr)
        );
        let digests = String::from_utf8_lossy(&res.stdout)
            .lines()
            .filter_map(|l| {
                let (name, digest) = l.split_once(' ')?;
                digest
                    .starts_with("sha256:")
                    .then(|| (name.to_string(), digest.trim().to_string()))
            })
            .collect::<BTreeMap<_, _>>();
        for b in ["talaria-controller", "talaria-node"] {
            assert!(
                digests.contains_key(b),
                "hack/images.sh printed no digest for {b}"
            );
        }
        (out, digests)
    })
}

/// Pushes a layout with crane; returns `repo@digest`.
fn push_layout(layout: &Path, registry: &str, repo: &str, digest: &str) -> String {
    let reference = format!("{registry}/{repo}:e2e");
    let out = Command::new(tool("crane").expect("crane (hack/tools.sh)"))
        .args(["push", "--insecure"])
        .arg(layout)
        .arg(&reference)
        .output()
        .expect("running crane push");
    assert!(
        out.status.success(),
        "crane push {}: {}",
        layout.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    format!("{registry}/{repo}@{digest}")
}

fn helm(cluster: &Cluster, args: &[String]) -> String {
    let out = Command::new(tool("helm").expect("helm (hack/tools.sh)"))
        .args(args)
        .arg("--kubeconfig")
        .arg(cluster.api().kubeconfig())
        .output()
        .expect("running helm");
    assert!(
        out.status.success(),
        "helm {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `helm install` of the chart with the images of this checkout, the containerd-configure
/// step pointed at the cluster's containerd. On containerd 2.x the agent also serves CRI's
/// image service (kubelet is switched to it once the agent runs).
fn install(cluster: &Cluster, version: ContainerdVersion) {
    let (dir, digests) = talaria_images();
    let reg = cluster.registry().host();
    let controller = push_layout(
        &dir.join("talaria-controller"),
        &reg,
        "talaria/talaria-controller",
        &digests["talaria-controller"],
    );
    let node = push_layout(
        &dir.join("talaria-node"),
        &reg,
        "talaria/talaria-node",
        &digests["talaria-node"],
    );
    let busybox = images::busybox_image()
        .expect("busybox image")
        .push(&reg, "e2e/busybox", "1")
        .expect("pushing busybox");
    let image = |key: &str, reference: &str| {
        let (repo, digest) = reference.split_once('@').expect("repo@digest");
        [
            "--set".to_string(),
            format!("{key}.repository={repo}"),
            "--set".to_string(),
            format!("{key}.digest={digest}"),
        ]
    };
    let root = cluster.host_dir("talaria-node").expect("host dir");
    let sockets = cluster.host_dir("run-talaria").expect("host dir");
    let mut args: Vec<String> = [
        "install",
        RELEASE,
        &repo_root().join("charts/talaria").to_string_lossy(),
        "--namespace",
        NS,
        "--create-namespace",
    ]
    .map(String::from)
    .to_vec();
    args.extend(image("controller.image", &controller));
    args.extend(image("node.image", &node));
    args.extend(image(
        "node.containerd.image",
        &format!("{reg}/e2e/busybox@{busybox}"),
    ));
    for (k, v) in [
        ("node.containerd.configure", "true".to_string()),
        (
            "node.containerd.configPath",
            cluster.containerd_config_path().display().to_string(),
        ),
        ("node.containerd.restartMethod", "signal".to_string()),
        ("node.root", root.display().to_string()),
        ("node.socketDir", sockets.display().to_string()),
        ("node.insecureRegistries[0]", reg.clone()),
        ("controller.insecureRegistries[0]", reg.clone()),
    ] {
        args.push("--set".into());
        args.push(format!("{k}={v}"));
    }
    if version == ContainerdVersion::V2 {
        for (k, v) in [
            ("node.imageService.enabled", "true".to_string()),
            (
                "node.imageService.containerdSocket",
                cluster.containerd_socket().display().to_string(),
            ),
        ] {
            args.push("--set".into());
            args.push(format!("{k}={v}"));
        }
    }
    helm(cluster, &args);
}

/// What a user would look at when a rollout hangs: pods, their container states, events.
async fn diagnostics(client: &kube::Client) -> String {
    let mut s = String::new();
    let pods: Api<Pod> = Api::all(client.clone());
    if let Ok(list) = pods.list(&ListParams::default()).await {
        for p in list {
            let st = p.status.unwrap_or_default();
            s.push_str(&format!(
                "pod {}/{}: {:?} {:?}\n",
                p.metadata.namespace.unwrap_or_default(),
                p.metadata.name.unwrap_or_default(),
                st.phase,
                st.init_container_statuses
                    .unwrap_or_default()
                    .into_iter()
                    .chain(st.container_statuses.unwrap_or_default())
                    .map(|c| (c.name, c.ready, c.state))
                    .collect::<Vec<_>>()
            ));
        }
    }
    let events: Api<Event> = Api::all(client.clone());
    if let Ok(list) = events.list(&ListParams::default()).await {
        for e in list.items.iter().rev().take(30) {
            s.push_str(&format!(
                "event {} {}: {}\n",
                e.involved_object.name.clone().unwrap_or_default(),
                e.reason.clone().unwrap_or_default(),
                e.message.clone().unwrap_or_default()
            ));
        }
    }
    s
}

async fn wait_until<F, Fut>(client: &kube::Client, what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        if started.elapsed() > timeout {
            panic!(
                "timed out after {timeout:?} waiting for {what}\n{}",
                diagnostics(client).await
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn pod_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn pod_running(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|ph| ph == "Running")
}

/// Pods of namespace `ns` matching the label selector.
async fn pods(client: &kube::Client, ns: &str, selector: &str) -> Vec<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let lp = ListParams::default().labels(selector);
    pods.list(&lp).await.map(|l| l.items).unwrap_or_default()
}

/// Pods of one of the chart's components.
async fn pods_of(client: &kube::Client, component: &str) -> Vec<Pod> {
    pods(
        client,
        NS,
        &format!("app.kubernetes.io/component={component}"),
    )
    .await
}

/// The app Deployment's pods.
async fn app_pods(client: &kube::Client) -> Vec<Pod> {
    pods(client, "team-a", "app=app").await
}

/// A pod that sleeps, with the test's short grace period.
fn sleep_pod(name: &str, image: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": { "name": name },
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "c", "image": image,
                "command": ["/bin/sleep", "3600"],
            }],
        },
    }))
    .expect("pod")
}

async fn installs_and_registers_the_snapshotter(version: ContainerdVersion) {
    let started = Instant::now();
    let mut cluster = Cluster::start(ClusterOptions {
        containerd: version,
    })
    .await
    .expect("starting the cluster");
    let client = cluster.api().client().await.expect("client");
    let cluster_up = started.elapsed();
    install(&cluster, version);

    // The configure step edited containerd's config and restarted it through the supervisor.
    wait_until(
        &client,
        "the containerd-config pod Running",
        ROLLOUT,
        || async {
            pods_of(&client, "containerd-config")
                .await
                .iter()
                .any(pod_running)
        },
    )
    .await;
    let config = std::fs::read_to_string(cluster.containerd_config_path()).expect("config");
    assert!(config.contains("[proxy_plugins.talaria]"), "{config}");
    assert!(config.contains(".talaria-bootstrap]"), "{config}");
    assert!(
        cluster.containerd_starts() >= 2,
        "containerd was not restarted by the configure step"
    );
    let default_talaria = config.contains("snapshotter = \"talaria\" # talaria-managed");
    match version {
        // 1.6 has no per-runtime snapshotter: talaria is registered, not made the default.
        ContainerdVersion::V1 => assert!(!default_talaria, "{config}"),
        ContainerdVersion::V2 => assert!(default_talaria, "{config}"),
    }

    // The agent on its bootstrap runtime, Ready; both controller replicas Running, one leads.
    wait_until(&client, "the node agent pod Ready", ROLLOUT, || async {
        pods_of(&client, "node").await.iter().any(pod_ready)
    })
    .await;
    wait_until(&client, "two controller pods Running", ROLLOUT, || async {
        pods_of(&client, "controller")
            .await
            .iter()
            .filter(|p| pod_running(p))
            .count()
            == 2
    })
    .await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), NS);
    let names: Vec<String> = pods_of(&client, "controller")
        .await
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    wait_until(
        &client,
        "a controller pod holding the Lease",
        ROLLOUT,
        || async {
            leases
                .get_opt("talaria-controller")
                .await
                .ok()
                .flatten()
                .and_then(|l| l.spec?.holder_identity)
                .is_some_and(|h| names.contains(&h))
        },
    )
    .await;

    // containerd serves the proxy plugin.
    let out = Command::new(tool("ctr").expect("ctr"))
        .arg("--address")
        .arg(cluster.containerd_socket())
        .args(["plugins", "ls"])
        .output()
        .expect("ctr plugins ls");
    let plugins = String::from_utf8_lossy(&out.stdout);
    assert!(
        plugins
            .lines()
            .any(|l| l.contains("snapshotter") && l.contains("talaria") && l.contains("ok")),
        "{plugins}"
    );
    let ds: Api<DaemonSet> = Api::namespaced(client.clone(), NS);
    let deploy: Api<Deployment> = Api::namespaced(client.clone(), NS);
    assert!(ds.get_opt("talaria-node").await.expect("get").is_some());
    assert!(
        deploy
            .get_opt("talaria-controller")
            .await
            .expect("get")
            .is_some()
    );
    if version == ContainerdVersion::V2 {
        // The README's "Private images": kubelet pulls through the agent's CRI proxy, which
        // starts on each image's artifact as its pull begins.
        let socket = cluster
            .host_dir("run-talaria")
            .expect("host dir")
            .join("images.sock");
        cluster
            .set_kubelet_image_service(Some(&socket))
            .await
            .expect("kubelet on the agent's image service");
    }
    let installed = started.elapsed();
    eprintln!(
        "containerd {version:?}: cluster up in {cluster_up:.1?}, Talaria installed and running after {:.1?}",
        installed - cluster_up
    );

    workload_runs_on_lazily_mounted_layers(&cluster, &client, version).await;
    if version == ContainerdVersion::V2 {
        // Back on containerd's: with the agent's image service, kubelet starts no container
        // (the agent's own included) while the agent is down (README, "Private images").
        cluster
            .set_kubelet_image_service(None)
            .await
            .expect("kubelet back on containerd's image service");
        learning_loop_records_and_serves_the_next_start(&cluster, &client).await;
    }
    upgrade_replaces_the_agent_and_new_pods_start(
        &cluster,
        &client,
        node_image(&client).await,
        version,
    )
    .await;
    agent_down_behaves_as_documented(&cluster, &client, version).await;
    uninstall_leaves_a_node_that_starts_pods(&cluster, &client).await;
    eprintln!(
        "containerd {version:?}: whole test {:.1?} (cluster {cluster_up:.1?})",
        started.elapsed()
    );
}

/// The workload image: busybox, then two 4 MiB data layers; the container checks the data's
/// sha256 every second and is Ready only while the check passes (a failed read exits it).
fn push_app_image(reg: &str) -> String {
    let a = images::noise(1, 4 << 20);
    let b = images::noise(2, 4 << 20);
    let sums = format!(
        "{}  /data/a\n{}  /data/b\n",
        images::sha256_digest(&a).trim_start_matches("sha256:"),
        images::sha256_digest(&b).trim_start_matches("sha256:")
    );
    let image = ImageBuilder::new()
        .layer(images::busybox_layer().expect("busybox layer"))
        .layer(
            LayerBuilder::new()
                .dir("data", 0o755)
                .file("data/a", a, 0o644)
                .build()
                .expect("layer a"),
        )
        .layer(
            LayerBuilder::new()
                .dir("data", 0o755)
                .file("data/b", b, 0o644)
                .file("check.sha256", sums, 0o644)
                .build()
                .expect("layer b"),
        )
        .cmd(&[
            "/bin/sh",
            "-c",
            "while :; do if sha256sum -c /check.sha256 >/dev/null; then touch /tmp/ok; \
             else rm -f /tmp/ok; echo WRONG-OR-FAILED-READ; exit 1; fi; sleep 1; done",
        ])
        .build()
        .expect("app image");
    let digest = image
        .push(reg, "e2e/app", "1")
        .expect("pushing the app image");
    format!("{reg}/e2e/app@{digest}")
}

/// An image whose start reads some of its files: busybox, a layer of 24 files of 256 KiB of
/// which the command reads 6, and a layer with a 2 MiB file read in part.
fn push_learn_image(reg: &str) -> String {
    let mut data = LayerBuilder::new().dir("data", 0o755);
    for i in 0..24u64 {
        data = data.file(
            &format!("data/f{i}"),
            images::noise(100 + i, 256 << 10),
            0o644,
        );
    }
    let image = ImageBuilder::new()
        .layer(images::busybox_layer().expect("busybox layer"))
        .layer(data.build().expect("data layer"))
        .layer(
            LayerBuilder::new()
                .dir("model", 0o755)
                .file("model/weights", images::noise(200, 2 << 20), 0o644)
                .build()
                .expect("model layer"),
        )
        .cmd(&[
            "/bin/sh",
            "-c",
            "for i in 1 3 5 7 11 13; do cat /data/f$i >/dev/null; done; \
             dd if=/model/weights of=/dev/null bs=64k skip=8 count=8 2>/dev/null; \
             touch /tmp/ok; exec sleep 3600",
        ])
        .build()
        .expect("learn image");
    let digest = image
        .push(reg, "e2e/learn", "1")
        .expect("pushing the learn image");
    format!("{reg}/e2e/learn:1@{digest}")
}

/// The pod spec of the test's apps: one container of `image`, Ready while `/tmp/ok` exists.
fn app_pod_spec(image: &str) -> serde_json::Value {
    json!({
        "terminationGracePeriodSeconds": 1,
        "containers": [{
            "name": "app",
            "image": image,
            "readinessProbe": {
                "exec": { "command": ["cat", "/tmp/ok"] },
                "periodSeconds": 1,
            },
        }],
    })
}

/// The pod `name` running `image` (Ready once its start script ran).
fn learn_pod(name: &str, image: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": { "name": name },
        "spec": app_pod_spec(image),
    }))
    .expect("pod")
}

/// Creates pod `name` running `image` and waits until it is Ready.
async fn start_learn_pod(client: &kube::Client, pods: &Api<Pod>, name: &str, image: &str) {
    pods.create(&PostParams::default(), &learn_pod(name, image))
        .await
        .expect("creating a learn pod");
    wait_until(
        client,
        &format!("learn pod {name} Ready"),
        ROLLOUT,
        || async {
            pods.get_opt(name)
                .await
                .ok()
                .flatten()
                .is_some_and(|p| pod_ready(&p))
        },
    )
    .await;
}

/// Events about pod `name` of namespace `ns` with `reason`: their notes.
async fn pod_events(client: &kube::Client, ns: &str, name: &str, reason: &str) -> Vec<String> {
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    events
        .list(&ListParams::default())
        .await
        .map(|l| {
            l.items
                .into_iter()
                .filter(|e| {
                    e.involved_object.name.as_deref() == Some(name)
                        && e.reason.as_deref() == Some(reason)
                })
                .map(|e| e.message.unwrap_or_default())
                .collect()
        })
        .unwrap_or_default()
}

/// `kubectl get` of a cluster-scoped resource at `path`, as kubectl prints it: the server's
/// table (printer columns), in aligned columns.
async fn kubectl_get(client: &kube::Client, path: &str) -> (Vec<String>, Vec<Vec<String>>) {
    let req = ::http::Request::get(path)
        .header(
            "Accept",
            "application/json;as=Table;v=v1;g=meta.k8s.io,application/json",
        )
        .body(Vec::new())
        .expect("request");
    let table: serde_json::Value = client.request(req).await.expect("table");
    let header: Vec<String> = table["columnDefinitions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| c["name"].as_str().unwrap_or_default().to_uppercase())
        .collect();
    let rows: Vec<Vec<String>> = table["rows"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            r["cells"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| match c {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Null => "<none>".into(),
                    v => v.to_string(),
                })
                .collect()
        })
        .collect();
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            rows.iter()
                .map(|r| r.get(i).map_or(0, |c| c.len()))
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: &[String]| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("   ")
            .trim_end()
            .to_string()
    };
    eprintln!("$ kubectl get {path}\n{}", line(&header));
    for r in &rows {
        eprintln!("{}", line(r));
    }
    (header, rows)
}

/// The last lines of the agent's log that mention `needle` (for failure messages).
async fn agent_log(client: &kube::Client, needle: &str) -> String {
    let api: Api<Pod> = Api::namespaced(client.clone(), NS);
    let mut out = String::new();
    for p in pods_of(client, "node").await {
        let name = p.metadata.name.clone().unwrap_or_default();
        let lp = kube::api::LogParams {
            container: Some("snapshotter".into()),
            tail_lines: Some(2000),
            ..Default::default()
        };
        if let Ok(log) = api.logs(&name, &lp).await {
            let lines: Vec<&str> = log.lines().filter(|l| l.contains(needle)).collect();
            out.push_str(&lines[lines.len().saturating_sub(40)..].join("\n"));
        }
    }
    out
}

/// Issue 24's loop with no step in between: the first pod of an image starts on the predicted
/// plan; its node records the start and the controller pins a recorded plan; after the
/// image and its snapshots are gone from the node, the next pod is served from the recorded
/// startup pack, and Events on both pods say what served them.
async fn learning_loop_records_and_serves_the_next_start(cluster: &Cluster, client: &kube::Client) {
    let t0 = Instant::now();
    let reg = cluster.registry().host();
    let image = push_learn_image(&reg);
    let digest = image.split_once('@').expect("digest").1.to_string();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({ "metadata": { "name": "learn" } })).expect("ns"),
        )
        .await
        .expect("creating namespace learn");
    // A short window (the default is 60 s) and one start, to keep the test short.
    let policy: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "talaria.dev/v1alpha1",
        "kind": "AccelerationPolicy",
        "metadata": { "name": "learn" },
        "spec": {
            "images": [image],
            "recording": { "windowSeconds": 10, "starts": 1 },
        },
    }))
    .expect("policy");
    dynamic(client, "AccelerationPolicy")
        .create(&PostParams::default(), &policy)
        .await
        .expect("creating the learn policy");
    let accimgs = dynamic(client, "AcceleratedImage");
    let status = || async {
        accimgs
            .list(&ListParams::default())
            .await
            .ok()
            .and_then(|l| {
                l.items
                    .into_iter()
                    .find(|o| o.data["spec"]["digest"] == digest.as_str())
            })
            .map(|o| o.data["status"].clone())
            .unwrap_or_default()
    };
    wait_until(
        client,
        "the learn image's AcceleratedImage Ready",
        ROLLOUT,
        || async { status().await["phase"] == "Ready" },
    )
    .await;
    let st = status().await;
    assert_eq!(st["planSource"], "predicted", "{st}");
    assert!(
        st["reference"]
            .as_str()
            .is_some_and(|r| r.starts_with(&format!("{reg}/e2e/learn:1@sha256:"))
                && r.len() == format!("{reg}/e2e/learn:1@sha256:").len() + 12),
        "{st}"
    );
    let predicted = st["artifact"]["digest"].clone();

    // First start: the predicted plan.
    let pods: Api<Pod> = Api::namespaced(client.clone(), "learn");
    start_learn_pod(client, &pods, "first", &image).await;
    // No step: the node writes the record after the window, the controller builds and pins.
    wait_until(client, "the recorded plan pinned", ROLLOUT, || async {
        status().await["planSource"] == "recorded"
    })
    .await;
    let st = status().await;
    eprintln!(
        "learning loop: recorded plan pinned {:.1?} after the policy",
        t0.elapsed()
    );
    assert_ne!(st["artifact"]["digest"], predicted, "{st}");
    let start = &st["recordedStarts"][0];
    assert_eq!(start["pod"], "learn/first", "{st}");
    assert!(
        start["node"].as_str().is_some_and(|n| !n.is_empty()),
        "{st}"
    );
    // `kubectl get accimg`: the reference with tag and short digest, plan source, size.
    let (header, rows) = kubectl_get(client, "/apis/talaria.dev/v1alpha1/acceleratedimages").await;
    assert_eq!(
        header,
        [
            "NAME",
            "IMAGE",
            "PLATFORM",
            "PHASE",
            "PLAN",
            "STARTUP",
            "LAST-ERROR",
            "AGE"
        ]
    );
    let row = rows
        .iter()
        .find(|r| r[1].contains("e2e/learn:1@sha256:"))
        .expect("the learn image's row");
    assert_eq!(
        (row[3].as_str(), row[4].as_str()),
        ("Ready", "recorded"),
        "{row:?}"
    );
    assert!(row[5].ends_with("iB"), "human units: {row:?}");
    let served = pod_events(client, "learn", "first", "ImageAccelerated").await;
    assert!(
        served
            .iter()
            .any(|n| n.contains("predicted plan") && n.contains("StartupRecord")),
        "{served:?}"
    );

    // The image, its snapshots (and so the lazy mounts) and content leave the node.
    pods.delete("first", &DeleteParams::default())
        .await
        .expect("deleting the first pod");
    wait_until(client, "the first pod gone", ROLLOUT, || async {
        pods.get_opt("first").await.ok().flatten().is_none()
    })
    .await;
    // kubelet keeps a deleted pod's dead containers until its container GC; they hold the
    // image's snapshots, which a new pull would then reuse without a Prepare.
    let ctr = |args: &[&str]| {
        let out = Command::new(tool("ctr").expect("ctr"))
            .arg("--address")
            .arg(cluster.containerd_socket())
            .args(["-n", "k8s.io"])
            .args(args)
            .output()
            .expect("ctr");
        assert!(
            out.status.success(),
            "ctr {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let containers: Vec<String> = ctr(&[
        "containers",
        "ls",
        "-q",
        "labels.\"io.kubernetes.pod.name\"==first",
    ])
    .lines()
    .map(str::to_string)
    .collect();
    assert!(
        !containers.is_empty(),
        "the first pod's containers in containerd"
    );
    for c in &containers {
        ctr(&["containers", "rm", c]);
    }
    // Every name of the image: its tag, its digest and CRI's image ID (`sha256:<config>`).
    let refs: Vec<String> = ctr(&["images", "ls"])
        .lines()
        .filter(|l| l.contains("e2e/learn") || l.contains(digest.as_str()))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect();
    assert!(
        refs.len() >= 2,
        "the learn image's names in containerd: {refs:?}"
    );
    let mut rm = vec!["images", "rm", "--sync"];
    rm.extend(refs.iter().map(String::as_str));
    ctr(&rm);
    // The node's caches: its span cache on disk emptied, and the agent restarted (its memory
    // tier goes with it; the fd holder keeps the app's mounts for the next agent).
    let spans = cluster
        .host_dir("talaria-node")
        .expect("host dir")
        .join("cache/spans");
    let mut wiped = 0;
    for e in std::fs::read_dir(&spans).expect("the span cache dir") {
        std::fs::remove_file(e.expect("entry").path()).expect("removing a cached span");
        wiped += 1;
    }
    let node_api: Api<Pod> = Api::namespaced(client.clone(), NS);
    let old: Vec<String> = pods_of(client, "node")
        .await
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    for name in &old {
        node_api
            .delete(name, &DeleteParams::default())
            .await
            .expect("deleting the agent's pod");
    }
    wait_until(client, "a new agent Ready", ROLLOUT, || async {
        pods_of(client, "node").await.iter().any(|p| {
            pod_ready(p) && !old.contains(p.metadata.name.as_ref().unwrap_or(&String::new()))
        }) && pods_of(client, "node").await.len() == 1
    })
    .await;
    eprintln!("learning loop: {wiped} cached spans wiped, agent restarted");
    let mounted0 = lazily_mounted_from_cluster(client).await;
    let pack0 = node_metric(client, "talaria_node_startup_pack_bytes_total").await;
    let demand0 = node_metric(client, "talaria_node_fetched_on_demand_bytes_total").await;

    // Second start: the recorded pack.
    start_learn_pod(client, &pods, "second", &image).await;
    let mounted = lazily_mounted_from_cluster(client).await - mounted0;
    // busybox, the bottom layer, is the app's too: its snapshot stays, the two above return.
    assert!(
        mounted >= 2,
        "the second pull mounted {mounted} layers lazily, not the image's 2 of its own; \
         fallbacks {}; snapshots:\n{}\nagent:\n{}",
        node_metric(client, "talaria_node_fallbacks_total").await,
        ctr(&["snapshots", "--snapshotter", "talaria", "ls"]),
        agent_log(client, "learn").await
    );
    let pack = node_metric(client, "talaria_node_startup_pack_bytes_total").await - pack0;
    let demand = node_metric(client, "talaria_node_fetched_on_demand_bytes_total").await - demand0;
    eprintln!("learning loop: second start fetched {pack} pack bytes, {demand} on demand");
    assert!(pack > 0, "the second start fetched no startup pack");
    assert!(
        demand * 10 <= pack,
        "on demand {demand} bytes against a pack of {pack}: the pack missed the start's reads"
    );
    wait_until(client, "the Event on the second pod", ROLLOUT, || async {
        pod_events(client, "learn", "second", "ImageAccelerated")
            .await
            .iter()
            .any(|n| n.contains("recorded plan") && !n.contains("startup pack 0.0 MiB"))
    })
    .await;
    pods.delete("second", &DeleteParams::default())
        .await
        .expect("deleting the second pod");
}

fn dynamic(client: &kube::Client, kind: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("talaria.dev", "v1alpha1", kind);
    Api::all_with(client.clone(), &ApiResource::from_gvk(&gvk))
}

fn deployment(name: &str, image: &str) -> Deployment {
    serde_json::from_value(json!({
        "metadata": { "name": name },
        "spec": {
            "replicas": 1,
            "selector": { "matchLabels": { "app": name } },
            "template": {
                "metadata": { "labels": { "app": name } },
                "spec": app_pod_spec(image),
            },
        },
    }))
    .expect("deployment")
}

fn restarts(p: &Pod) -> i32 {
    p.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .map_or(0, |cs| cs.iter().map(|c| c.restart_count).sum())
}

/// The sum of the node metric lines starting with `prefix`, read through the node's Service:
/// it is headless (metrics are per node), so, as Prometheus does, from its EndpointSlice's
/// addresses.
async fn node_metric(client: &kube::Client, prefix: &str) -> u64 {
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), NS);
    let lp = ListParams::default().labels("kubernetes.io/service-name=talaria-node-metrics");
    let started = Instant::now();
    let hosts = loop {
        let hosts: Vec<String> = slices
            .list(&lp)
            .await
            .map(|l| {
                l.items
                    .iter()
                    .flat_map(|s| {
                        let port = s
                            .ports
                            .as_ref()
                            .and_then(|p| p.first()?.port)
                            .unwrap_or(9180);
                        // A stopping agent's address is left out, as Prometheus would.
                        s.endpoints
                            .iter()
                            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
                            .flat_map(move |e| {
                                e.addresses.iter().map(move |a| format!("{a}:{port}"))
                            })
                    })
                    .collect()
            })
            .unwrap_or_default();
        if !hosts.is_empty() {
            break hosts;
        }
        assert!(
            started.elapsed() < ROLLOUT,
            "no endpoints for the node metrics Service\n{}",
            diagnostics(client).await
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let mut total = 0;
    for host in hosts {
        let res = tokio::task::spawn_blocking(move || {
            http::request(&host, "GET", "/metrics", &[], &[], Duration::from_secs(10))
        })
        .await
        .expect("join")
        .expect("GET /metrics of the node Service's endpoint");
        assert_eq!(res.status, 200);
        total += String::from_utf8_lossy(&res.body)
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
            .map(|v| v as u64)
            .sum::<u64>();
    }
    total
}

async fn lazily_mounted_from_cluster(client: &kube::Client) -> u64 {
    node_metric(
        client,
        "talaria_node_mounted_layers_total{source=\"cluster\"}",
    )
    .await
}

/// The sample policy (every image of pods in namespace team-a) plus the app image listed
/// explicitly, so its artifact is built before the first pod: the AcceleratedImage becomes
/// Ready, then the Deployment's pod mounts its layers lazily from the cluster's pin.
async fn workload_runs_on_lazily_mounted_layers(
    cluster: &Cluster,
    client: &kube::Client,
    version: ContainerdVersion,
) {
    let reg = cluster.registry().host();
    let app = push_app_image(&reg);
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({ "metadata": { "name": "team-a" } })).expect("ns"),
        )
        .await
        .expect("creating namespace team-a");
    let sample = std::fs::read_to_string(repo_root().join("config/samples/one-namespace.yaml"))
        .expect("reading the sample");
    let mut policy: serde_json::Value = serde_saphyr::from_str(&sample).expect("sample YAML");
    policy["spec"]["images"] = json!([app]);
    let policies = dynamic(client, "AccelerationPolicy");
    let obj: DynamicObject = serde_json::from_value(policy).expect("policy");
    policies
        .create(&PostParams::default(), &obj)
        .await
        .expect("applying the sample policy");
    let digest = app.split_once('@').expect("digest").1.to_string();
    let accimgs = dynamic(client, "AcceleratedImage");
    wait_until(
        client,
        "the app's AcceleratedImage Ready",
        ROLLOUT,
        || async {
            accimgs
                .list(&ListParams::default())
                .await
                .map(|l| {
                    l.items.iter().any(|o| {
                        o.data["spec"]["digest"] == digest.as_str()
                            && o.data["status"]["phase"] == "Ready"
                    })
                })
                .unwrap_or(false)
        },
    )
    .await;

    let deploys: Api<Deployment> = Api::namespaced(client.clone(), "team-a");
    deploys
        .create(&PostParams::default(), &deployment("app", &app))
        .await
        .expect("creating the Deployment");
    wait_until(client, "the app pod Ready", ROLLOUT, || async {
        app_pods(client).await.iter().any(pod_ready)
    })
    .await;
    let mounted = lazily_mounted_from_cluster(client).await;
    let warmed = node_metric(
        client,
        "talaria_node_pull_warmups_total{outcome=\"artifact\"}",
    )
    .await;
    match version {
        // busybox + two data layers, each big enough to be indexed; the pull came through
        // the agent's CRI proxy (containerd 2.x pulls with its transfer service behind it)
        // and started on the artifact.
        ContainerdVersion::V2 => {
            assert!(mounted >= 2, "layers mounted lazily: {mounted}");
            assert!(warmed >= 1, "pulls warmed up by the CRI proxy: {warmed}");
        }
        // Documented: on 1.6 talaria is not the default snapshotter, pods pull normally.
        ContainerdVersion::V1 => assert_eq!(mounted, 0, "1.6 must not use talaria by default"),
    }
}

/// The node image the release runs (repository@digest).
async fn node_image(client: &kube::Client) -> String {
    let ds: Api<DaemonSet> = Api::namespaced(client.clone(), NS);
    let ds = ds.get("talaria-node").await.expect("node DaemonSet");
    ds.spec
        .expect("spec")
        .template
        .spec
        .expect("pod spec")
        .containers[0]
        .image
        .clone()
        .expect("image")
}

fn helm_upgrade_node_digest(cluster: &Cluster, digest: &str) {
    helm(
        cluster,
        &[
            "upgrade".into(),
            RELEASE.into(),
            repo_root()
                .join("charts/talaria")
                .to_string_lossy()
                .into_owned(),
            "--namespace".into(),
            NS.into(),
            "--reuse-values".into(),
            "--set".into(),
            format!("node.image.digest={digest}"),
        ],
    );
}

/// `helm upgrade` to another node image digest while the app runs: the agent's pod is
/// replaced, the app keeps passing its checks, and a new app pod starts afterwards.
async fn upgrade_replaces_the_agent_and_new_pods_start(
    cluster: &Cluster,
    client: &kube::Client,
    node: String,
    version: ContainerdVersion,
) {
    let (repo, _) = node.split_once('@').expect("node image by digest");
    // Another build of the same binary: a new config (label) gives a new digest.
    let out = Command::new(tool("crane").expect("crane"))
        .args(["mutate", "--insecure", "--label", "talaria.dev/e2e=upgrade"])
        .arg(&node)
        .arg("--tag")
        .arg(format!("{repo}:upgrade"))
        .output()
        .expect("crane mutate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let new_ref = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let new_digest = new_ref
        .rsplit_once('@')
        .expect("crane prints repo@digest")
        .1
        .to_string();
    let before: Vec<String> = pods_of(client, "node")
        .await
        .into_iter()
        .filter_map(|p| p.metadata.uid)
        .collect();
    let app_before = app_pods(client).await;
    helm_upgrade_node_digest(cluster, &new_digest);
    wait_until(client, "the upgraded node pod Ready", ROLLOUT, || async {
        pods_of(client, "node").await.iter().any(|p| {
            pod_ready(p)
                && !before.contains(p.metadata.uid.as_ref().expect("uid"))
                && p.spec.as_ref().is_some_and(|s| {
                    s.containers[0]
                        .image
                        .as_deref()
                        .is_some_and(|i| i.ends_with(&new_digest))
                })
        })
    })
    .await;
    // The app's pod is the same one, and its container never noticed: the fd holder kept
    // its lazy layers' FUSE connections and the new agent took them over (docs/survive.md).
    wait_until(
        client,
        "the app Ready after the upgrade",
        ROLLOUT,
        || async { app_pods(client).await.iter().all(pod_ready) },
    )
    .await;
    let app_after = app_pods(client).await;
    assert_eq!(app_after.len(), 1);
    assert_eq!(app_after[0].metadata.uid, app_before[0].metadata.uid);
    assert_eq!(
        restarts(&app_after[0]),
        restarts(&app_before[0]),
        "the app's container restarted across the agent's upgrade"
    );
    // The surge update stops the old agent once the new one is ready.
    wait_until(client, "the old agent's pod gone", ROLLOUT, || async {
        pods_of(client, "node")
            .await
            .iter()
            .all(|p| !before.contains(p.metadata.uid.as_ref().expect("uid")))
    })
    .await;
    // The new agent serves the app's lazy layers (none on 1.6, where talaria is not the
    // default snapshotter).
    let lazy = lazily_mounted_from_cluster(client).await;
    let taken = node_metric(client, "talaria_node_handovers_total{outcome=\"taken\"}").await;
    match version {
        ContainerdVersion::V1 => assert_eq!(taken, 0),
        ContainerdVersion::V2 => assert!(taken >= 2, "mounts taken over: {taken}"),
    }
    eprintln!("the new agent took over {taken} mounts ({lazy} mounted by it)");
    // A new pod of the Deployment starts afterwards.
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), "team-a");
    deploys
        .patch(
            "app",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "replicas": 2 } })),
        )
        .await
        .expect("scaling the app");
    wait_until(client, "two app pods Ready", ROLLOUT, || async {
        app_pods(client)
            .await
            .iter()
            .filter(|p| pod_ready(p))
            .count()
            == 2
    })
    .await;
}

/// talaria-node deleted and unable to start (its image cannot be pulled). Documented (README,
/// "While talaria-node is down"): on containerd 2.x, a new pod of an image talaria must unpack
/// waits (kubelet retries) and starts once the agent is back.
/// On 1.6 talaria is not the default snapshotter, so the pod starts at once.
async fn agent_down_behaves_as_documented(
    cluster: &Cluster,
    client: &kube::Client,
    version: ContainerdVersion,
) {
    let good = node_image(client).await;
    let good_digest = good.rsplit_once('@').expect("digest").1.to_string();
    let missing = format!("sha256:{}", "0".repeat(64));
    helm_upgrade_node_digest(cluster, &missing);
    // A surge update keeps the running agent while the new one cannot start: deleted, the
    // agent's pod comes back with the unpullable image.
    let node_pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    for p in pods_of(client, "node").await {
        let name = p.metadata.name.expect("name");
        node_pods
            .delete(&name, &DeleteParams::default())
            .await
            .expect("deleting the agent's pod");
    }
    wait_until(client, "no talaria-node pod Running", ROLLOUT, || async {
        !pods_of(client, "node").await.iter().any(pod_running)
    })
    .await;

    let reg = cluster.registry().host();
    let other = images::busybox_image()
        .expect("busybox")
        .push(&reg, "e2e/other", "1")
        .expect("push");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod = sleep_pod("other", &format!("{reg}/e2e/other@{other}"));
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("creating a pod");
    match version {
        ContainerdVersion::V1 => {
            wait_until(
                client,
                "the unrelated pod Running (1.6)",
                ROLLOUT,
                || async { pods.get("other").await.is_ok_and(|p| pod_running(&p)) },
            )
            .await;
            helm_upgrade_node_digest(cluster, &good_digest);
        }
        ContainerdVersion::V2 => {
            tokio::time::sleep(Duration::from_secs(15)).await;
            let p = pods.get("other").await.expect("pod");
            assert!(
                !pod_running(&p),
                "a pod started on talaria while talaria-node was down"
            );
            helm_upgrade_node_digest(cluster, &good_digest);
            let back = Instant::now();
            wait_until(
                client,
                "the unrelated pod Running after the agent is back",
                ROLLOUT,
                || async { pods.get("other").await.is_ok_and(|p| pod_running(&p)) },
            )
            .await;
            eprintln!(
                "the waiting pod ran {:.1?} after the agent came back",
                back.elapsed()
            );
        }
    }
    pods.delete("other", &DeleteParams::default())
        .await
        .expect("deleting the pod");
}

/// The README's uninstall: restore containerd's config, restart containerd, `helm uninstall`.
/// A new pod of a new image then starts.
async fn uninstall_leaves_a_node_that_starts_pods(cluster: &Cluster, client: &kube::Client) {
    let cfg = cluster.containerd_config_path();
    let bak = cfg.with_extension("toml.talaria.bak");
    std::fs::copy(&bak, &cfg).expect("restoring config.toml.talaria.bak");
    cluster.restart_containerd().expect("restarting containerd");
    helm(
        cluster,
        &[
            "uninstall".into(),
            RELEASE.into(),
            "--namespace".into(),
            NS.into(),
            "--wait".into(),
        ],
    );
    let reg = cluster.registry().host();
    let image = ImageBuilder::new()
        .layer(images::busybox_layer().expect("busybox"))
        .layer(
            LayerBuilder::new()
                .file("after-uninstall", "1", 0o644)
                .build()
                .expect("layer"),
        )
        .build()
        .expect("image");
    let digest = image.push(&reg, "e2e/after", "1").expect("push");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod = sleep_pod("after", &format!("{reg}/e2e/after@{digest}"));
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("creating a pod");
    wait_until(client, "a pod Running after uninstall", ROLLOUT, || async {
        pods.get("after").await.is_ok_and(|p| pod_running(&p))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_install_on_containerd_1_6() {
    installs_and_registers_the_snapshotter(ContainerdVersion::V1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_install_on_containerd_2() {
    installs_and_registers_the_snapshotter(ContainerdVersion::V2).await;
}
