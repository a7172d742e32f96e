//! The `talaria-controller` binary stopped in the middle of a build, against a real apiserver
//! and a real registry behind a slow link (so a build surely runs for seconds):
//! - SIGKILL while an image is Building: nothing was pushed; a restarted controller finishes
//!   the build, and the registry holds exactly one artifact per key for the image;
//! - SIGTERM while Building: the process exits 0 promptly and hands the image back as Pending
//!   (never left Building); the next controller builds it.
//!
//! The finished artifacts are then resolved by the real `talaria inspect`.

mod common;

use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::image_of;
use kube::api::{Api, PostParams};
use serde_json::json;
use talaria_api::{AcceleratedImage, AccelerationPolicy, Phase};
use talaria_artifact::discover::list_artifacts;
use talaria_artifact::oci::registry::{ImageRef, RegistryClient, RegistryConfig};
use talaria_artifact::oci::store::RegistryStore;
use talaria_testenv::apiserver::KubeApi;
use talaria_testenv::images::{self, ImageBuilder, LayerBuilder};
use talaria_testenv::registry::Registry;

const BIN: &str = env!("CARGO_BIN_EXE_talaria-controller");
/// Link speed of the registry: a layer of `LAYER_BYTES` takes ~8 s to download, so a build is
/// still running seconds after it starts.
const RATE_MBIT: u32 = 8;
const LAYER_BYTES: usize = 8 << 20;
const WAIT: Duration = Duration::from_secs(120);

