//! Registry credentials as kubelet has them (issue 7, item 3), with the real components: a
//! private (htpasswd) registry, containerd's CRI plugin with runc and the talaria-node binary
//! as its snapshotter, and the node's CRI image-service proxy in front of containerd.
//!
//! - A pull sent to containerd directly (the proxy bypassed) with a credential the node never
//!   sees, and no docker config on the node: every layer falls back (counted, the log says
//!   why: authentication) and the pull still succeeds.
//! - The same kind of pull through the proxy: the node learns the credential, the layers are
//!   mounted lazily, and a container reads files from the lazy layer.
//! - ListImages, ImageStatus and RemoveImage through the proxy answer as containerd does.
//! - The registry's password rotated: a lazy read with the old credential fails (EIO, not a
//!   hang or a loop); after a pull with the new credential, lazy reads work again.
//! - The registry in token mode: tokens are refreshed before they expire and a token the
//!   registry no longer trusts is replaced once.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Node, http_get, metric};
use sha2::{Digest, Sha256};
use talaria_artifact::build::{BuildOptions, build};
use talaria_artifact::format::Profile;
use talaria_artifact::oci::registry::{RegistryClient, RegistryConfig, Repository};
use talaria_artifact::oci::store::{RegistryStore, Store};
use talaria_testenv::cri::{Cri, CriContainerd, CriOptions, CriSnapshotter, proto};
use talaria_testenv::images::{self, Image, ImageBuilder, LayerBuilder};
use talaria_testenv::registry::Registry;

const RUN_TIMEOUT: Duration = Duration::from_secs(60);
const READ_TIMEOUT_SECS: u64 = 3;
const USER: &str = "kubelet";
/// Files of the data layer: each cold file spans several 4 MiB spans, so reading its tail
/// needs spans nothing else fetched.
const COLD_LEN: usize = 9 << 20;
const TAIL_SKIP_BLOCKS: u64 = 130; // 130 * 64 KiB = 8.125 MiB into a cold file
const BLOCK: usize = 64 << 10;

fn test_image(name: &str, seed: u64) -> Image {
    let base = images::busybox_layer_builder()
        .expect("busybox layer")
        .file("etc/talaria-image", format!("{name}\n"), 0o644)
        .build()
        .expect("base layer");
    let data = LayerBuilder::new()
        .file("srv/hot.txt", format!("hot file of {name}\n"), 0o644)
        .file("srv/cold1.bin", images::noise(seed, COLD_LEN), 0o644)
        .file("srv/cold2.bin", images::noise(seed + 100, COLD_LEN), 0o644)
        .file("srv/cold3.bin", images::noise(seed + 200, COLD_LEN), 0o644)
        .build()
        .expect("data layer");
    ImageBuilder::new()
        .layer(base)
        .layer(data)
        .cmd(&["/bin/sh"])
        .build()
        .expect("image")
}

/// `sha256sum` output of the 64 KiB block read by [`tail_read`] from a cold file.
fn tail_sum(seed: u64) -> String {
    let data = images::noise(seed, COLD_LEN);
    let at = (TAIL_SKIP_BLOCKS as usize) * BLOCK;
    let hex = hex::encode(Sha256::digest(&data[at..at + BLOCK]));
    format!("{hex}  -")
}

/// A shell command reading one 64 KiB block near the end of `file`.
fn tail_read(file: &str) -> String {
    format!("dd if={file} bs={BLOCK} skip={TAIL_SKIP_BLOCKS} count=1 2>/dev/null | sha256sum")
}

async fn build_default_artifact(registry: &str, repo: &str) {
    let client = RegistryClient::new(RegistryConfig {
        insecure_hosts: vec![registry.to_string()],
        ..RegistryConfig::default()
    })
    .expect("registry client");
    let store: Arc<dyn Store> = Arc::new(RegistryStore::new(
        client,
        Repository {
            registry: registry.to_string(),
            name: repo.to_string(),
        },
    ));
    let opts = BuildOptions {
        profile: Profile::Default,
        ..BuildOptions::default()
    };
    build(store, "v1", None, &opts)
        .await
        .unwrap_or_else(|e| panic!("build the artifact of {repo}:v1: {e}"));
}

