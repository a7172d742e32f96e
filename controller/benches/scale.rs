//! Scale benchmark (not a test): the real `talaria-controller` binary against a real
//! kube-apiserver + etcd (+ kube-controller-manager) and a real registry.
//! PODS pods (default 5000) reference IMAGES distinct small images (default 1000); one policy
//! selects them all. Prints the time until every AcceleratedImage is Ready, the controller's
//! peak RSS, and apiserver requests per image (from the apiserver's own metrics).
//!
//! Run: `cargo bench -p talaria-controller --bench scale` (env PODS, IMAGES to scale down).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PostParams};
use serde_json::json;
use talaria_api::{AcceleratedImage, AccelerationPolicy, Phase};
use talaria_testenv::apiserver::{KubeApi, KubeOptions};
use talaria_testenv::images::{self, ImageBuilder, LayerBuilder};
use talaria_testenv::registry::Registry;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Peak resident set (VmHWM) of a process, in KiB.
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Sum of `apiserver_request_total` over all series, optionally only for one resource.
async fn apiserver_requests(client: &kube::Client, resource: Option<&str>) -> f64 {
    let req = http::Request::get("/metrics")
        .body(Vec::new())
        .expect("request");
    let text = client.request_text(req).await.unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
        .filter(|l| resource.is_none_or(|r| l.contains(&format!("resource=\"{r}\""))))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    talaria_controller::install_crypto_provider();
    let pods = env_usize("PODS", 5000);
    let n_images = env_usize("IMAGES", 1000).max(1);
    println!("scale: {pods} pods, {n_images} images");

    let reg = Registry::start().expect("registry");
    let host = reg.host();
    let t = Instant::now();
    for i in 0..n_images {
        let layer = LayerBuilder::new()
            .file("bin/app", format!("image {i}").into_bytes(), 0o755)
            .build()
            .expect("layer");
        let img = ImageBuilder::new().layer(layer).build().expect("image");
        img.push(&host, &format!("bench/img{i}"), "v1")
            .expect("push");
    }
    println!(
        "pushed {n_images} images in {:.1}s",
        t.elapsed().as_secs_f64()
    );

    let kube = KubeApi::start_with(KubeOptions::with_controller_manager())
        .await
        .expect("control plane");
    let client = kube.client().await.expect("client");
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
    for e in std::fs::read_dir(dir).expect("crds") {
        let text = std::fs::read_to_string(e.expect("entry").path()).expect("read");
        let crd: CustomResourceDefinition = serde_saphyr::from_str(&text).expect("crd");
        crds.create(&PostParams::default(), &crd)
            .await
            .expect("create crd");
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": "bench"}})).expect("ns");
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .expect("ns");

    // Pods first (as in a running cluster), then the controller and the policy.
    let pod_api: Api<Pod> = Api::namespaced(client.clone(), "bench");
    let t = Instant::now();
    futures::stream::iter(0..pods)
        .map(|i| {
            let pod_api = pod_api.clone();
            let image = format!("{host}/bench/img{}:v1", i % n_images);
            async move {
                let pod: Pod = serde_json::from_value(json!({
                    "metadata": {"name": format!("pod{i}"), "labels": {"app": "bench"}},
                    "spec": {"automountServiceAccountToken": false,
                             "containers": [{"name": "c", "image": image}]},
                }))
                .expect("pod");
                for _ in 0..100 {
                    match pod_api.create(&PostParams::default(), &pod).await {
                        Ok(_) => return,
                        // The default ServiceAccount appears shortly after the namespace.
                        Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                    }
                }
                panic!("could not create pod{i}");
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    println!("created {pods} pods in {:.1}s", t.elapsed().as_secs_f64());

    let port = talaria_testenv::free_port().expect("port");
    let log = std::fs::File::create(std::env::temp_dir().join("talaria-scale-controller.log"))
        .expect("log file");
    let mut child = Command::new(env!("CARGO_BIN_EXE_talaria-controller"))
        .env("KUBECONFIG", kube.kubeconfig())
        .env("RUST_LOG", "warn")
        .args([
            "--leader-elect",
            "false",
            "--http-addr",
            &format!("127.0.0.1:{port}"),
        ])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("controller");
    let pid = child.id();
    tokio::time::sleep(Duration::from_secs(2)).await;

    let before = apiserver_requests(&client, None).await;
    let before_img = apiserver_requests(&client, Some("acceleratedimages")).await;
    let t = Instant::now();
    let policy: AccelerationPolicy = serde_json::from_value(json!({
        "metadata": {"name": "bench"},
        "spec": {"selector": {"images": [format!("{host}/bench/**")]},
                 "platforms": [format!("linux/{}", images::oci_arch())]},
    }))
    .expect("policy");
    Api::<AccelerationPolicy>::all(client.clone())
        .create(&PostParams::default(), &policy)
        .await
        .expect("policy");

    let imgs: Api<AcceleratedImage> = Api::all(client.clone());
    let deadline = Instant::now() + Duration::from_secs(3600);
    let mut last = 0;
    loop {
        let list = imgs.list(&Default::default()).await.expect("list");
        let ready = list
            .items
            .iter()
            .filter(|i| i.status.as_ref().is_some_and(|s| s.phase == Phase::Ready))
            .count();
        let failed = list
            .items
            .iter()
            .filter(|i| i.status.as_ref().is_some_and(|s| s.phase == Phase::Failed))
            .count();
        if ready != last {
            println!(
                "  {:>6.1}s: {ready}/{n_images} ready, {failed} failed",
                t.elapsed().as_secs_f64()
            );
            last = ready;
        }
        if ready + failed >= n_images {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not all images ready within an hour"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let elapsed = t.elapsed().as_secs_f64();
    let rss = peak_rss_kib(pid).unwrap_or(0);
    // The benchmark's own list polls are excluded from the per-image figure.
    let after = apiserver_requests(&client, None).await;
    let after_img = apiserver_requests(&client, Some("acceleratedimages")).await;
    let _ = child.kill();
    let _ = child.wait();
    println!(
        "RESULT all {n_images} images settled in {elapsed:.1}s ({:.1} images/s)",
        n_images as f64 / elapsed
    );
    println!("RESULT controller peak RSS {:.1} MiB", rss as f64 / 1024.0);
    println!(
        "RESULT apiserver requests: {:.0} total during the run ({:.1} per image, incl. the bench's ~1/s list polls); acceleratedimages {:.1} per image",
        after - before,
        (after - before) / n_images as f64,
        (after_img - before_img) / n_images as f64
    );
}
