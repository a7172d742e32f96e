//! Private registries (real distribution with htpasswd basic auth) against a real apiserver:
//! - a pod's imagePullSecrets (a dockerconfigjson Secret) let the controller resolve and build
//!   an image of a private registry;
//! - the same image selected for pods without credentials is not built, and the policy says
//!   why (an authentication error naming the registry); one policy's credentials never serve
//!   another (the resolver cache is per credential);
//! - `artifactRepository` on the private registry: without credentials the image is Failed
//!   with an authentication message and stays so (max attempts); once the policy references the
//!   Secret (a new generation) it is retried at once with a fresh backoff and becomes Ready,
//!   its artifacts in the other repository; moving the policy's `artifactRepository` later
//!   updates the image's spec and builds the artifact again in the new place;
//! - the real `talaria inspect` resolves both images' artifacts with the registry credentials.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{image_of, wait_for};
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use talaria_api::{AcceleratedImage, AccelerationPolicy, Phase};
use talaria_controller::metrics::Metrics;
use talaria_controller::{BuildSettings, Settings};
use talaria_testenv::apiserver::KubeApi;
use talaria_testenv::images::{self, ImageBuilder, LayerBuilder};
use talaria_testenv::registry::Registry;
use tokio::sync::watch;

const WAIT: Duration = Duration::from_secs(90);

fn push_image(reg: &Registry, repo: &str, seed: &str) -> String {
    let layer = LayerBuilder::new()
        .file("etc/seed", seed.as_bytes().to_vec(), 0o644)
        .file("bin/app", vec![5u8; 150_000], 0o755)
        .build()
        .expect("layer");
    ImageBuilder::new()
        .layer(layer)
        .entrypoint(&["/bin/app"])
        .build()
        .expect("image")
        .push(&reg.host(), repo, "v1")
        .expect("push")
}

async fn create<K>(api: &Api<K>, value: serde_json::Value)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let obj: K = serde_json::from_value(value).expect("object json");
    api.create(&PostParams::default(), &obj)
        .await
        .unwrap_or_else(|e| panic!("create {:?}: {e}", obj.meta().name));
}

fn condition<'a>(
    p: &'a AccelerationPolicy,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    p.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
}