fn pull_request(image: &str, password: &str) -> proto::PullImageRequest {
    proto::PullImageRequest {
        image: Some(proto::ImageSpec {
            image: image.to_string(),
            ..Default::default()
        }),
        auth: Some(proto::AuthConfig {
            username: USER.into(),
            password: password.into(),
            ..Default::default()
        }),
        sandbox_config: None,
    }
}

fn sum_metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn wait_for_socket(path: &Path) {
    let start = Instant::now();
    while std::os::unix::net::UnixStream::connect(path).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{} not served",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A node serving CRI's image service in `dir`, and a containerd it forwards to.
struct Proxied {
    node: Node,
    metrics_addr: String,
    env: CriContainerd,
    /// CRI image client of the node's proxy.
    via: Cri,
}

/// Starts a node with its image-service proxy (plus `args`) and a containerd whose CRI
/// snapshotter is talaria (`on_talaria`) or overlayfs.
async fn start_proxied(dir: &Path, host: &str, args: &[&str], on_talaria: bool) -> Proxied {
    let metrics_addr = format!(
        "127.0.0.1:{}",
        talaria_testenv::free_port().expect("free port")
    );
    // containerd starts after the node (it needs the snapshotter socket); the proxy reaches
    // it through a link made once its socket is known.
    let containerd_link = dir.join("containerd.sock");
    let proxy_socket = dir.join("images.sock");
    let mut all: Vec<String> = vec![
        "--insecure-registry".into(),
        host.to_string(),
        "--metrics-addr".into(),
        metrics_addr.clone(),
        "--image-service-socket".into(),
        proxy_socket.display().to_string(),
        "--containerd-socket".into(),
        containerd_link.display().to_string(),
    ];
    all.extend(args.iter().map(|a| a.to_string()));
    let node = Node::start(
        &dir.join("root"),
        &dir.join("talaria.sock"),
        &dir.join("node.log"),
        &all,
    );
    let snapshotter = if on_talaria {
        CriSnapshotter::Proxy {
            name: "talaria".into(),
            socket: node.socket.clone(),
        }
    } else {
        CriSnapshotter::Overlayfs
    };
    let env = CriContainerd::start(CriOptions {
        snapshotter,
        ..CriOptions::default()
    })
    .expect("start containerd with CRI");
    env.allow_plain_http(host).expect("plain-HTTP registry");
    std::os::unix::fs::symlink(env.socket(), &containerd_link).expect("link containerd socket");
    wait_for_socket(&proxy_socket);
    let via = Cri::connect(&proxy_socket, &env.pod_log_root())
        .await
        .expect("CRI image client (proxy)");
    Proxied {
        node,
        metrics_addr,
        env,
        via,
    }
}

/// Waits (up to `secs`) for `line` among the node's metrics; returns the metrics then.
async fn wait_metric_line(p: &Proxied, line: &str, secs: u64) -> String {
    let t = Instant::now();
    loop {
        let m = http_get(&p.metrics_addr, "/metrics");
        if m.lines().any(|l| l == line) {
            return m;
        }
        assert!(
            t.elapsed() < Duration::from_secs(secs),
            "no `{line}`:\n{m}\n{}",
            p.node.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_credentials_reach_lazy_reads_through_the_cri_proxy() {
    let t0 = Instant::now();
    talaria_artifact::oci::registry::install_crypto_provider();
    let dir = tempfile::Builder::new()
        .prefix("tlr-cri-auth-")
        .tempdir()
        .expect("tempdir");
    // Filled anonymously, then made private.
    let mut registry = Registry::start().expect("start registry");
    let host = registry.host();
    let private = test_image("private", 1);
    let direct = test_image("direct", 2);
    for (name, image) in [("private", &private), ("direct", &direct)] {
        let repo = format!("talaria/{name}");
        image.push(&host, &repo, "v1").expect("push image");
        build_default_artifact(&host, &repo).await;
    }
    registry
        .set_auth(Some((USER, "pw-1")))
        .expect("make the registry private");

    let read_timeout = format!("{READ_TIMEOUT_SECS}s");
    let proxied = start_proxied(
        dir.path(),
        &host,
        &[
            "--read-timeout",
            &read_timeout,
            // Only what containers read is fetched: the cold files stay cold.
            "--no-prefetch",
        ],
        true,
    )
    .await;
    let (node, metrics_addr, env, via) = (
        &proxied.node,
        &proxied.metrics_addr,
        &proxied.env,
        &proxied.via,
    );
    let cri = env.client().await.expect("CRI client (containerd)");
    eprintln!("registry, node and containerd up at {:?}", t0.elapsed());

    // 1. Proxy bypassed: containerd has the credential, the node does not.
    let direct_ref = format!("{host}/talaria/direct:v1");
    cri.pull_image_with(pull_request(&direct_ref, "pw-1"))
        .await
        .expect("PullImage on containerd directly");
    let m = http_get(metrics_addr, "/metrics");
    assert_eq!(
        sum_metric(&m, "talaria_node_mounted_layers_total"),
        0.0,
        "{m}"
    );
    assert_eq!(
        sum_metric(&m, "talaria_node_fallbacks_total"),
        2.0,
        "both layers fell back:\n{m}"
    );
    let log = node.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("unpacking") && l.contains("authenticating to")),
        "the fallback's reason names authentication:\n{log}"
    );
    assert!(
        !log.contains("pw-1"),
        "a password never reaches the log:\n{log}"
    );

    // 2. Through the proxy: the node learns the credential and mounts lazily.
    let private_ref = format!("{host}/talaria/private:v1");
    let id = via
        .pull_image_with(pull_request(&private_ref, "pw-1"))
        .await
        .expect("PullImage through the proxy");
    assert_eq!(id, private.config_digest, "the image id containerd gives");
    // The proxy told the node of the pull: it resolved the artifact ahead of containerd
    // (with the credential just learned). Counted when that ends, which may follow the pull.
    wait_metric_line(
        &proxied,
        "talaria_node_pull_warmups_total{outcome=\"artifact\"} 1",
        10,
    )
    .await;
    let m = http_get(metrics_addr, "/metrics");
    assert_eq!(
        sum_metric(&m, "talaria_node_mounted_layers_total"),
        2.0,
        "{m}"
    );
    assert_eq!(sum_metric(&m, "talaria_node_fallbacks_total"), 2.0, "{m}");
    let pod = cri.run_pod("auth").await.expect("RunPodSandbox");
    let run = cri
        .run_to_exit(
            &pod,
            "first",
            &private_ref,
            &[
                "sh",
                "-c",
                &format!("cat /srv/hot.txt; {}", tail_read("/srv/cold1.bin")),
            ],
            RUN_TIMEOUT,
        )
        .await
        .expect("run a container of the private image");
    assert_eq!(
        (run.exit_code, run.stdout.as_str()),
        (
            0,
            format!("hot file of private\n{}\n", tail_sum(1)).as_str()
        ),
        "stderr: {}",
        run.stderr
    );
    let m = http_get(metrics_addr, "/metrics");
    assert!(
        metric(&m, "talaria_node_fetched_on_demand_bytes_total") >= BLOCK as f64,
        "{m}"
    );
    assert_eq!(metric(&m, "talaria_node_read_errors_total"), 0.0, "{m}");

    // 3. The other image-service calls through the proxy answer as containerd does.
    let mut ours = via.list_images().await.expect("ListImages via proxy");
    let mut theirs = cri.list_images().await.expect("ListImages on containerd");
    // containerd lists in no fixed order (a map walk): compare as sets.
    ours.sort_by(|a, b| a.id.cmp(&b.id));
    theirs.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(ours, theirs);
    assert!(ours.iter().any(|i| i.repo_tags.contains(&private_ref)));
    for image in [private_ref.as_str(), "127.0.0.1:1/no/such:image"] {
        assert_eq!(
            via.image_status(image)
                .await
                .expect("ImageStatus via proxy"),
            cri.image_status(image).await.expect("ImageStatus"),
            "{image}"
        );
    }
    // 4. The password rotated on the registry: the node's credential is refused, a lazy
    //    read fails (at once: an auth error is not retried), until a pull brings the new one.
    registry
        .set_auth(Some((USER, "pw-2")))
        .expect("rotate the password");
    let t = Instant::now();
    let run = cri
        .run_to_exit(
            &pod,
            "stale",
            &private_ref,
            &["sh", "-c", "dd if=/srv/cold2.bin of=/dev/null bs=65536"],
            RUN_TIMEOUT,
        )
        .await
        .expect("run a container with the old credential");
    assert_ne!(run.exit_code, 0, "read with a refused credential: {run:?}");
    eprintln!("refused read failed after {:?}", t.elapsed());
    // The node answers a layer's reads with EIO for one read timeout after a failed fetch.
    tokio::time::sleep(Duration::from_secs(READ_TIMEOUT_SECS + 1)).await;
    via.pull_image_with(pull_request(&private_ref, "pw-2"))
        .await
        .expect("PullImage with the new password through the proxy");
    let run = cri
        .run_to_exit(
            &pod,
            "rotated",
            &private_ref,
            &["sh", "-c", &tail_read("/srv/cold2.bin")],
            RUN_TIMEOUT,
        )
        .await
        .expect("run a container after the rotation");
    assert_eq!(
        (run.exit_code, run.stdout.as_str()),
        (0, format!("{}\n", tail_sum(101)).as_str()),
        "stderr: {}",
        run.stderr
    );

    // 4b. Another tenant pulls the same repository with a wrong secret: containerd refuses
    //     the pull, and the credential that works stays the node's (it was kept only after
    //     a successful pull), so a file nothing has read yet still reads lazily.
    via.pull_image_with(pull_request(&private_ref, "bogus"))
        .await
        .expect_err("a pull with a wrong password fails");
    let run = cri
        .run_to_exit(
            &pod,
            "after-bogus",
            &private_ref,
            &["sh", "-c", &tail_read("/srv/cold3.bin")],
            RUN_TIMEOUT,
        )
        .await
        .expect("run a container after a failed pull");
    assert_eq!(
        (run.exit_code, run.stdout.as_str()),
        (0, format!("{}\n", tail_sum(201)).as_str()),
        "a failed pull replaced the working credential; stderr: {}",
        run.stderr
    );

    // containerd had the image at the second pull: nothing was warmed (checked after the
    // container run, so a wrong warm-up would have been counted by now).
    let m = http_get(metrics_addr, "/metrics");
    assert_eq!(
        sum_metric(&m, "talaria_node_pull_warmups_total"),
        1.0,
        "{m}"
    );

    // 5. RemoveImage through the proxy.
    via.remove_image(&direct_ref)
        .await
        .expect("RemoveImage via proxy");
    assert!(
        cri.image_status(&direct_ref)
            .await
            .expect("ImageStatus")
            .is_none(),
        "removed on containerd"
    );
    let log = node.log_text();
    assert!(!log.contains("pw-2"), "a password never reaches the log");
    assert!(!log.contains("bogus"), "a password never reaches the log");
    eprintln!("total {:?}", t0.elapsed());
}

/// Against the real registry in token mode (a token server in talaria-testenv signs short
/// JWTs): the node's registry client refreshes a token before it expires, and a token the
/// registry stops trusting (signing key rotated) is dropped and replaced once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_tokens_refresh_before_expiry_and_reauthenticate_on_401() {
    use talaria_artifact::oci::registry::RegistryError;
    use talaria_artifact::oci::registry::credentials::{
        Credential, Credentials, LearnedCredentials,
    };
    use talaria_testenv::tokenauth::TokenServer;

    talaria_artifact::oci::registry::install_crypto_provider();
    let mut registry = Registry::start().expect("start registry");
    let host = registry.host();
    let layer = LayerBuilder::new()
        .file("a.bin", images::noise(7, 1 << 20), 0o644)
        .build()
        .expect("layer");
    let image = ImageBuilder::new()
        .layer(layer.clone())
        .build()
        .expect("image");
    image.push(&host, "talaria/token", "v1").expect("push");
    // Tokens live 2 s: the client fetches the next one after 1.5 s.
    let tokens = TokenServer::start(USER, "pw", 2).expect("token server");
    registry.set_token_auth(&tokens).expect("token mode");

    let learned = Arc::new(LearnedCredentials::new(8, Duration::from_secs(600)));
    let client = RegistryClient::new(RegistryConfig {
        credentials: Credentials::new().with_source(learned.clone()),
        insecure_hosts: vec![host.clone()],
        ..RegistryConfig::default()
    })
    .expect("registry client");
    let repo = Repository {
        registry: host.clone(),
        name: "talaria/token".into(),
    };
    let read = || client.get_blob_range(&repo, &layer.digest, 100, 64);
    let e = read().await.expect_err("no credential yet");
    assert!(matches!(e, RegistryError::Auth { .. }), "{e}");
    assert_eq!(tokens.issued(), 0);

    // As from a pull that succeeded.
    let offer = learned
        .offer(
            &host,
            "talaria/token",
            Credential::Basic {
                username: USER.into(),
                password: "pw".into(),
            },
        )
        .expect("offered");
    learned.confirm(offer);
    assert_eq!(
        &read().await.expect("read with a token")[..],
        &layer.blob[100..164]
    );
    read().await.expect("read again");
    assert_eq!(tokens.issued(), 1, "the token is reused");
    tokio::time::sleep(Duration::from_millis(1600)).await;
    read().await.expect("read near expiry");
    assert_eq!(tokens.issued(), 2, "refreshed before it expired");

    // A long-lived token next, so the one below is replaced for the 401, not for its age.
    tokens.set_expires_in(3600);
    tokio::time::sleep(Duration::from_millis(1600)).await;
    read().await.expect("read near expiry");
    assert_eq!(tokens.issued(), 3);

    tokens.rotate_key().expect("rotate the signing key");
    registry
        .set_token_auth(&tokens)
        .expect("registry trusts the new key");
    assert_eq!(
        &read().await.expect("read after rotation")[..],
        &layer.blob[100..164]
    );
    assert_eq!(tokens.issued(), 4, "one new token after the 401");
}

/// A pull that never reaches talaria (containerd unpacks with overlayfs, as for a pod of a
/// runtime class on another snapshotter): the node's warm-up started the image's job, and
/// stops it once no layer was mounted within `--pull-warmup-wait`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_warmup_without_a_mount_is_stopped() {
    talaria_artifact::oci::registry::install_crypto_provider();
    let dir = tempfile::Builder::new()
        .prefix("tlr-cri-warmup-")
        .tempdir()
        .expect("tempdir");
    let registry = Registry::start().expect("start registry");
    let host = registry.host();
    test_image("elsewhere", 3)
        .push(&host, "talaria/elsewhere", "v1")
        .expect("push image");
    build_default_artifact(&host, "talaria/elsewhere").await;
    let proxied = start_proxied(dir.path(), &host, &["--pull-warmup-wait", "1s"], false).await;
    proxied
        .via
        .pull_image(&format!("{host}/talaria/elsewhere:v1"))
        .await
        .expect("PullImage through the proxy");

    let m = wait_metric_line(
        &proxied,
        "talaria_node_pull_warmups_total{outcome=\"abandoned\"} 1",
        20,
    )
    .await;
    assert!(
        m.lines()
            .any(|l| l == "talaria_node_pull_warmups_total{outcome=\"artifact\"} 1"),
        "{m}"
    );
    assert_eq!(
        sum_metric(&m, "talaria_node_mounted_layers_total"),
        0.0,
        "{m}"
    );
    let node = &proxied.node;
    assert!(
        node.log_text()
            .contains("no layer of the image was mounted"),
        "{}",
        node.log_text()
    );
}
