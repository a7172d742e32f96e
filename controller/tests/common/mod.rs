//! Shared helpers of the controller's integration tests (real kube-apiserver + etcd, real
//! registry, from talaria-testenv).
#![allow(dead_code)]

use std::future::Future;
use std::time::{Duration, Instant};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, PostParams};

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
