//! The Helm chart, the plain manifests and the samples against a real kube-apiserver + etcd and
//! a real registry: lint, server-side dry-run of every rendering, install/upgrade/uninstall,
//! the chart's RBAC running the real `talaria-controller` binary as the chart's
//! ServiceAccount (and failing with a verb removed), the samples reaching Ready, and the
//! containerd patch script checked by containerd's own config parser.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::wait_for;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::rbac::v1::ClusterRole;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use kube::discovery::Scope;
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use talaria_api::{AcceleratedImage, AccelerationPolicy, Phase};
use talaria_testenv::apiserver::KubeApi;
use talaria_testenv::images::{ImageBuilder, LayerBuilder};
use talaria_testenv::registry::Registry;
use talaria_testenv::{free_port, http, tool};

const NS: &str = "talaria-system";
const RELEASE: &str = "talaria";
const CONTROLLER_SA: &str = "talaria-controller";
const BIN: &str = env!("CARGO_BIN_EXE_talaria-controller");
const WAIT: Duration = Duration::from_secs(120);
/// Stands for the registry in samples; tests point it at their registry.
const SAMPLE_REGISTRY: &str = "registry.example.com";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn chart_dir() -> PathBuf {
    repo_root().join("charts/talaria")
}

/// helm with its own config/cache dirs (nothing read from or written to $HOME).
struct Helm {
    kubeconfig: Option<PathBuf>,
    home: tempfile::TempDir,
}

impl Helm {
    fn new(kubeconfig: Option<&Path>) -> Helm {
        Helm {
            kubeconfig: kubeconfig.map(Path::to_path_buf),
            home: tempfile::tempdir().expect("helm home"),
        }
    }

    /// Runs helm; Ok(stdout) on success, Err(stderr) on failure.
    async fn try_run(&self, args: &[&str]) -> Result<String, String> {
        let helm = tool("helm").expect("helm (hack/tools.sh helm)");
        let mut cmd = tokio::process::Command::new(helm);
        cmd.args(args)
            .env("HELM_CACHE_HOME", self.home.path().join("cache"))
            .env("HELM_CONFIG_HOME", self.home.path().join("config"))
            .env("HELM_DATA_HOME", self.home.path().join("data"))
            .env_remove("KUBECONFIG");
        if let Some(k) = &self.kubeconfig {
            cmd.env("KUBECONFIG", k);
        }
        let out = cmd.output().await.expect("running helm");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "helm {args:?}: {}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    async fn run(&self, args: &[&str]) -> String {
        self.try_run(args).await.unwrap_or_else(|e| panic!("{e}"))
    }

    async fn template(&self, set: &[&str]) -> Vec<Value> {
        let chart = chart_dir();
        let mut args = vec![
            "template",
            RELEASE,
            chart.to_str().expect("utf-8 path"),
            "--namespace",
            NS,
        ];
        for s in set {
            args.extend(["--set", s]);
        }
        docs(&self.run(&args).await)
    }
}

/// Every value that turns an optional part of the chart on.
const ALL_FEATURES: &[&str] = &[
    "node.containerd.configure=true",
    "metrics.serviceMonitor.enabled=true",
    "metrics.prometheusRule.enabled=true",
    "metrics.grafanaDashboard.enabled=true",
    "controller.insecureRegistries={registry.local:5000,10.0.0.1:5000}",
    "controller.priorityClassName=system-cluster-critical",
    "controller.signingKey.secretName=talaria-signing",
    "controller.podAnnotations.example\\.com/a=b",
    "node.podAnnotations.example\\.com/a=b",
    "imagePullSecrets={pull-secret}",
    "commonLabels.team=platform",
    "controller.extraEnv[0].name=EXTRA",
    "controller.extraEnv[0].value=on-purpose",
];

/// The non-empty documents of a multi-document YAML stream.
fn docs(yaml: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(yaml)
        .unwrap_or_else(|e| panic!("parsing YAML: {e}\n{yaml}"))
        .into_iter()
        .filter(|v| v.is_object())
        .collect()
}

fn gvk_of(doc: &Value) -> GroupVersionKind {
    let api_version = doc["apiVersion"].as_str().expect("apiVersion");
    let kind = doc["kind"].as_str().expect("kind");
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    GroupVersionKind::gvk(group, version, kind)
}

async fn dynamic_api(
    client: &Client,
    gvk: &GroupVersionKind,
    ns: Option<&str>,
) -> Api<DynamicObject> {
    let (ar, caps) = kube::discovery::pinned_kind(client, gvk)
        .await
        .unwrap_or_else(|e| panic!("discovering {gvk:?}: {e}"));
    match (caps.scope, ns) {
        (Scope::Namespaced, Some(ns)) => Api::namespaced_with(client.clone(), ns, &ar),
        (Scope::Namespaced, None) => Api::all_with(client.clone(), &ar),
        (Scope::Cluster, _) => Api::all_with(client.clone(), &ar),
    }
}

/// Server-side applies every document (as `kubectl apply --server-side [--dry-run=server]`).
async fn apply(client: &Client, docs: &[Value], dry_run: bool) -> Result<(), String> {
    for doc in docs {
        let gvk = gvk_of(doc);
        let name = doc["metadata"]["name"].as_str().expect("metadata.name");
        let ns = doc["metadata"]["namespace"].as_str().unwrap_or("default");
        let api = dynamic_api(client, &gvk, Some(ns)).await;
        let obj: DynamicObject = serde_json::from_value(doc.clone()).expect("object");
        let mut pp = PatchParams::apply("talaria-chart-test").force();
        pp.dry_run = dry_run;
        api.patch(name, &pp, &Patch::Apply(&obj))
            .await
            .map_err(|e| format!("{} {ns}/{name}: {e}", gvk.kind))?;
    }
    Ok(())
}

