//! The `talaria-controller` binary against a real apiserver: flags documented in --help,
//! probes and metrics served, leader election keeps a second replica from reconciling, and the
//! standby takes over when the leader stops (SIGTERM → graceful shutdown, lease released).

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::wait_for;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, PostParams};
use serde_json::json;
use talaria_api::AccelerationPolicy;
use talaria_testenv::apiserver::KubeApi;
use talaria_testenv::{free_port, http};

const BIN: &str = env!("CARGO_BIN_EXE_talaria-controller");

struct Replica {
    child: Child,
    http: String,
    identity: String,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(kubeconfig: &std::path::Path, identity: &str) -> Replica {
    let port = free_port().expect("port");
    let http = format!("127.0.0.1:{port}");
    let child = Command::new(BIN)
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "info")
        .args([
            "--http-addr",
            &http,
            "--identity",
            identity,
            "--lease-namespace",
            "talaria-system",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start talaria-controller");
    Replica {
        child,
        http,
        identity: identity.to_string(),
    }
}

fn get(host: &str, path: &str) -> Option<(u16, String)> {
    let r = http::request(host, "GET", path, &[], &[], Duration::from_secs(5)).ok()?;
    Some((r.status, r.text()))
}

fn reconciles(host: &str) -> u64 {
    get(host, "/metrics")
        .and_then(|(_, text)| {
            text.lines()
                .find(|l| {
                    l.starts_with(
                        "talaria_controller_reconciles_total{kind=\"AccelerationPolicy\"}",
                    )
                })
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map(|v| v as u64)
        .unwrap_or(0)
}

async fn holder(leases: &Api<Lease>) -> Option<String> {
    leases
        .get_opt("talaria-controller")
        .await
        .ok()??
        .spec?
        .holder_identity
        .filter(|h| !h.is_empty())
}

#[test]
fn help_documents_flags_and_env() {
    let out = Command::new(BIN).arg("--help").output().expect("--help");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--max-builds",
        "TALARIA_MAX_BUILDS",
        "--leader-elect",
        "--http-addr",
        "--insecure-registry",
    ] {
        assert!(text.contains(flag), "--help lacks {flag}:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_reconciles_and_a_standby_takes_over() {
    talaria_controller::install_crypto_provider();
    let kube = KubeApi::start().await.expect("control plane");
    let client = kube.client().await.expect("client");
    common::apply_crds(&client).await;
    let ns: Namespace =
        serde_json::from_value(json!({"metadata": {"name": "talaria-system"}})).expect("ns");
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .expect("create namespace");

    let mut a = Some(start(kube.kubeconfig(), "replica-a"));
    let leases: Api<Lease> = Api::namespaced(client.clone(), "talaria-system");
    let first = wait_for("a lease holder", Duration::from_secs(60), || {
        holder(&leases)
    })
    .await;
    assert_eq!(first, "replica-a");
    let b = start(kube.kubeconfig(), "replica-b");
    for r in [a.as_ref().expect("a"), &b] {
        let host = r.http.clone();
        // /healthz answers as soon as the server listens; /readyz only once leader election
        // is set up (a few API calls later), so wait for both rather than assume the order.
        wait_for(
            &format!("{} /healthz and /readyz", r.identity),
            Duration::from_secs(30),
            || {
                let host = host.clone();
                async move {
                    (get(&host, "/healthz")?.0 == 200 && get(&host, "/readyz")?.0 == 200)
                        .then_some(())
                }
            },
        )
        .await;
    }

    // A policy: only the leader reconciles it.
    let p: AccelerationPolicy = serde_json::from_value(json!({
        "metadata": {"name": "p"},
        "spec": {"images": ["127.0.0.1:9/nothing/here:v1"]},
    }))
    .expect("policy");
    Api::<AccelerationPolicy>::all(client.clone())
        .create(&PostParams::default(), &p)
        .await
        .expect("create policy");
    let a_host = a.as_ref().expect("a").http.clone();
    wait_for("leader reconciles", Duration::from_secs(60), || {
        let h = a_host.clone();
        async move { (reconciles(&h) > 0).then_some(()) }
    })
    .await;
    assert_eq!(reconciles(&b.http), 0, "the standby must not reconcile");

    // SIGTERM the leader: it shuts down gracefully and releases the lease; b takes over.
    let mut leader = a.take().expect("a");
    let pid = leader.child.id().to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let status = wait_for("leader exits", Duration::from_secs(60), || {
        let s = leader.child.try_wait().ok().flatten();
        async move { s }
    })
    .await;
    assert!(status.success(), "graceful shutdown exits 0: {status:?}");
    let next = wait_for("replica-b leads", Duration::from_secs(90), || async {
        holder(&leases).await.filter(|h| h == "replica-b")
    })
    .await;
    assert_eq!(next, "replica-b");
    wait_for("new leader reconciles", Duration::from_secs(60), || {
        let h = b.http.clone();
        async move { (reconciles(&h) > 0).then_some(()) }
    })
    .await;
}
