//! CRI against the real containerd (its built-in CRI plugin), runc and registry: pull busybox
//! over plain HTTP, run containers in a host-network pod, exec into one and read its root file
//! system from the host through /proc/PID/root.

use std::time::{Duration, Instant};

use talaria_testenv::cri::{CriContainerd, CriError, CriOptions, proto};
use talaria_testenv::images::{self, BUSYBOX};
use talaria_testenv::registry::Registry;

const T: Duration = Duration::from_secs(60);
const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n";

#[tokio::test]
async fn pull_and_run_busybox_through_cri_on_overlayfs() {
    let started = Instant::now();
    let registry = Registry::start().expect("start registry");
    let pushed = images::busybox_image()
        .expect("busybox image")
        .push(&registry.host(), "library/busybox", "latest")
        .expect("push busybox");
    let env = CriContainerd::start(CriOptions::default()).expect("start containerd with CRI");
    env.allow_plain_http(&registry.host())
        .expect("plain-HTTP registry");
    let cri = env.client().await.expect("CRI client");
    eprintln!("components up in {:?}", started.elapsed());

    let v = cri.version().await.expect("Version");
    assert_eq!(v.runtime_name, "containerd");
    assert_eq!(v.runtime_api_version, "v1");

    let image = format!("{}/library/busybox:latest", registry.host());
    let image_id = cri.pull_image(&image).await.expect("PullImage");
    assert!(image_id.starts_with("sha256:"), "{image_id}");
    let status = cri
        .image_status(&image)
        .await
        .expect("ImageStatus")
        .expect("pulled image is known");
    assert_eq!(status.id, image_id);
    assert!(status.repo_tags.contains(&image), "{:?}", status.repo_tags);
    let by_digest = format!("{}/library/busybox@{pushed}", registry.host());
    assert!(
        status.repo_digests.contains(&by_digest),
        "{:?} lacks {by_digest}",
        status.repo_digests
    );
    let listed = cri.list_images().await.expect("ListImages");
    assert!(listed.iter().any(|i| i.id == image_id), "{listed:?}");
    assert!(
        listed
            .iter()
            .any(|i| i.repo_tags.iter().any(|t| t == env.sandbox_image())),
        "the sandbox image is visible to CRI: {listed:?}"
    );

    let pod = cri.run_pod("cri-test").await.expect("RunPodSandbox");

    let run = cri
        .run_to_exit(&pod, "echo", &image, &["echo", "hello from cri"], T)
        .await
        .expect("run echo");
    assert_eq!(run.exit_code, 0);
    assert_eq!(run.stdout, "hello from cri\n");
    assert_eq!(run.stderr, "");

    let run = cri
        .run_to_exit(
            &pod,
            "fails",
            &image,
            &["sh", "-c", "echo to-stderr >&2; exit 3"],
            T,
        )
        .await
        .expect("run a failing command");
    assert_eq!(run.exit_code, 3);
    assert_eq!(run.stderr, "to-stderr\n");
    assert_eq!(run.stdout, "");

    let sleeper = cri
        .start_container(&pod, "sleeper", &image, &["sleep", "3600"])
        .await
        .expect("start a long-lived container");
    let root = sleeper.root();
    assert_eq!(
        std::fs::read_to_string(root.join("etc/passwd")).expect("read passwd via /proc/PID/root"),
        PASSWD
    );
    let host_busybox = std::fs::read(BUSYBOX).expect("read host busybox");
    assert!(
        std::fs::read(root.join("bin/busybox")).expect("read busybox via /proc/PID/root")
            == host_busybox,
        "the container's /bin/busybox differs from the pushed one"
    );
    // Every other entry of /bin is an applet symlink to busybox, as the layer was built.
    let mut applets = 0;
    for entry in std::fs::read_dir(root.join("bin")).expect("list /bin") {
        let entry = entry.expect("dir entry");
        if entry.file_name() == "busybox" {
            continue;
        }
        let target = std::fs::read_link(entry.path()).expect("applet is a symlink");
        assert_eq!(target.to_str(), Some("busybox"), "{:?}", entry.path());
        applets += 1;
    }
    assert!(applets > 100, "only {applets} applets in /bin");

    let exec = cri
        .exec_sync(&sleeper.id, &["cat", "/etc/passwd"], T)
        .await
        .expect("ExecSync cat");
    assert_eq!(exec.exit_code, 0);
    assert_eq!(String::from_utf8_lossy(&exec.stdout), PASSWD);
    let exec = cri
        .exec_sync(&sleeper.id, &["sh", "-c", "echo $$; exit 7"], T)
        .await
        .expect("ExecSync exit 7");
    assert_eq!(exec.exit_code, 7);
    // The exec runs in the container's own PID namespace, where `sleep` is PID 1.
    let exec_pid: u32 = String::from_utf8_lossy(&exec.stdout)
        .trim()
        .parse()
        .expect("pid printed by the exec");
    assert!(exec_pid > 1, "{exec_pid}");

    cri.stop_container(&sleeper.id, Duration::from_secs(1))
        .await
        .expect("StopContainer");
    let (status, _) = cri
        .container_status(&sleeper.id, false)
        .await
        .expect("ContainerStatus");
    assert_eq!(status.state, proto::ContainerState::ContainerExited as i32);
    cri.remove_container(&sleeper.id)
        .await
        .expect("RemoveContainer");
    cri.remove_pod(&pod).await.expect("remove pod");

    cri.remove_image(&image).await.expect("RemoveImage");
    assert!(
        cri.image_status(&image)
            .await
            .expect("ImageStatus after removal")
            .is_none()
    );
    eprintln!("total {:?}", started.elapsed());
}

