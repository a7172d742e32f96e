//! Invalid policies are rejected by the real apiserver with the schema's messages; valid ones
//! get the schema's defaults.

mod common;

use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, PostParams};
use serde_json::json;
use talaria_api::{AccelerationPolicy, Profile};
use talaria_testenv::apiserver::KubeApi;

/// Creates a policy from raw JSON (the Rust types would not let invalid values through).
async fn create(client: &kube::Client, name: &str, spec: serde_json::Value) -> Result<(), String> {
    let gvk = GroupVersionKind::gvk("talaria.dev", "v1alpha1", "AccelerationPolicy");
    let ar = ApiResource::from_gvk_with_plural(&gvk, "accelerationpolicies");
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
    let obj: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "talaria.dev/v1alpha1",
        "kind": "AccelerationPolicy",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .map_err(|e| e.to_string())?;
    match api.create(&PostParams::default(), &obj).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) => Err(format!("{} {}", s.code, s.message)),
        Err(e) => panic!("unexpected error: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_policies_are_rejected_with_the_schemas_message() {
    talaria_controller::install_crypto_provider();
    let kube = KubeApi::start().await.expect("start etcd + kube-apiserver");
    let client = kube.client().await.expect("client");
    common::apply_crds(&client).await;

    let cases = [
        (
            "empty",
            json!({}),
            "select images with selector.images or list them in images",
        ),
        (
            "bad-platform",
            json!({"images": ["reg.io/a:1"], "platforms": ["amd64"]}),
            "platforms look like linux/amd64",
        ),
        (
            "bad-span",
            json!({"images": ["reg.io/a:1"], "knobs": {"spanSize": 1}}),
            "spec.knobs.spanSize",
        ),
        (
            "bad-profile",
            json!({"images": ["reg.io/a:1"], "profile": "turbo"}),
            "Unsupported value: \"turbo\"",
        ),
        (
            "empty-pattern",
            json!({"selector": {"images": [""]}}),
            "image patterns must be non-empty",
        ),
        (
            "short-window",
            json!({"images": ["reg.io/a:1"], "recording": {"windowSeconds": 1}}),
            "spec.recording.windowSeconds",
        ),
        (
            "many-starts",
            json!({"images": ["reg.io/a:1"], "recording": {"starts": 50}}),
            "spec.recording.starts",
        ),
    ];
    for (name, spec, want) in cases {
        let err = create(&client, name, spec)
            .await
            .expect_err(&format!("policy {name} must be rejected"));
        assert!(err.starts_with("422"), "{name}: {err}");
        assert!(err.contains(want), "{name}: {err:?} lacks {want:?}");
    }

    // A valid policy is accepted and defaulted by the schema.
    create(
        &client,
        "ok",
        json!({"selector": {"images": ["reg.io/**"]}}),
    )
    .await
    .expect("valid policy");
    let p = Api::<AccelerationPolicy>::all(client.clone())
        .get("ok")
        .await
        .expect("get policy");
    assert_eq!(p.spec.profile, Profile::StartupLocalV1);
    assert!(!p.spec.paused);
}

/// A StartupRecord is a node's hint: the schema bounds it and keeps it immutable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_records_are_bounded_and_immutable() {
    talaria_controller::install_crypto_provider();
    let kube = KubeApi::start().await.expect("start etcd + kube-apiserver");
    let client = kube.client().await.expect("client");
    common::apply_crds(&client).await;
    let gvk = GroupVersionKind::gvk("talaria.dev", "v1alpha1", "StartupRecord");
    let api: Api<DynamicObject> = Api::all_with(
        client.clone(),
        &ApiResource::from_gvk_with_plural(&gvk, "startuprecords"),
    );
    let record = |name: &str, spec: serde_json::Value| -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "talaria.dev/v1alpha1",
            "kind": "StartupRecord",
            "metadata": {"name": name},
            "spec": spec,
        }))
        .expect("record")
    };
    let ok = json!({
        "acceleratedImage": "ai-1",
        "digest": format!("sha256:{}", "a".repeat(64)),
        "node": "n1",
        "recordedAt": "2026-12-07T00:00:00Z",
        "trace": "AAAA",
    });
    let mut too_big = ok.clone();
    too_big["trace"] = json!("A".repeat(1_398_105));
    let mut bad_digest = ok.clone();
    bad_digest["digest"] = json!("latest");
    for (name, spec, want) in [
        ("too-big", too_big, "spec.trace"),
        ("bad-digest", bad_digest, "spec.digest"),
    ] {
        let err = api
            .create(&PostParams::default(), &record(name, spec))
            .await
            .expect_err(name);
        let kube::Error::Api(s) = err else {
            panic!("{name}: {err}")
        };
        assert_eq!(s.code, 422, "{name}: {}", s.message);
        assert!(s.message.contains(want), "{name}: {}", s.message);
    }
    let created = api
        .create(&PostParams::default(), &record("ok", ok))
        .await
        .expect("a valid record");
    let mut changed = created.clone();
    changed.data["spec"]["node"] = json!("n2");
    let err = api
        .replace("ok", &PostParams::default(), &changed)
        .await
        .expect_err("records are immutable");
    let kube::Error::Api(s) = err else {
        panic!("{err}")
    };
    assert!(
        s.message.contains("a StartupRecord is immutable"),
        "{}",
        s.message
    );
}