fn start_controller(client: Client) -> (watch::Sender<bool>, tokio::task::JoinHandle<()>) {
    let settings = Settings {
        build: BuildSettings {
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(2),
            max_attempts: 1,
            ..Default::default()
        },
        resolve_error_ttl: Duration::from_secs(1),
        ..Default::default()
    };
    let (tx, rx) = watch::channel(false);
    let h = tokio::spawn(async move {
        talaria_controller::run(client, settings, Arc::new(Metrics::new()), None, None, rx)
            .await
            .expect("controller run");
    });
    (tx, h)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_registries_pull_secrets_policy_secrets_and_artifact_repository() {
    talaria_controller::install_crypto_provider();
    common::init_logs();
    let open = Registry::start().expect("open registry");
    let mut private = Registry::start().expect("private registry");
    let app = push_image(&private, "private/app", "app");
    let tool = push_image(&open, "open/tool", "tool");
    // Filled anonymously, then private from now on.
    private
        .set_auth(Some(("talaria", "s3cret-pass")))
        .expect("private registry with auth");
    let (ph, oh) = (private.host(), open.host());

    let kube = KubeApi::start().await.expect("control plane");
    let client = kube.client().await.expect("client");
    common::apply_crds(&client).await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    for ns in ["team", "nocreds"] {
        create(
            &namespaces,
            json!({"metadata": {"name": ns, "labels": {"talaria-test": ns}}}),
        )
        .await;
    }
    create(
        &Api::<Secret>::namespaced(client.clone(), "team"),
        json!({
            "metadata": {"name": "regcred"},
            "type": "kubernetes.io/dockerconfigjson",
            "stringData": {".dockerconfigjson": private.docker_config_json()},
        }),
    )
    .await;
    let pod = |name: &str, secrets: &[&str]| {
        json!({
            "metadata": {"name": name},
            "spec": {
                "containers": [{"name": "c", "image": format!("{ph}/private/app:v1")}],
                "imagePullSecrets": secrets.iter().map(|s| json!({"name": s})).collect::<Vec<_>>(),
            },
        })
    };
    create(
        &Api::<Pod>::namespaced(client.clone(), "team"),
        pod("web", &["regcred"]),
    )
    .await;
    create(
        &Api::<Pod>::namespaced(client.clone(), "nocreds"),
        pod("lonely", &[]),
    )
    .await;

    let (stop, handle) = start_controller(client.clone());
    let plat = format!("linux/{}", images::oci_arch());
    let policies: Api<AccelerationPolicy> = Api::all(client.clone());
    let selecting = |ns: &str| {
        json!({
            "images": [],
            "selector": {
                "images": [format!("{ph}/private/**")],
                "namespaceSelector": {"matchLabels": {"talaria-test": ns}},
            },
            "platforms": [plat],
        })
    };
    for (name, spec) in [
        ("pods", selecting("team")),
        ("nocreds", selecting("nocreds")),
        (
            "artifacts",
            json!({
                "images": [format!("{oh}/open/tool:v1")],
                "artifactRepository": format!("{ph}/talaria/artifacts"),
                "platforms": [plat],
            }),
        ),
    ] {
        create(&policies, json!({"metadata": {"name": name}, "spec": spec})).await;
    }

    // The pod's pull secret: resolved, built, Ready, artifacts next to the private image.
    let images: Api<AcceleratedImage> = Api::all(client.clone());
    let a = wait_for("private image Ready", WAIT, || async {
        let i = image_of(&images, &app).await?;
        (i.status.as_ref()?.phase == Phase::Ready).then_some(i)
    })
    .await;
    let art = a.status.clone().and_then(|s| s.artifact).expect("artifact");
    assert_eq!(art.repository, format!("{ph}/private/app"));
    assert_eq!(
        a.annotations()
            .get("talaria.dev/pull-secrets")
            .map(String::as_str),
        Some("team/regcred")
    );

    // The same image for pods without credentials: not resolvable, and the policy says why.
    let nocreds = wait_for("nocreds policy Degraded", WAIT, || async {
        let p = policies.get("nocreds").await.ok()?;
        let c = condition(&p, "Degraded")?;
        (c.status == "True").then_some(p)
    })
    .await;
    let msg = condition(&nocreds, "Degraded")
        .map(|c| c.message.clone())
        .unwrap_or_default();
    assert!(
        msg.contains(&format!("authenticating to {ph}")) && msg.contains("no credentials"),
        "unclear message: {msg}"
    );
    assert_eq!(nocreds.status.as_ref().map(|s| s.images), Some(0));
    let a = image_of(&images, &app).await.expect("image");
    let owners: Vec<_> = a
        .owner_references()
        .iter()
        .map(|o| o.name.clone())
        .collect();
    assert_eq!(
        owners,
        ["pods"],
        "credentials of one policy never serve another"
    );

    // artifactRepository on the private registry, no credentials: Failed, clearly, and it
    // stays Failed (one attempt allowed here) while nothing changes.
    let failed = wait_for("artifact-repository image Failed", WAIT, || async {
        let i = image_of(&images, &tool).await?;
        (i.status.as_ref()?.phase == Phase::Failed).then_some(i)
    })
    .await;
    let fs = failed.status.clone().expect("status");
    let err = fs.last_error.clone().unwrap_or_default();
    assert!(
        err.contains(&format!("authenticating to {ph}")),
        "unclear error: {err}"
    );
    assert_eq!(fs.attempts, 1);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let still = image_of(&images, &tool)
        .await
        .expect("image")
        .status
        .expect("status");
    assert_eq!(
        (still.phase, still.attempts),
        (Phase::Failed, 1),
        "no retry without a change"
    );

    // The policy now references the secret: a new generation; retried at once, backoff reset.
    let patch =
        json!({"spec": {"registryCredentials": [{"namespace": "team", "name": "regcred"}]}});
    policies
        .patch("artifacts", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("patch policy");
    let t = wait_for("artifact-repository image Ready", WAIT, || async {
        let i = image_of(&images, &tool).await?;
        (i.status.as_ref()?.phase == Phase::Ready).then_some(i)
    })
    .await;
    let ts = t.status.clone().expect("status");
    assert_eq!(
        ts.attempts, 1,
        "the backoff restarted from the first attempt"
    );
    assert_ne!(ts.owner_generations, fs.owner_generations);
    let tart = ts.artifact.clone().expect("artifact");
    assert_eq!(tart.repository, format!("{ph}/talaria/artifacts"));

    // The policy moves its artifacts elsewhere: the image's spec follows its policy and the
    // artifact is built again there.
    let moved = format!("{oh}/talaria/moved");
    let patch = json!({"spec": {"artifactRepository": moved}});
    policies
        .patch("artifacts", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("patch policy");
    let m = wait_for(
        "image rebuilt in the new artifact repository",
        WAIT,
        || async {
            let i = image_of(&images, &tool).await?;
            let st = i.status.as_ref()?;
            (i.spec.artifact_repository.as_deref() == Some(moved.as_str())
                && st.phase == Phase::Ready
                && st.artifact.as_ref()?.repository == moved)
                .then_some(i)
        },
    )
    .await;
    let ms = m.status.clone().expect("status");
    assert_eq!(ms.attempts, 1, "a settings change starts a fresh count");
    assert_eq!(ms.observed_generation, m.metadata.generation);

    // The real CLI finds both images' artifacts and plans, with the registry credentials.
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.json");
    std::fs::write(&config, private.docker_config_json()).expect("docker config");
    let config = config.to_string_lossy().into_owned();
    let out = common::talaria_inspect(
        &format!("{ph}/private/app@{app}"),
        &["--docker-config", &config, "--platform", &plat],
    );
    assert_eq!(out["artifacts"].as_array().map(Vec::len), Some(2), "{out}");
    assert_eq!(out["nodeWouldUse"], art.digest.as_str(), "{out}");
    assert!(out["plan"]["files"].as_u64().unwrap_or(0) >= 1, "{out}");
    let out = common::talaria_inspect(
        &format!("{oh}/open/tool@{tool}"),
        &[
            "--docker-config",
            &config,
            "--platform",
            &plat,
            "--artifact-repo",
            &format!("{ph}/talaria/artifacts"),
        ],
    );
    assert_eq!(out["artifacts"].as_array().map(Vec::len), Some(2), "{out}");
    assert_eq!(out["nodeWouldUse"], tart.digest.as_str(), "{out}");
    assert!(
        out["plan"]["paths"].to_string().contains("/bin/app"),
        "{out}"
    );

    let _ = stop.send(true);
    tokio::time::timeout(Duration::from_secs(60), handle)
        .await
        .expect("controller stops")
        .expect("controller task");
}