struct Controller(Child);

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(kubeconfig: &std::path::Path, registry: &str) -> Controller {
    let child = Command::new(BIN)
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "info")
        .args([
            "--http-addr",
            "127.0.0.1:0",
            "--leader-elect",
            "false",
            "--insecure-registry",
            registry,
            "--backoff-base-seconds",
            "1",
            "--log-format",
            "text",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start talaria-controller");
    Controller(child)
}

fn signal(c: &Controller, sig: &str) {
    let status = Command::new("kill")
        .args([&format!("-{sig}"), &c.0.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill -{sig}");
}

/// Waits for the process to exit; returns its status and how long that took.
fn wait_exit(c: &mut Controller, limit: Duration) -> (ExitStatus, Duration) {
    let t0 = Instant::now();
    loop {
        if let Some(s) = c.0.try_wait().expect("try_wait") {
            return (s, t0.elapsed());
        }
        assert!(
            t0.elapsed() < limit,
            "controller still running after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// An image with one layer of incompressible bytes (`seed` makes each image distinct).
fn push_big_image(reg: &Registry, repo: &str, seed: u64) -> String {
    let data = images::noise(seed, LAYER_BYTES);
    let layer = LayerBuilder::new()
        .dir("bin", 0o755)
        .file("bin/app", data, 0o755)
        .file("etc/passwd", b"root:x:0:0::/:/bin/app\n".to_vec(), 0o644)
        .build()
        .expect("layer");
    let img = ImageBuilder::new()
        .layer(layer)
        .entrypoint(&["/bin/app"])
        .build()
        .expect("image");
    img.push(&reg.host(), repo, "v1").expect("push")
}

async fn wait_phase(api: &Api<AcceleratedImage>, digest: &str, phase: Phase) -> AcceleratedImage {
    common::wait_phase(api, digest, phase, WAIT).await
}

fn store(host: &str, repo: &str) -> RegistryStore {
    let client = RegistryClient::new(RegistryConfig {
        insecure_hosts: vec![host.to_string()],
        ..Default::default()
    })
    .expect("registry client");
    let r = ImageRef::parse(&format!("{host}/{repo}:v1")).expect("reference");
    RegistryStore::new(client, r.repository)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_or_terminated_mid_build_then_restarted() {
    talaria_controller::install_crypto_provider();
    let t0 = Instant::now();
    let mark = |what: &str| eprintln!("[{:>6.1}s] {what}", t0.elapsed().as_secs_f64());
    let reg = Registry::start_shaped(RATE_MBIT, 5).expect("shaped registry");
    let host = reg.host();
    let first = push_big_image(&reg, "big/first", 0x5eed_0001);
    let second = push_big_image(&reg, "big/second", 0x5eed_0002);
    let kube = KubeApi::start().await.expect("control plane");
    let client = kube.client().await.expect("client");
    common::apply_crds(&client).await;
    let images: Api<AcceleratedImage> = Api::all(client.clone());
    let policies: Api<AccelerationPolicy> = Api::all(client.clone());
    let plat = format!("linux/{}", images::oci_arch());
    let policy = |name: &str, repo: &str| -> AccelerationPolicy {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"images": [format!("{host}/{repo}:v1")], "platforms": [plat]},
        }))
        .expect("policy")
    };

    // SIGKILL mid-build.
    mark("control plane and images ready");
    let mut c = start(kube.kubeconfig(), &host);
    policies
        .create(&PostParams::default(), &policy("first", "big/first"))
        .await
        .expect("create policy");
    let building = wait_phase(&images, &first, Phase::Building).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    mark("first image Building; SIGKILL");
    signal(&c, "KILL");
    wait_exit(&mut c, Duration::from_secs(10));
    drop(c);
    let first_store = store(&host, "big/first");
    let arts = list_artifacts(&first_store, &first).await.expect("list");
    assert!(
        arts.is_empty(),
        "the kill came before anything was pushed: {arts:?}"
    );
    let left = image_of(&images, &first).await.expect("image");
    assert_eq!(
        left.status.expect("status").phase,
        Phase::Building,
        "a SIGKILL writes nothing"
    );

    mark("restarting");
    let mut c = start(kube.kubeconfig(), &host);
    let done = wait_phase(&images, &first, Phase::Ready).await;
    let st = done.status.clone().expect("status");
    assert_eq!(
        st.attempts, 2,
        "the restarted controller made the second attempt"
    );
    let art = st.artifact.clone().expect("artifact");
    let arts = list_artifacts(&first_store, &first).await.expect("list");
    let key = &building.spec.acceleration_key;
    assert_eq!(
        arts.iter().filter(|a| &a.key == key).count(),
        1,
        "exactly one artifact for the key: {arts:?}"
    );
    assert_eq!(
        arts.len(),
        2,
        "one accelerated + one default artifact: {arts:?}"
    );
    assert!(arts.iter().any(|a| a.descriptor.digest == art.digest));

    mark("first image Ready");
    // SIGTERM mid-build: clean exit, image handed back, not left Building.
    policies
        .create(&PostParams::default(), &policy("second", "big/second"))
        .await
        .expect("create policy");
    wait_phase(&images, &second, Phase::Building).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    mark("second image Building; SIGTERM");
    signal(&c, "TERM");
    let (status, took) = wait_exit(&mut c, Duration::from_secs(30));
    assert!(status.success(), "graceful shutdown exits 0: {status:?}");
    drop(c);
    let handed_back = image_of(&images, &second).await.expect("image");
    let hs = handed_back.status.expect("status");
    assert_eq!(hs.phase, Phase::Pending, "abandoned, not left Building");
    assert!(
        hs.conditions.iter().any(|c| c.reason == "Abandoned"),
        "{:?}",
        hs.conditions
    );
    let second_store = store(&host, "big/second");
    assert!(
        list_artifacts(&second_store, &second)
            .await
            .expect("list")
            .is_empty()
    );
    eprintln!("SIGTERM mid-build: exited in {took:?}");

    mark("controller exited");
    let _c = start(kube.kubeconfig(), &host);
    let done2 = wait_phase(&images, &second, Phase::Ready).await;
    assert_eq!(
        done2.status.expect("status").attempts,
        1,
        "an abandoned build is not a failure"
    );
    let arts = list_artifacts(&second_store, &second).await.expect("list");
    assert_eq!(arts.len(), 2, "{arts:?}");

    mark("second image Ready");
    // The real CLI resolves the artifact and its startup plan from the registry.
    let out = common::talaria_inspect(
        &format!("{host}/big/first@{first}"),
        &["--insecure-registry", &host, "--platform", &plat],
    );
    assert_eq!(out["manifest"]["digest"], first.as_str());
    assert_eq!(out["artifacts"].as_array().map(Vec::len), Some(2), "{out}");
    assert_eq!(out["nodeWouldUse"], art.digest.as_str(), "{out}");
    let files = out["plan"]["files"].as_u64().unwrap_or(0);
    assert!(files >= 1, "the startup plan lists the entrypoint: {out}");
    let paths = out["plan"]["paths"].to_string();
    assert!(paths.contains("/bin/app"), "{out}");
    mark("talaria inspect checked");
}