/// Minimal CRDs for the Prometheus Operator kinds the chart can create, so that the apiserver
/// can validate them (their real CRDs are large and not part of this repository).
async fn install_monitoring_crds(client: &Client) {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for (kind, plural) in [
        ("ServiceMonitor", "servicemonitors"),
        ("PrometheusRule", "prometheusrules"),
    ] {
        let crd: CustomResourceDefinition = serde_json::from_value(json!({
            "metadata": {"name": format!("{plural}.monitoring.coreos.com")},
            "spec": {
                "group": "monitoring.coreos.com",
                "scope": "Namespaced",
                "names": {"kind": kind, "plural": plural, "singular": kind.to_lowercase(),
                          "listKind": format!("{kind}List")},
                "versions": [{"name": "v1", "served": true, "storage": true, "schema": {
                    "openAPIV3Schema": {"type": "object", "properties": {
                        "spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}}}],
            },
        }))
        .expect("crd");
        api.create(&PostParams::default(), &crd)
            .await
            .unwrap_or_else(|e| panic!("creating the {kind} CRD: {e}"));
        let name = crd.name_any();
        wait_for(&format!("{name} established"), WAIT, || {
            let api = api.clone();
            let name = name.clone();
            async move {
                let c = api.get(&name).await.ok()?;
                c.status?
                    .conditions?
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
                    .then_some(())
            }
        })
        .await;
    }
}

async fn create_namespace(client: &Client, name: &str) {
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).expect("ns");
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap_or_else(|e| panic!("creating namespace {name}: {e}"));
}

/// Kinds the chart can create; listed by the release's instance label to find its objects.
const CHART_KINDS: &[(&str, &str, &str)] = &[
    ("", "v1", "ServiceAccount"),
    ("", "v1", "Service"),
    ("", "v1", "ConfigMap"),
    ("apps", "v1", "Deployment"),
    ("apps", "v1", "DaemonSet"),
    ("policy", "v1", "PodDisruptionBudget"),
    ("node.k8s.io", "v1", "RuntimeClass"),
    ("rbac.authorization.k8s.io", "v1", "ClusterRole"),
    ("rbac.authorization.k8s.io", "v1", "ClusterRoleBinding"),
    ("rbac.authorization.k8s.io", "v1", "Role"),
    ("rbac.authorization.k8s.io", "v1", "RoleBinding"),
];

type ObjKey = (String, String, String);

/// Every object in the cluster labelled as part of the release: (kind, namespace, name).
async fn release_objects(client: &Client) -> BTreeSet<ObjKey> {
    let mut out = BTreeSet::new();
    let lp = ListParams::default().labels(&format!("app.kubernetes.io/instance={RELEASE}"));
    for (g, v, k) in CHART_KINDS {
        let api = dynamic_api(client, &GroupVersionKind::gvk(g, v, k), None).await;
        for o in api.list(&lp).await.expect("list").items {
            out.insert((
                k.to_string(),
                o.namespace().unwrap_or_default(),
                o.name_any(),
            ));
        }
    }
    out
}

fn keys(list: &[(&str, &str, &str)]) -> BTreeSet<ObjKey> {
    list.iter()
        .map(|(k, ns, n)| (k.to_string(), ns.to_string(), n.to_string()))
        .collect()
}

/// What the chart installs with default values, node part on or off.
fn expected_objects(node: bool) -> BTreeSet<ObjKey> {
    let mut v = keys(&[
        ("ServiceAccount", NS, "talaria-controller"),
        ("Service", NS, "talaria-controller-metrics"),
        ("Deployment", NS, "talaria-controller"),
        ("PodDisruptionBudget", NS, "talaria-controller"),
        ("ClusterRole", "", "talaria-controller"),
        ("ClusterRoleBinding", "", "talaria-controller"),
        ("Role", "default", "talaria-controller-events"),
        ("RoleBinding", "default", "talaria-controller-events"),
        ("Role", NS, "talaria-controller-leader-election"),
        ("RoleBinding", NS, "talaria-controller-leader-election"),
    ]);
    if node {
        v.extend(keys(&[
            ("ServiceAccount", NS, "talaria-node"),
            ("DaemonSet", NS, "talaria-node"),
            ("DaemonSet", NS, "talaria-fuse-holder"),
            ("RuntimeClass", "", "talaria-bootstrap"),
            ("Service", NS, "talaria-node-metrics"),
            ("ClusterRole", "", "talaria-node"),
            ("ClusterRoleBinding", "", "talaria-node"),
        ]));
    }
    v
}

#[tokio::test]
async fn helm_lint_passes_strictly() {
    let helm = Helm::new(None);
    let chart = chart_dir();
    let chart = chart.to_str().expect("utf-8 path");
    helm.run(&["lint", "--strict", chart]).await;
    let all: Vec<String> = ALL_FEATURES.iter().map(|s| format!("--set={s}")).collect();
    let mut args = vec!["lint", "--strict", chart];
    args.extend(all.iter().map(String::as_str));
    helm.run(&args).await;
    // The schema covers every value: an unknown key or a bad value is rejected.
    for bad in [
        "controller.replicaz=2",
        "controller.logFormat=xml",
        "node.root=relative/dir",
        "controller.leaderElection.enabled=false",
    ] {
        let err = helm
            .try_run(&["template", "x", chart, "--set", bad])
            .await
            .expect_err(bad);
        assert!(
            err.contains("values don't meet the specifications")
                || err.contains("at '/")
                || err.contains("needs controller.leaderElection"),
            "{bad}: {err}"
        );
    }
}

#[test]
fn chart_crds_are_the_generated_crds() {
    let top = repo_root().join("crds");
    let chart = chart_dir().join("crds");
    let list = |d: &Path| -> BTreeSet<String> {
        std::fs::read_dir(d)
            .unwrap_or_else(|e| panic!("{}: {e}", d.display()))
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect()
    };
    assert_eq!(
        list(&top),
        list(&chart),
        "charts/talaria/crds must hold the files of crds/"
    );
    for name in list(&top) {
        let a = std::fs::read(top.join(&name)).expect("read");
        let b = std::fs::read(chart.join(&name)).expect("read");
        assert!(
            a == b,
            "charts/talaria/crds/{name} differs from crds/{name} (it should be a symlink to ../../../crds/{name})"
        );
    }
}

#[test]
fn plain_manifests_are_current() {
    let out = tempfile::tempdir().expect("tmp");
    let status = Command::new("bash")
        .arg(repo_root().join("hack/gen-manifests.sh"))
        .arg(out.path())
        .env("TALARIA_TOOLS", talaria_testenv::tools_bin_dir().join(".."))
        .status()
        .expect("hack/gen-manifests.sh");
    assert!(status.success(), "hack/gen-manifests.sh failed");
    for f in ["talaria.yaml", "kustomization.yaml"] {
        let fresh = std::fs::read_to_string(out.path().join(f)).expect("generated");
        let committed =
            std::fs::read_to_string(repo_root().join("config/install").join(f)).unwrap_or_default();
        assert!(
            fresh == committed,
            "config/install/{f} is stale: run hack/gen-manifests.sh"
        );
    }
}

/// Every resource a kustomization names exists (no kustomize binary here to build them).
#[test]
fn kustomizations_name_existing_files() {
    for dir in [
        "config/install",
        "config/samples",
        "config/gitops",
        "config/gitops/policies",
    ] {
        let dir = repo_root().join(dir);
        let text = std::fs::read_to_string(dir.join("kustomization.yaml")).expect("kustomization");
        let k: Value = serde_saphyr::from_str(&text).expect("yaml");
        let resources = k["resources"].as_array().expect("resources");
        assert!(!resources.is_empty());
        for r in resources {
            let p = dir.join(r.as_str().expect("string"));
            assert!(
                p.exists(),
                "{} names missing {}",
                dir.display(),
                p.display()
            );
        }
    }
}

/// The node agent's container arguments in a rendering.
fn node_args(docs: &[Value]) -> Vec<String> {
    let ds = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet" && d["metadata"]["name"] == "talaria-node")
        .expect("the node DaemonSet");
    ds["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers")
        .iter()
        .flat_map(|c| c["args"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| a.as_str().map(str::to_string))
        .collect()
}

#[tokio::test]
async fn chart_defaults_use_no_unverified_referrers() {
    let helm = Helm::new(None);
    // Nodes trust only what the cluster pins unless the user opts in (docs/trust.md).
    let defaults = node_args(&helm.template(&[]).await);
    assert!(
        !defaults.iter().any(|a| a == "--unverified-referrers"),
        "{defaults:?}"
    );
    assert!(defaults.iter().any(|a| a == "--in-cluster"), "{defaults:?}");
    assert!(
        !defaults.iter().any(|a| a.starts_with("--trusted-key")),
        "{defaults:?}"
    );
    let opted = node_args(&helm.template(&["node.resolve.fromReferrers=true"]).await);
    assert!(
        opted.iter().any(|a| a == "--unverified-referrers"),
        "{opted:?}"
    );
    // A trusted key: referrers signed by it are used, unsigned ones still not.
    let (_, public) = talaria_artifact::signature::SigningKey::generate().expect("key pair");
    let set = format!("node.resolve.trustedKeys={public}");
    let docs = helm.template(&[&set]).await;
    let signed = node_args(&docs);
    assert!(
        signed
            .iter()
            .any(|a| a == "--trusted-key=/etc/talaria/trusted-keys/keys.pem"),
        "{signed:?}"
    );
    assert!(!signed.iter().any(|a| a == "--unverified-referrers"));
    let cm = docs
        .iter()
        .find(|d| {
            d["kind"] == "ConfigMap"
                && d["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.ends_with("-trusted-keys"))
        })
        .expect("the trusted keys ConfigMap");
    let keys = cm["data"]["keys.pem"].as_str().expect("keys.pem");
    talaria_artifact::signature::TrustedKeys::from_pem(keys).expect("the key survives the chart");
}

/// docs/survive.md: the agent hands its FUSE connections to a holder the agent's rolling
/// update never replaces, and a surge update keeps the old agent until the new one is ready.
#[tokio::test]
async fn the_fd_holder_is_wired_and_outlives_agent_updates() {
    let helm = Helm::new(None);
    let docs = helm.template(&[]).await;
    let ds = |name: &str| {
        docs.iter()
            .find(|d| d["kind"] == "DaemonSet" && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("DaemonSet {name}"))
            .clone()
    };
    let (node, holder) = (ds("talaria-node"), ds("talaria-fuse-holder"));
    let args = node_args(&docs);
    assert!(
        args.iter()
            .any(|a| a == "--fuse-holder-socket=/run/talaria/fuse-holder.sock"),
        "{args:?}"
    );
    let h = &holder["spec"]["template"]["spec"];
    assert_eq!(
        h["containers"][0]["args"][0],
        "--socket=/run/talaria/fuse-holder.sock"
    );
    assert_eq!(holder["spec"]["updateStrategy"]["type"], "OnDelete");
    // Never on talaria's own snapshotter, like the agent.
    assert_eq!(h["runtimeClassName"], "talaria-bootstrap");
    assert_eq!(
        node["spec"]["updateStrategy"]["rollingUpdate"],
        json!({"maxSurge": 1, "maxUnavailable": 0})
    );
    let c = &node["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    // Off: no holder, and the agent is not told of one.
    let off = helm.template(&["node.fuseHolder.enabled=false"]).await;
    assert!(
        !off.iter()
            .any(|d| d["metadata"]["name"] == "talaria-fuse-holder"),
        "the holder rendered while off"
    );
    assert!(
        !node_args(&off)
            .iter()
            .any(|a| a.starts_with("--fuse-holder-socket")),
        "the agent told of a holder that is off"
    );
}

#[tokio::test]
async fn a_signing_key_secret_is_mounted_and_passed_to_the_controller() {
    let helm = Helm::new(None);
    let deployment = |docs: Vec<Value>| {
        docs.into_iter()
            .find(|d| d["kind"] == "Deployment")
            .expect("the controller Deployment")
    };
    let plain = deployment(helm.template(&[]).await).to_string();
    assert!(!plain.contains("signing-key"), "{plain}");
    let d = deployment(
        helm.template(&["controller.signingKey.secretName=talaria-signing"])
            .await,
    );
    let spec = &d["spec"]["template"]["spec"];
    let args: Vec<&str> = spec["containers"][0]["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        args.contains(&"--signing-key=/etc/talaria/signing-key/key.pem"),
        "{args:?}"
    );
    let vol = spec["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == "signing-key")
        .expect("the signing key volume");
    assert_eq!(vol["secret"]["secretName"], "talaria-signing");
}

// ---- The Grafana dashboard and the alerts (docs/observability.md) ----

/// Labels Prometheus adds to every scraped series (and `le` of histogram buckets).
const TARGET_LABELS: &[&str] = &["instance", "job", "namespace", "pod", "service", "le"];

/// What the source of a `metrics.rs` registers, read from the text (so a renamed metric
/// changes it): the exposed series names and the label names used.
struct Registered {
    series: BTreeSet<String>,
    labels: BTreeSet<String>,
}

/// The text between the first `start` and the following `end`.
fn between<'a>(s: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let rest = &s[s.find(start)? + start.len()..];
    Some(&rest[..rest.find(end)?])
}

/// Reads `Registry::with_prefix("p")`, each `registry.register("name", "help", <x>.field.clone())`
/// and the field's type in `struct Metrics`. prometheus-client exposes a counter as
/// `p_name_total`, a gauge as `p_name`, a histogram as `p_name_bucket`, `_sum` and `_count`.
fn registered_in(file: &str) -> Registered {
    let path = repo_root().join(file);
    let src = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let prefix = between(&src, "Registry::with_prefix(\"", "\")").expect("with_prefix");
    let body = between(&src, "pub struct Metrics {", "\n}\n").expect("struct Metrics");
    let types: std::collections::HashMap<&str, &str> = body
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with("//"))
        .filter_map(|l| l.trim_start_matches("pub ").split_once(": "))
        .map(|(f, t)| (f.trim(), t.trim_end_matches(',')))
        .collect();
    let calls: Vec<&str> = src.split("registry.register(").skip(1).collect();
    assert!(calls.len() >= 8, "{file}: {} register calls", calls.len());
    let mut series = BTreeSet::new();
    for call in calls {
        // `"name", "help", m.field.clone()`
        let mut q = call.split('"');
        let (_, name, _, _help, rest) = (q.next(), q.next(), q.next(), q.next(), q.next());
        let (name, rest) = (name.expect("name"), rest.expect("the metric"));
        let expr = rest.split(".clone()").next().expect("clone");
        let field = expr
            .trim_matches(|c: char| c == ',' || c.is_whitespace())
            .rsplit('.')
            .next()
            .expect("field");
        let ty = types
            .get(field)
            .unwrap_or_else(|| panic!("{file}: no type for field {field} of {name}"));
        let base = format!("{prefix}_{name}");
        if ty.contains("Histogram") {
            for s in ["bucket", "sum", "count"] {
                series.insert(format!("{base}_{s}"));
            }
        } else if ty.contains("Gauge") {
            series.insert(base);
        } else if ty.contains("Counter") {
            series.insert(format!("{base}_total"));
        } else {
            panic!("{file}: {name} has a type this test does not know: {ty}");
        }
    }
    // Label names: the fields of `#[derive(EncodeLabelSet)]` structs (node) and the keys of
    // `vec![("key", …)]` label lists (controller).
    let mut labels: BTreeSet<String> = TARGET_LABELS.iter().map(|s| s.to_string()).collect();
    for chunk in src.split("EncodeLabelSet)]").skip(1) {
        let fields = between(chunk, "{", "}").expect("label struct");
        for l in fields.lines().map(str::trim) {
            if let Some((f, _)) = l.trim_start_matches("pub ").split_once(": String") {
                labels.insert(f.to_string());
            }
        }
    }
    for chunk in src.split("(\"").skip(1) {
        // `("kind", kind.to_string())`
        if let Some((key, rest)) = chunk.split_once("\", ")
            && key.chars().all(|c| c.is_ascii_lowercase() || c == '_')
            && rest
                .split_once(".to_string())")
                .is_some_and(|(v, _)| v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        {
            labels.insert(key.to_string());
        }
    }
    Registered { series, labels }
}

/// Every series the controller and the node register.
fn registered_metrics() -> Registered {
    let c = registered_in("controller/src/metrics.rs");
    let n = registered_in("node/src/metrics.rs");
    // The reading of the source agrees with what the controller really exposes.
    let m = talaria_controller::metrics::Metrics::new();
    m.reconcile("policy");
    m.reconcile_error("policy", "x");
    m.build_finished("built", 1.0, 1);
    m.build_failed("x");
    m.registry_request("manifest", "ok");
    let text = m.render();
    let mut exposed = BTreeSet::new();
    for l in text.lines() {
        let Some(t) = l.strip_prefix("# TYPE ") else {
            continue;
        };
        let (name, kind) = t.split_once(' ').expect("# TYPE name kind");
        match kind {
            "counter" => {
                exposed.insert(format!("{name}_total"));
            }
            "gauge" => {
                exposed.insert(name.to_string());
            }
            "histogram" => {
                exposed.extend(["bucket", "sum", "count"].map(|s| format!("{name}_{s}")))
            }
            k => panic!("{name}: {k}"),
        }
    }
    assert_eq!(
        c.series, exposed,
        "reading controller/src/metrics.rs\n{text}"
    );
    for l in ["kind", "reason", "result", "op", "status"] {
        assert!(c.labels.contains(l), "controller label {l}: {:?}", c.labels);
    }
    assert!(n.series.len() >= 25, "{:?}", n.series);
    let mut all = c;
    all.series.extend(n.series);
    all.labels.extend(n.labels);
    all
}

/// The `talaria_*` metric names a PromQL expression reads.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let b = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("talaria_") {
        let start = i + at;
        let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
        let mut end = start;
        while end < b.len() && word(b[end]) {
            end += 1;
        }
        if start == 0 || !word(b[start - 1]) {
            out.insert(expr[start..end].to_string());
        }
        i = end;
    }
    out
}

/// The label names an expression groups or matches by: `by (…)`, `on (…)` and `{a="…", b!~"…"}`.
fn label_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for kw in ["by (", "on (", "without ("] {
        for chunk in expr.split(kw).skip(1) {
            let list = chunk.split(')').next().expect("list");
            out.extend(list.split(',').map(|l| l.trim().to_string()));
        }
    }
    for chunk in expr.split('{').skip(1) {
        let list = chunk.split('}').next().expect("matchers");
        for m in list.split(',') {
            let name = m.split(['=', '!']).next().expect("name").trim();
            if !name.is_empty() {
                out.insert(name.to_string());
            }
        }
    }
    out
}

/// Checks what every PromQL expression of the chart must satisfy.
fn check_expr(what: &str, expr: &str, reg: &Registered) -> BTreeSet<String> {
    for (open, close) in [('(', ')'), ('{', '}'), ('[', ']')] {
        assert_eq!(
            expr.matches(open).count(),
            expr.matches(close).count(),
            "{what}: unbalanced {open}{close} in {expr}"
        );
    }
    assert!(
        !expr.contains("{{"),
        "{what}: an unrendered template in {expr}"
    );
    let names = metric_names(expr);
    for n in &names {
        assert!(
            reg.series.contains(n),
            "{what} reads {n}, which neither controller/src/metrics.rs nor node/src/metrics.rs registers\n{expr}"
        );
    }
    for l in label_names(expr) {
        assert!(
            reg.labels.contains(&l),
            "{what} uses label {l:?}, which no metric has ({:?})\n{expr}",
            reg.labels
        );
    }
    names
}

fn grafana_configmaps(docs: &[Value]) -> Vec<&Value> {
    docs.iter()
        .filter(|d| {
            d["kind"] == "ConfigMap"
                && d["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.ends_with("-grafana-dashboard"))
        })
        .collect()
}

#[tokio::test]
async fn the_grafana_dashboard_renders_for_the_sidecar_and_reads_registered_metrics() {
    let reg = registered_metrics();
    let helm = Helm::new(None);
    // Off by default, like the other monitoring objects.
    let defaults = helm.template(&[]).await;
    assert!(grafana_configmaps(&defaults).is_empty());
    assert!(
        !defaults.iter().any(|d| d.to_string().contains("grafana")),
        "something of the dashboard rendered while off"
    );

    let on = helm
        .template(&["metrics.grafanaDashboard.enabled=true"])
        .await;
    let cms = grafana_configmaps(&on);
    assert_eq!(cms.len(), 1, "one dashboard ConfigMap");
    let cm = cms[0];
    assert_eq!(cm["metadata"]["namespace"], NS);
    // The label the Grafana sidecar's default configuration selects by.
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    assert!(
        cm["metadata"]["annotations"].is_null(),
        "no folder unless asked: {cm}"
    );
    let data = cm["data"].as_object().expect("data");
    assert_eq!(data.len(), 1);
    let text = data["talaria.json"].as_str().expect("talaria.json");
    let dash: Value = serde_json::from_str(text).expect("the dashboard is JSON");
    let file: Value = serde_json::from_str(
        &std::fs::read_to_string(chart_dir().join("dashboards/talaria.json")).expect("file"),
    )
    .expect("dashboards/talaria.json");
    assert_eq!(dash, file, "the ConfigMap carries dashboards/talaria.json");
    assert_eq!(dash["uid"], "talaria");

    // Variables: the data source (nothing hard-coded) and the node.
    let vars = dash["templating"]["list"].as_array().expect("variables");
    let var = |n: &str| {
        vars.iter()
            .find(|v| v["name"] == n)
            .unwrap_or_else(|| panic!("variable {n}"))
    };
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    let node = var("node");
    assert_eq!(node["datasource"]["uid"], "${datasource}");
    let q = node["query"]["query"].as_str().expect("node query");
    assert!(q.contains(", instance)"), "{q}");
    check_expr("the node variable", q, &reg);

    let panels = dash["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    let mut read = BTreeSet::new();
    let mut exprs = 0;
    for p in panels {
        let title = p["title"].as_str().expect("title");
        assert!(
            ids.insert(p["id"].as_u64().expect("id")),
            "panel id of {title} twice"
        );
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}");
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{title}");
            let expr = t["expr"].as_str().expect("expr");
            let names = check_expr(title, expr, &reg);
            assert!(!names.is_empty(), "{title}: {expr}");
            if names.iter().any(|n| n.starts_with("talaria_node_")) {
                assert!(
                    expr.contains("instance=~\"$node\""),
                    "{title}: not filtered by the node variable: {expr}"
                );
            }
            read.extend(names);
            exprs += 1;
        }
    }
    assert!(exprs >= 30, "{exprs} expressions");
    // What the dashboard is for.
    for m in [
        "talaria_controller_builds_total",
        "talaria_controller_build_duration_seconds_bucket",
        "talaria_controller_build_queue_depth",
        "talaria_controller_reconcile_errors_total",
        "talaria_node_fetched_on_demand_bytes_total",
        "talaria_node_prefetched_bytes_total",
        "talaria_node_startup_prefetched_bytes_total",
        "talaria_node_from_cache_bytes_total",
        "talaria_node_fallbacks_total",
        "talaria_node_mounted_layers_total",
        "talaria_node_mount_seconds_bucket",
        "talaria_node_read_wait_seconds_bucket",
        "talaria_node_read_errors_total",
        "talaria_node_verification_failures_total",
        "talaria_node_span_cache_bytes",
        "talaria_node_handovers_total",
        "talaria_node_unserved_mounts",
        "talaria_node_pull_warmups_total",
    ] {
        assert!(read.contains(m), "the dashboard shows no {m}");
    }

    // Another sidecar label, a folder, another namespace.
    let custom = helm
        .template(&[
            "metrics.grafanaDashboard.enabled=true",
            "metrics.grafanaDashboard.labelKey=dashboards",
            "metrics.grafanaDashboard.labelValue=talaria",
            "metrics.grafanaDashboard.folder=Platform",
            "metrics.grafanaDashboard.namespace=monitoring",
        ])
        .await;
    let cms = grafana_configmaps(&custom);
    assert_eq!(cms.len(), 1);
    let md = &cms[0]["metadata"];
    assert_eq!(md["namespace"], "monitoring");
    assert_eq!(md["labels"]["dashboards"], "talaria");
    assert!(md["labels"]["grafana_dashboard"].is_null(), "{md}");
    assert_eq!(md["annotations"]["grafana_folder"], "Platform");
}

#[tokio::test]
async fn the_alerts_read_registered_metrics_and_take_their_thresholds_from_values() {
    let reg = registered_metrics();
    let helm = Helm::new(None);
    assert!(
        !helm
            .template(&[])
            .await
            .iter()
            .any(|d| d["kind"] == "PrometheusRule"),
        "the PrometheusRule is opt-in"
    );
    let rules = |docs: Vec<Value>| -> Vec<Value> {
        let pr = docs
            .into_iter()
            .find(|d| d["kind"] == "PrometheusRule")
            .expect("the PrometheusRule");
        pr["spec"]["groups"]
            .as_array()
            .expect("groups")
            .iter()
            .flat_map(|g| g["rules"].as_array().expect("rules").clone())
            .collect()
    };
    let all = rules(
        helm.template(&["metrics.prometheusRule.enabled=true"])
            .await,
    );
    let mut names = BTreeSet::new();
    for r in &all {
        let alert = r["alert"].as_str().expect("alert");
        assert!(names.insert(alert.to_string()), "{alert} twice");
        let expr = r["expr"].as_str().expect("expr");
        let read = check_expr(alert, expr, &reg);
        if alert != "TalariaControllerDown" {
            assert!(!read.is_empty(), "{alert} reads no Talaria metric: {expr}");
        }
        assert!(
            expr.contains(&format!("namespace=\"{NS}\"")),
            "{alert}: {expr}"
        );
        for a in ["summary", "description"] {
            let t = r["annotations"][a].as_str().unwrap_or("");
            assert!(t.len() > 20, "{alert} has no {a}");
        }
        assert!(r["labels"]["severity"].is_string(), "{alert}");
    }
    let node: BTreeSet<&str> = names
        .iter()
        .map(String::as_str)
        .filter(|n| n.starts_with("TalariaNode"))
        .collect();
    assert_eq!(
        node,
        BTreeSet::from([
            "TalariaNodeFallbackRateHigh",
            "TalariaNodeLayerVerificationFailed",
            "TalariaNodeReadErrors",
            "TalariaNodeSpanCacheFull",
            "TalariaNodeUnservedMounts",
            "TalariaNodeHandoverFailed",
            "TalariaNodeSnapshotterUnused",
        ])
    );
    let expr_of = |rules: &[Value], name: &str| -> String {
        rules
            .iter()
            .find(|r| r["alert"] == name)
            .and_then(|r| r["expr"].as_str())
            .unwrap_or_else(|| panic!("{name}"))
            .to_string()
    };
    let unused = expr_of(&all, "TalariaNodeSnapshotterUnused");
    assert!(
        unused.starts_with("max by (instance) (talaria_node_snapshotter_unused{"),
        "{unused}"
    );
    assert!(unused.ends_with("== 1"), "{unused}");
    let fb = expr_of(&all, "TalariaNodeFallbackRateHigh");
    assert!(
        fb.contains("reason!~\"no_artifact\"")
            && fb.contains("[30m]")
            && fb.ends_with("> 20 / 100"),
        "{fb}"
    );
    assert!(expr_of(&all, "TalariaNodeSpanCacheFull").contains("> 95 / 100 * 10240 * 1048576"));

    // Thresholds and windows come from the values.
    let tuned = rules(
        helm.template(&[
            "metrics.prometheusRule.enabled=true",
            "metrics.prometheusRule.nodeFallbackPercentThreshold=50",
            "metrics.prometheusRule.nodeFallbackWindow=2h",
            "metrics.prometheusRule.nodeFallbackIgnoredReasons={no_artifact,no_labels}",
            "metrics.prometheusRule.nodeReadErrorsWindow=5m",
            "metrics.prometheusRule.nodeSpanCacheFullPercent=80",
            "node.cacheMiB=2048",
        ])
        .await,
    );
    let fb = expr_of(&tuned, "TalariaNodeFallbackRateHigh");
    assert!(
        fb.contains("reason!~\"no_artifact|no_labels\"")
            && fb.contains("[2h]")
            && fb.ends_with("> 50 / 100"),
        "{fb}"
    );
    assert!(expr_of(&tuned, "TalariaNodeReadErrors").contains("[5m]"));
    let cache = expr_of(&tuned, "TalariaNodeSpanCacheFull");
    assert!(cache.contains("> 80 / 100 * 2048 * 1048576"), "{cache}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rendering_passes_server_side_dry_run() {
    let kube = KubeApi::start().await.expect("control plane");
    let client = kube.client().await.expect("client");
    common::apply_crds(&client).await;
    install_monitoring_crds(&client).await;
    create_namespace(&client, NS).await;
    let helm = Helm::new(None);

    let defaults = helm.template(&[]).await;
    let all = helm.template(ALL_FEATURES).await;
    let kinds = |d: &[Value]| -> BTreeSet<String> {
        d.iter()
            .map(|o| o["kind"].as_str().unwrap_or("").to_string())
            .collect()
    };
    for k in ["ServiceMonitor", "PrometheusRule", "ConfigMap"] {
        assert!(!kinds(&defaults).contains(k), "{k} is opt-in");
        assert!(kinds(&all).contains(k), "{k} rendered when enabled");
    }
    apply(&client, &defaults, true)
        .await
        .unwrap_or_else(|e| panic!("defaults: {e}"));
    apply(&client, &all, true)
        .await
        .unwrap_or_else(|e| panic!("all features: {e}"));

    // The plain manifests too (their Namespace and CRDs exist already, as objects' dry-runs
    // need them to).
    let text = std::fs::read_to_string(repo_root().join("config/install/talaria.yaml"))
        .expect("manifests");
    let plain = docs(&text);
    assert!(
        plain.len() > defaults.len(),
        "plain manifests hold the CRDs and Namespace too"
    );
    apply(&client, &plain, true)
        .await
        .unwrap_or_else(|e| panic!("config/install/talaria.yaml: {e}"));

    // A dry-run really validates: a broken object is refused.
    let mut broken = defaults
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .expect("deployment")
        .clone();
    broken["spec"]["replicas"] = json!("two");
    assert!(apply(&client, &[broken], true).await.is_err());
    // And it did not create anything.
    assert!(release_objects(&client).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_upgrade_uninstall_change_exactly_the_expected_objects() {
    let kube = KubeApi::start().await.expect("control plane");
    let client = kube.client().await.expect("client");
    let helm = Helm::new(Some(kube.kubeconfig()));
    let chart = chart_dir();
    let chart = chart.to_str().expect("utf-8 path");

    helm.run(&["install", RELEASE, chart, "-n", NS, "--create-namespace"])
        .await;
    assert_eq!(release_objects(&client).await, expected_objects(true));
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for c in [
        "accelerationpolicies.talaria.dev",
        "acceleratedimages.talaria.dev",
    ] {
        crds.get(c).await.unwrap_or_else(|e| panic!("CRD {c}: {e}"));
    }
    let deploys = dynamic_api(
        &client,
        &GroupVersionKind::gvk("apps", "v1", "Deployment"),
        Some(NS),
    )
    .await;
    let d = deploys.get("talaria-controller").await.expect("deployment");
    assert_eq!(d.data["spec"]["replicas"], 2);
    let c = &d.data["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(
        d.data["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"],
        true
    );
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");

    // A policy created meanwhile must survive the uninstall with its CRD.
    let policy: AccelerationPolicy = serde_json::from_value(json!({
        "apiVersion": "talaria.dev/v1alpha1", "kind": "AccelerationPolicy",
        "metadata": {"name": "keep-me"},
        "spec": {"images": ["registry.example.com/a:1"]},
    }))
    .expect("policy");
    Api::<AccelerationPolicy>::all(client.clone())
        .create(&PostParams::default(), &policy)
        .await
        .expect("create policy");

    helm.run(&[
        "upgrade",
        RELEASE,
        chart,
        "-n",
        NS,
        "--set",
        "controller.replicas=3",
        "--set",
        "controller.maxBuilds=7",
        "--set",
        "node.enabled=false",
    ])
    .await;
    assert_eq!(release_objects(&client).await, expected_objects(false));
    let d = deploys.get("talaria-controller").await.expect("deployment");
    assert_eq!(d.data["spec"]["replicas"], 3);
    let args = d.data["spec"]["template"]["spec"]["containers"][0]["args"].clone();
    assert!(
        args.as_array()
            .expect("args")
            .contains(&json!("--max-builds=7")),
        "{args}"
    );

    helm.run(&["uninstall", RELEASE, "-n", NS]).await;
    let left = release_objects(&client).await;
    assert!(left.is_empty(), "left after uninstall: {left:?}");
    for c in [
        "accelerationpolicies.talaria.dev",
        "acceleratedimages.talaria.dev",
    ] {
        crds.get(c)
            .await
            .unwrap_or_else(|e| panic!("CRD {c} must stay: {e}"));
    }
    Api::<AccelerationPolicy>::all(client.clone())
        .get("keep-me")
        .await
        .expect("policies stay with their CRD");
}

/// Pushes a small image of its own content; returns the manifest digest.
fn push_image(reg: &Registry, repo: &str, tag: &str) -> String {
    let layer = LayerBuilder::new()
        .dir("etc", 0o755)
        .file("etc/seed", format!("{repo}:{tag}").into_bytes(), 0o644)
        .file("bin/app", vec![7u8; 100_000], 0o755)
        .build()
        .expect("layer");
    let img = ImageBuilder::new()
        .layer(layer)
        .cmd(&["/bin/app"])
        .build()
        .expect("image");
    img.push(&reg.host(), repo, tag).expect("push image")
}

async fn create_pod(client: &Client, ns: &str, name: &str, image: &str) {
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"containers": [{"name": "c", "image": image}]},
    }))
    .expect("pod");
    Api::<Pod>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &pod)
        .await
        .unwrap_or_else(|e| panic!("create pod {ns}/{name}: {e}"));
}

/// The real controller binary, authenticated as the chart's ServiceAccount.
struct ControllerProc {
    child: Child,
    http: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl ControllerProc {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ControllerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let text = self.log_text();
            let tail: Vec<&str> = text.lines().rev().take(60).collect();
            eprintln!("--- talaria-controller log (last 60 lines, newest first) ---");
            for l in tail {
                eprintln!("{l}");
            }
        }
    }
}

fn start_controller(kubeconfig: &Path) -> ControllerProc {
    let http = format!("127.0.0.1:{}", free_port().expect("port"));
    let dir = tempfile::tempdir().expect("log dir");
    let log = dir.path().join("controller.log");
    let log_file = std::fs::File::create(&log).expect("log file");
    let child = Command::new(BIN)
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "info")
        .args([
            "--http-addr",
            &http,
            "--identity",
            "chart-sa-replica",
            "--lease-namespace",
            NS,
            "--log-format",
            "json",
            "--backoff-base-seconds",
            "1",
            "--backoff-max-seconds",
            "2",
            "--resync-seconds",
            "10",
        ])
        // Logs go to stdout; errors before logging starts to stderr.
        .stdout(Stdio::from(log_file.try_clone().expect("log file")))
        .stderr(Stdio::from(log_file))
        .spawn()
        .expect("start talaria-controller");
    ControllerProc {
        child,
        http,
        log,
        _dir: dir,
    }
}