#[tokio::test]
async fn dropping_the_environment_kills_its_pods_and_containers() {
    let env = CriContainerd::start(CriOptions::default()).expect("start containerd with CRI");
    let cri = env.client().await.expect("CRI client");
    let pod = cri.run_pod("left-running").await.expect("RunPodSandbox");
    // The sandbox image is local (no registry needed) and has `sleep`.
    let image = env.sandbox_image().to_string();
    let running = cri
        .start_container(&pod, "sleeper", &image, &["/bin/sleep", "3600"])
        .await
        .expect("start a container from the sandbox image");
    let proc_dir = std::path::PathBuf::from(format!("/proc/{}", running.pid));
    assert!(proc_dir.exists(), "container init {proc_dir:?} runs");
    let dir = env.containerd().dir().to_path_buf();
    drop(env);
    // The init may linger briefly as a zombie of its reaped shim; it must be gone soon.
    let deadline = Instant::now() + Duration::from_secs(10);
    while proc_dir.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!proc_dir.exists(), "{proc_dir:?} outlived the environment");
    assert!(!dir.exists(), "{dir:?} was not removed");
}

#[tokio::test]
async fn pulls_over_plain_http_from_a_non_loopback_registry() {
    // containerd treats loopback registries specially; the shaped registry's address
    // (10.213.N.2) is not loopback, so only the hosts.toml written by allow_plain_http makes
    // this pull speak HTTP.
    let registry = Registry::start_shaped(1000, 1).expect("start shaped registry");
    images::busybox_image()
        .expect("busybox image")
        .push(&registry.host(), "library/busybox", "latest")
        .expect("push busybox");
    let env = CriContainerd::start(CriOptions::default()).expect("start containerd with CRI");
    env.allow_plain_http(&registry.host())
        .expect("plain-HTTP registry");
    let cri = env.client().await.expect("CRI client");
    let image = format!("{}/library/busybox:latest", registry.host());
    cri.pull_image(&image).await.expect("PullImage over HTTP");
    let pod = cri.run_pod("shaped").await.expect("RunPodSandbox");
    let run = cri
        .run_to_exit(&pod, "cat", &image, &["cat", "/etc/passwd"], T)
        .await
        .expect("run cat");
    assert_eq!((run.exit_code, run.stdout.as_str()), (0, PASSWD));
}

#[tokio::test]
async fn pull_image_passes_registry_credentials() {
    let mut registry = Registry::start().expect("start registry");
    images::busybox_image()
        .expect("busybox image")
        .push(&registry.host(), "library/busybox", "latest")
        .expect("push busybox");
    registry
        .set_auth(Some(("puller", "s3cret-pass")))
        .expect("make the registry private");
    let env = CriContainerd::start(CriOptions::default()).expect("start containerd with CRI");
    env.allow_plain_http(&registry.host())
        .expect("plain-HTTP registry");
    let cri = env.client().await.expect("CRI client");
    let image = format!("{}/library/busybox:latest", registry.host());

    let anonymous = cri.pull_image(&image).await;
    assert!(
        matches!(anonymous, Err(CriError::Rpc { .. })),
        "an anonymous pull from a private registry must fail: {anonymous:?}"
    );
    let wrong = cri
        .pull_image_with(pull_request(&image, "puller", "wrong"))
        .await;
    assert!(
        matches!(wrong, Err(CriError::Rpc { .. })),
        "a wrong password must fail: {wrong:?}"
    );
    let id = cri
        .pull_image_with(pull_request(&image, "puller", "s3cret-pass"))
        .await
        .expect("PullImage with credentials");
    assert!(id.starts_with("sha256:"), "{id}");
    assert!(
        cri.image_status(&image)
            .await
            .expect("ImageStatus")
            .is_some()
    );
}

fn pull_request(image: &str, username: &str, password: &str) -> proto::PullImageRequest {
    proto::PullImageRequest {
        image: Some(proto::ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        auth: Some(proto::AuthConfig {
            username: username.into(),
            password: password.into(),
            ..Default::default()
        }),
        sandbox_config: None,
    }
}
