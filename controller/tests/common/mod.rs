//! Shared helpers of the controller's integration tests (real kube-apiserver + etcd, real
//! registry, from talaria-testenv).
#![allow(dead_code)]

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, PostParams};
use talaria_controller::metrics::Metrics;
use talaria_controller::{BuildSettings, Settings};
use tokio::sync::watch;

/// Creates the CRDs from `crds/` (the generated YAML, as a user would apply it) and waits
/// until the apiserver serves them.
pub async fn apply_crds(client: &Client) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("crds/") {
        let path = entry.expect("dir entry").path();
        let text = std::fs::read_to_string(&path).expect("read CRD");
        let crd: CustomResourceDefinition =
            serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        names.push(crd.metadata.name.clone().expect("CRD name"));
        api.create(&PostParams::default(), &crd)
            .await
            .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
    }
    for name in names {
        wait_for(
            &format!("CRD {name} established"),
            Duration::from_secs(60),
            || {
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
            },
        )
        .await;
    }
    // Discovery of a new group can lag its Established condition a little.
    tokio::time::sleep(Duration::from_millis(500)).await;
}

/// Polls `f` until it returns `Some`, failing the test after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The one AcceleratedImage for `digest`, if any (more than one fails the test).
pub async fn image_of(
    api: &Api<talaria_api::AcceleratedImage>,
    digest: &str,
) -> Option<talaria_api::AcceleratedImage> {
    let all = api.list(&Default::default()).await.ok()?.items;
    let mut found: Vec<_> = all
        .into_iter()
        .filter(|i| i.spec.digest == digest)
        .collect();
    assert!(
        found.len() <= 1,
        "more than one AcceleratedImage for {digest}"
    );
    found.pop()
}

/// Waits until the AcceleratedImage for `digest` reaches `phase`.
pub async fn wait_phase(
    api: &Api<talaria_api::AcceleratedImage>,
    digest: &str,
    phase: talaria_api::Phase,
    timeout: Duration,
) -> talaria_api::AcceleratedImage {
    wait_for(&format!("{digest} {phase:?}"), timeout, || async {
        let i = image_of(api, digest).await?;
        (i.status.as_ref()?.phase == phase).then_some(i)
    })
    .await
}

/// A TCP front for a registry that answers the first `throttled` connections with
/// `429 Too Many Requests` (Retry-After: 1) and relays every later one to the real registry.
/// Returns its `127.0.0.1:PORT` and the count of 429s served.
pub async fn throttling_front(
    upstream: String,
    throttled: usize,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind front");
    let addr = listener.local_addr().expect("front addr").to_string();
    let served = Arc::new(AtomicUsize::new(0));
    let counter = served.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let upstream = upstream.clone();
            let counter = counter.clone();
            tokio::spawn(async move {
                if counter.fetch_add(1, Ordering::SeqCst) < throttled {
                    // Read the request head, then refuse it.
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 65536 {
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let _ = conn
                        .write_all(
                            b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\nContent-Type: application/json\r\nContent-Length: 61\r\nConnection: close\r\n\r\n{\"errors\":[{\"code\":\"TOOMANYREQUESTS\",\"message\":\"slow down\"}]}",
                        )
                        .await;
                    let _ = conn.shutdown().await;
                    return;
                }
                if let Ok(mut up) = tokio::net::TcpStream::connect(&upstream).await {
                    let _ = tokio::io::copy_bidirectional(&mut conn, &mut up).await;
                }
            });
        }
    });
    (addr, served)
}

/// Test logs (RUST_LOG, default info), captured per test.
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        ))
        .with_test_writer()
        .try_init();
}

/// The `talaria` CLI binary (package talaria-cli), built once per test process with the cargo
/// that runs the tests, into the same target dir. Integration tests of another package cannot
/// name its binary, so cargo reports where it is (`--message-format json`).
pub fn talaria_cli() -> std::path::PathBuf {
    static BIN: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let out = std::process::Command::new(env!("CARGO"))
            .args([
                "build",
                "-p",
                "talaria-cli",
                "--bin",
                "talaria",
                "--message-format",
                "json-render-diagnostics",
            ])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stderr(std::process::Stdio::inherit())
            .output()
            .expect("running cargo build -p talaria-cli");
        assert!(out.status.success(), "building talaria-cli failed");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "talaria")
            .find_map(|m| m["executable"].as_str().map(std::path::PathBuf::from))
            .expect("cargo names the talaria executable")
    })
    .clone()
}

/// Runs `talaria -o json inspect IMAGE` with extra global flags; returns its JSON output.
pub fn talaria_inspect(image: &str, flags: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new(talaria_cli())
        .args(["--output", "json"])
        .args(flags)
        .args(["inspect", image])
        .env("HOME", std::env::temp_dir())
        .env_remove("DOCKER_CONFIG")
        .env_remove("TALARIA_DOCKER_CONFIG")
        .output()
        .expect("running talaria inspect");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "talaria inspect {image} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("inspect output is not JSON ({e}): {stdout}"))
}

/// Runs the controller in this process with test-sized settings (short backoff, two
/// attempts) until the returned sender says stop.
pub fn start_controller(
    client: Client,
    metrics: Arc<Metrics>,
) -> (watch::Sender<bool>, tokio::task::JoinHandle<()>) {
    let settings = Settings {
        build: BuildSettings {
            max_concurrent: 2,
            max_per_registry: 2,
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(2),
            max_attempts: 2,
            timeout: Duration::from_secs(120),
        },
        resync: Duration::from_secs(30),
        resolve_ttl: Duration::from_secs(30),
        resolve_error_ttl: Duration::from_secs(2),
        ..Default::default()
    };
    let (tx, rx) = watch::channel(false);
    let h = tokio::spawn(async move {
        talaria_controller::run(client, settings, metrics, None, None, rx)
            .await
            .expect("controller run");
    });
    (tx, h)
}