fn policy_ready(p: &AccelerationPolicy) -> bool {
    p.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    })
}

/// The samples with their registry pointed at the test registry (Docker Hub too).
fn samples(host: &str) -> Vec<Value> {
    let dir = repo_root().join("config/samples");
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .expect("config/samples")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.file_name().is_some_and(|n| n != "kustomization.yaml"))
        .collect();
    names.sort();
    let mut out = Vec::new();
    for p in names {
        let text = std::fs::read_to_string(&p).expect("sample");
        let text = text
            .replace(SAMPLE_REGISTRY, host)
            .replace("docker.io", host);
        out.extend(docs(&text));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_rbac_runs_the_controller_and_samples_reach_ready() {
    talaria_controller::install_crypto_provider();
    let registry = Registry::start().expect("registry");
    let host = registry.host();
    let kube = KubeApi::start().await.expect("control plane");
    let admin = kube.client().await.expect("client");
    let helm = Helm::new(Some(kube.kubeconfig()));
    let chart = chart_dir();
    helm.run(&[
        "install",
        RELEASE,
        chart.to_str().expect("utf-8 path"),
        "-n",
        NS,
        "--create-namespace",
    ])
    .await;

    // Images the samples and the pods name.
    for (repo, tag) in [
        ("team-a/api", "1.0"),
        ("apps/api", "2.0"),
        ("apps/web", "1.0"),
        ("apps/worker", "1.0"),
        ("library/busybox", "1.37"),
        ("apps/late", "1.0"),
    ] {
        push_image(&registry, repo, tag);
    }
    create_namespace(&admin, "team-a").await;
    create_pod(&admin, "team-a", "api", &format!("{host}/team-a/api:1.0")).await;
    create_pod(&admin, "default", "api", &format!("{host}/apps/api:2.0")).await;

    let sa_kubeconfig = kube
        .service_account_kubeconfig(NS, CONTROLLER_SA)
        .expect("SA kubeconfig");
    let ctrl = start_controller(&sa_kubeconfig);

    let samples = samples(&host);
    assert_eq!(samples.len(), 4, "one policy per sample file");
    apply(&admin, &samples, false)
        .await
        .unwrap_or_else(|e| panic!("applying config/samples: {e}"));
    let policies: Api<AccelerationPolicy> = Api::all(admin.clone());
    for s in &samples {
        let name = s["metadata"]["name"].as_str().expect("name").to_string();
        wait_for(&format!("sample policy {name} Ready"), WAIT, || {
            let policies = policies.clone();
            let name = name.clone();
            async move {
                let p = policies.get(&name).await.ok()?;
                policy_ready(&p).then_some(())
            }
        })
        .await;
    }
    let images: Api<AcceleratedImage> = Api::all(admin.clone());
    let all = images
        .list(&Default::default())
        .await
        .expect("list images")
        .items;
    assert!(
        all.len() >= 5,
        "one image per selected reference: {}",
        all.len()
    );
    for i in &all {
        assert_eq!(
            i.status.as_ref().map(|s| s.phase),
            Some(Phase::Ready),
            "{}",
            i.name_any()
        );
    }
    // The public-images sample writes its artifacts to its artifactRepository.
    let busybox = all
        .iter()
        .find(|i| {
            i.owner_references()
                .iter()
                .any(|o| o.name == "public-images")
        })
        .expect("busybox image");
    let artifact = busybox
        .status
        .as_ref()
        .and_then(|s| s.artifact.clone())
        .expect("artifact");
    assert_eq!(
        artifact.repository,
        format!("{host}/talaria/public-artifacts")
    );

    // The probes the chart points at answer.
    for path in ["/healthz", "/readyz"] {
        let r = http::request(&ctrl.http, "GET", path, &[], &[], Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        assert_eq!(r.status, 200, "{path}");
    }
    // The chart's Role for events and its leader-election Role were enough too.
    let leases: Api<Lease> = Api::namespaced(admin.clone(), NS);
    let lease = leases.get("talaria-controller").await.expect("lease");
    assert_eq!(
        lease.spec.and_then(|s| s.holder_identity).as_deref(),
        Some("chart-sa-replica")
    );
    let events = dynamic_api(
        &admin,
        &GroupVersionKind::gvk("events.k8s.io", "v1", "Event"),
        Some("default"),
    )
    .await;
    let evs = events
        .list(&Default::default())
        .await
        .expect("events")
        .items;
    assert!(
        evs.iter()
            .any(|e| e.data["reportingController"] == "talaria-controller"),
        "the controller published events"
    );

    // Without `create` on acceleratedimages the controller can no longer do its job.
    let roles: Api<ClusterRole> = Api::all(admin.clone());
    let mut role = roles.get("talaria-controller").await.expect("cluster role");
    let mut removed = false;
    for rule in role.rules.iter_mut().flatten() {
        if rule
            .resources
            .as_ref()
            .is_some_and(|r| r.iter().any(|r| r == "acceleratedimages"))
        {
            let before = rule.verbs.len();
            rule.verbs.retain(|v| v != "create");
            removed |= rule.verbs.len() < before;
        }
    }
    assert!(removed, "the chart grants create on acceleratedimages");
    role.metadata.managed_fields = None;
    roles
        .replace("talaria-controller", &PostParams::default(), &role)
        .await
        .expect("replace cluster role");
    let late: AccelerationPolicy = serde_json::from_value(json!({
        "apiVersion": "talaria.dev/v1alpha1", "kind": "AccelerationPolicy",
        "metadata": {"name": "late"},
        "spec": {"images": [format!("{host}/apps/late:1.0")]},
    }))
    .expect("policy");
    policies
        .create(&PostParams::default(), &late)
        .await
        .expect("create late policy");
    wait_for("a forbidden reconcile of the late policy", WAIT, || {
        let text = ctrl.log_text();
        async move {
            text.lines()
                .any(|l| l.contains(r#""policy":"late""#) && l.contains("forbidden"))
                .then_some(())
        }
    })
    .await;
    let images_now = images.list(&Default::default()).await.expect("list").items;
    assert!(
        !images_now
            .iter()
            .any(|i| i.owner_references().iter().any(|o| o.name == "late")),
        "no AcceleratedImage can be created without the verb"
    );
    assert!(!policy_ready(&policies.get("late").await.expect("late")));
    drop(ctrl);
}

/// `containerd config default` of `containerd`, written to `dir/config.toml`.
fn default_containerd_config(containerd: &Path, dir: &Path) -> PathBuf {
    let cfg = dir.join("config.toml");
    let default = Command::new(containerd)
        .args(["config", "default"])
        .output()
        .expect("containerd config default");
    assert!(default.status.success());
    std::fs::write(&cfg, &default.stdout).expect("write config");
    cfg
}

/// Runs the chart's containerd patch script on `cfg` without restarting anything; returns
/// its log.
fn run_patch_script(cfg: &Path, set_default: &str) -> String {
    let out = Command::new("sh")
        .arg(chart_dir().join("files/configure-containerd.sh"))
        .env("CONTAINERD_CONFIG", cfg)
        .env("SNAPSHOTTER_SOCKET", "/run/talaria/snapshotter.sock")
        .env("SET_DEFAULT_SNAPSHOTTER", set_default)
        .env("RESTART_CONTAINERD", "false")
        .output()
        .expect("run script");
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{log}");
    log
}

/// `containerd --config CFG config dump`: containerd's own parser must accept the file.
fn containerd_config_dump(containerd: &Path, cfg: &Path) -> String {
    let out = Command::new(containerd)
        .arg("--config")
        .arg(cfg)
        .args(["config", "dump"])
        .output()
        .expect("containerd config dump");
    assert!(
        out.status.success(),
        "containerd rejects the config: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The chart's containerd patch script on containerd's default config: containerd's own
/// parser sees the proxy plugin and the CRI snapshotter; a rerun changes nothing; turning the
/// default snapshotter off restores the original settings.
#[test]
fn containerd_patch_script_produces_a_config_containerd_accepts() {
    let containerd = tool("containerd").expect("containerd (hack/setup.sh)");
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = default_containerd_config(&containerd, dir.path());
    let run = |set_default: &str| run_patch_script(&cfg, set_default);
    let dump = || containerd_config_dump(&containerd, &cfg);
    let snapshotter_line = |text: &str| -> String {
        text.lines()
            .find(|l| l.trim_start().starts_with("snapshotter = "))
            .unwrap_or("")
            .trim()
            .to_string()
    };
    assert_eq!(snapshotter_line(&dump()), "snapshotter = \"overlayfs\"");

    assert!(run("true").contains("updated"));
    let patched = dump();
    assert!(patched.contains("[proxy_plugins.talaria]"), "{patched}");
    assert!(patched.contains("address = \"/run/talaria/snapshotter.sock\""));
    assert_eq!(snapshotter_line(&patched), "snapshotter = \"talaria\"");
    assert!(patched.contains("disable_snapshot_annotations = false"));
    // The agent's runtime handler, with runc's options (1.6 drops its `snapshotter` key when
    // dumping: it has no per-runtime snapshotter, which the script's log says).
    assert!(
        patched.contains("containerd.runtimes.talaria-bootstrap]"),
        "{patched}"
    );
    assert!(
        patched.contains("containerd.runtimes.talaria-bootstrap.options]"),
        "{patched}"
    );
    let once = std::fs::read(&cfg).expect("read");
    assert!(run("true").contains("nothing to do"));
    assert_eq!(
        std::fs::read(&cfg).expect("read"),
        once,
        "a rerun changes nothing"
    );

    run("false");
    let plugin_only = dump();
    assert!(plugin_only.contains("[proxy_plugins.talaria]"));
    assert_eq!(
        snapshotter_line(&plugin_only),
        "snapshotter = \"overlayfs\""
    );
    assert!(dir.path().join("config.toml.talaria.bak").exists());
}

/// The same script on containerd 2.x's default config (version 4 in 2.3; CRI tables as in
/// version 3), checked by containerd 2's own parser: talaria registered and the default, the
/// agent's bootstrap runtime on overlayfs; a rerun changes nothing.
#[test]
fn containerd_patch_script_handles_containerd_2_configs() {
    let containerd = tool("containerd2").expect("containerd2 (hack/tools.sh)");
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = default_containerd_config(&containerd, dir.path());
    let run = || run_patch_script(&cfg, "true");
    assert!(run().contains("updated"));
    let dump = containerd_config_dump(&containerd, &cfg);
    assert!(dump.contains("[proxy_plugins.talaria]"), "{dump}");
    let table = |name: &str| -> String {
        dump.lines()
            .skip_while(|l| l.trim() != name)
            .skip(1)
            .take_while(|l| !l.trim_start().starts_with('['))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let images = table("[plugins.'io.containerd.cri.v1.images']");
    assert!(images.contains("snapshotter = 'talaria'"), "{images}");
    assert!(
        images.contains("disable_snapshot_annotations = false"),
        "{images}"
    );
    let bootstrap =
        table("[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.talaria-bootstrap]");
    assert!(
        bootstrap.contains("snapshotter = 'overlayfs'"),
        "{bootstrap}"
    );
    let once = std::fs::read(&cfg).expect("read");
    assert!(run().contains("nothing to do"));
    assert_eq!(
        std::fs::read(&cfg).expect("read"),
        once,
        "a rerun changes nothing"
    );
}
