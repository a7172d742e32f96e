//! Smoke tests: each component is the real thing (a fake would fail these).

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, PostParams};
use serde_json::json;
use talaria_testenv::apiserver::{KubeApi, KubeOptions};
use talaria_testenv::containerd::Containerd;
use talaria_testenv::http::{self, location_target};
use talaria_testenv::images::{self, ImageBuilder, LayerBuilder, sha256_digest};
use talaria_testenv::registry::Registry;

const T: Duration = Duration::from_secs(30);

fn is_forbidden<T: std::fmt::Debug>(r: &Result<T, kube::Error>) -> bool {
    matches!(r, Err(kube::Error::Api(s)) if s.code == 403)
}

// Default (current-thread) runtime on purpose: that is what most tests use.
#[tokio::test]
async fn apiserver_serves_crds_rbac_and_reports_its_version() {
    let kube = KubeApi::start().await.expect("start etcd + kube-apiserver");
    let client = kube.client().await.expect("admin client");

    let version = client.apiserver_version().await.expect("GET /version");
    assert_eq!(version.git_version, "v1.35.4");

    let crd: CustomResourceDefinition = serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": { "name": "widgets.smoke.talaria.dev" },
        "spec": {
            "group": "smoke.talaria.dev",
            "scope": "Namespaced",
            "names": { "plural": "widgets", "singular": "widget", "kind": "Widget" },
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "schema": { "openAPIV3Schema": { "type": "object", "properties": {
                    "spec": { "type": "object", "properties": {
                        "size": { "type": "integer", "minimum": 1 }
                    }}
                }}}
            }]
        }
    }))
    .expect("CRD json");
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.create(&PostParams::default(), &crd)
        .await
        .expect("create CRD");
    let deadline = Instant::now() + T;
    loop {
        let c = crds
            .get("widgets.smoke.talaria.dev")
            .await
            .expect("get CRD");
        let established = c
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        if established {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "CRD not Established within {T:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let gvk = GroupVersionKind::gvk("smoke.talaria.dev", "v1", "Widget");
    let ar = ApiResource::from_gvk_with_plural(&gvk, "widgets");
    let widgets: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &ar);
    let obj: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "smoke.talaria.dev/v1", "kind": "Widget",
        "metadata": { "name": "w1" }, "spec": { "size": 3 }
    }))
    .expect("widget json");
    // Discovery of a new CRD can lag behind Established by a moment.
    let deadline = Instant::now() + T;
    loop {
        match widgets.create(&PostParams::default(), &obj).await {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                eprintln!("create widget: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("create widget: {e}"),
        }
    }
    let back = widgets.get("w1").await.expect("get widget");
    assert_eq!(back.data["spec"]["size"], json!(3));
    assert!(back.metadata.uid.is_some(), "the apiserver assigns a uid");
    // The schema is enforced: a real apiserver rejects size 0.
    let mut bad = obj.clone();
    bad.metadata.name = Some("w2".into());
    bad.data["spec"]["size"] = json!(0);
    let rejected = widgets.create(&PostParams::default(), &bad).await;
    assert!(
        matches!(&rejected, Err(kube::Error::Api(s)) if s.code == 422),
        "{rejected:?}"
    );

    // RBAC: an unbound user is forbidden; a bound ServiceAccount gets exactly its Role.
    let alice = kube
        .client_for_user("alice", &["dev"])
        .await
        .expect("alice client");
    let alice_cms: Api<ConfigMap> = Api::namespaced(alice, "default");
    assert!(is_forbidden(&alice_cms.list(&Default::default()).await));

    let role: Role = serde_json::from_value(json!({
        "metadata": { "name": "cm-reader", "namespace": "default" },
        "rules": [{ "apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"] }]
    }))
    .expect("role json");
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": { "name": "cm-reader", "namespace": "default" },
        "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "cm-reader" },
        "subjects": [{ "kind": "ServiceAccount", "name": "reader", "namespace": "default" }]
    }))
    .expect("binding json");
    Api::<Role>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &role)
        .await
        .expect("create role");
    Api::<RoleBinding>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &binding)
        .await
        .expect("create binding");
    let reader = kube
        .client_for_service_account("default", "reader")
        .await
        .expect("sa client");
    let reader_cms: Api<ConfigMap> = Api::namespaced(reader.clone(), "default");
    // RBAC caches update asynchronously.
    let deadline = Instant::now() + T;
    while reader_cms.list(&Default::default()).await.is_err() {
        assert!(Instant::now() < deadline, "binding never took effect");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "x"}})).expect("cm");
    assert!(is_forbidden(
        &reader_cms.create(&PostParams::default(), &cm).await
    ));
    let reader_secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(reader, "default");
    assert!(is_forbidden(
        &reader_secrets.list(&Default::default()).await
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_manager_garbage_collects_owned_objects() {
    let kube = KubeApi::start_with(KubeOptions::with_controller_manager())
        .await
        .expect("start control plane with kube-controller-manager");
    let client = kube.client().await.expect("client");
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    let parent: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "parent"}})).expect("cm");
    let parent = cms
        .create(&PostParams::default(), &parent)
        .await
        .expect("create parent");
    let uid = parent.metadata.uid.clone().expect("uid");
    let child: ConfigMap = serde_json::from_value(json!({"metadata": {
        "name": "child",
        "ownerReferences": [{ "apiVersion": "v1", "kind": "ConfigMap", "name": "parent", "uid": uid }]
    }}))
    .expect("cm");
    cms.create(&PostParams::default(), &child)
        .await
        .expect("create child");
    cms.delete("parent", &DeleteParams::background())
        .await
        .expect("delete parent");
    let deadline = Instant::now() + Duration::from_secs(120);
    while cms.get_opt("child").await.expect("get child").is_some() {
        assert!(
            Instant::now() < deadline,
            "garbage collector did not delete the owned ConfigMap"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Uploads `data` in `chunk`-sized PATCHes and returns the digest the registry reports.
fn chunked_upload(host: &str, repo: &str, data: &[u8], chunk: usize) -> String {
    let digest = sha256_digest(data);
    let r = http::request(
        host,
        "POST",
        &format!("/v2/{repo}/blobs/uploads/"),
        &[],
        &[],
        T,
    )
    .expect("start upload");
    assert_eq!(r.status, 202, "{}", r.text());
    let mut loc = location_target(r.header("location").expect("location"));
    let mut offset = 0usize;
    for part in data.chunks(chunk) {
        let range = format!("{}-{}", offset, offset + part.len() - 1);
        let r = http::request(
            host,
            "PATCH",
            &loc,
            &[
                ("Content-Type", "application/octet-stream"),
                ("Content-Range", &range),
            ],
            part,
            T,
        )
        .expect("patch");
        assert_eq!(r.status, 202, "PATCH {range}: {}", r.text());
        assert_eq!(
            r.header("range"),
            Some(format!("0-{}", offset + part.len() - 1).as_str())
        );
        loc = location_target(r.header("location").expect("location"));
        offset += part.len();
    }
    let sep = if loc.contains('?') { '&' } else { '?' };
    let r = http::request(
        host,
        "PUT",
        &format!("{loc}{sep}digest={digest}"),
        &[],
        &[],
        T,
    )
    .expect("finish upload");
    assert_eq!(r.status, 201, "{}", r.text());
    r.header("docker-content-digest")
        .expect("digest header")
        .to_string()
}

#[test]
fn registry_stores_blobs_and_manifests() {
    let mut reg = Registry::start().expect("start registry");
    let host = reg.host();
    let repo = "smoke/blobs";

    // Monolithic upload of a 1 MiB blob with non-trivial content.
    let big: Vec<u8> = (0..1024 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
    let d1 = images::push_blob(&host, repo, &big).expect("monolithic upload");
    assert_eq!(d1, sha256_digest(&big));
    let r = http::request(&host, "GET", &format!("/v2/{repo}/blobs/{d1}"), &[], &[], T)
        .expect("get blob");
    assert_eq!(r.status, 200);
    assert_eq!(r.body, big);
    assert_eq!(r.header("docker-content-digest"), Some(d1.as_str()));

    // Chunked upload; a range read of the result.
    let small: Vec<u8> = (0..300_000u32).map(|i| (i % 13) as u8).collect();
    let d2 = chunked_upload(&host, repo, &small, 64 * 1024);
    assert_eq!(d2, sha256_digest(&small));
    let r = http::request(
        &host,
        "GET",
        &format!("/v2/{repo}/blobs/{d2}"),
        &[("Range", "bytes=1000-1999")],
        &[],
        T,
    )
    .expect("range get");
    assert_eq!(r.status, 206);
    assert_eq!(r.body.as_slice(), &small[1000..2000]);

    // Unknown digest: 404 with the registry's error JSON.
    let unknown = sha256_digest(b"never uploaded");
    let r = http::request(
        &host,
        "GET",
        &format!("/v2/{repo}/blobs/{unknown}"),
        &[],
        &[],
        T,
    )
    .expect("get unknown");
    assert_eq!(r.status, 404);
    let err: serde_json::Value = serde_json::from_slice(&r.body).expect("error json");
    assert_eq!(err["errors"][0]["code"], "BLOB_UNKNOWN", "{err}");

    // A manifest referencing an unknown blob is rejected; a complete image is accepted.
    let image = ImageBuilder::new()
        .layer(
            LayerBuilder::new()
                .file("hello.txt", "hi\n", 0o644)
                .build()
                .expect("layer"),
        )
        .build()
        .expect("image");
    let r = http::request(
        &host,
        "PUT",
        "/v2/smoke/image/manifests/v1",
        &[("Content-Type", images::MEDIA_TYPE_MANIFEST)],
        &image.manifest,
        T,
    )
    .expect("put manifest early");
    assert_eq!(r.status, 400, "manifest with missing blobs: {}", r.text());
    let digest = image.push(&host, "smoke/image", "v1").expect("push image");
    for reference in ["v1", digest.as_str()] {
        let r = http::request(
            &host,
            "GET",
            &format!("/v2/smoke/image/manifests/{reference}"),
            &[("Accept", images::MEDIA_TYPE_MANIFEST)],
            &[],
            T,
        )
        .expect("get manifest");
        assert_eq!(r.status, 200);
        assert_eq!(r.body, image.manifest);
        assert_eq!(r.header("docker-content-digest"), Some(digest.as_str()));
    }

    // Fault injection: stopped means refused; restarted keeps the data on the same address.
    reg.stop();
    assert!(http::request(&host, "GET", "/v2/", &[], &[], T).is_err());
    reg.start_again().expect("restart");
    assert_eq!(reg.host(), host);
    let r = http::request(&host, "GET", &format!("/v2/{repo}/blobs/{d2}"), &[], &[], T)
        .expect("get after restart");
    assert_eq!(r.body, small);

    // Deletes are enabled.
    let r = http::request(
        &host,
        "DELETE",
        &format!("/v2/{repo}/blobs/{d2}"),
        &[],
        &[],
        T,
    )
    .expect("delete");
    assert_eq!(r.status, 202, "{}", r.text());
}

#[test]
fn containerd_runs_busybox_with_runc() {
    let dir = tempfile::tempdir().expect("tempdir");
    let layout = dir.path().join("busybox");
    images::busybox_layout(&layout).expect("busybox layout");
    // The layout is well-formed: index -> manifest -> blobs with matching digests.
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).expect("index"))
            .expect("index json");
    let m = &index["manifests"][0];
    assert_eq!(
        m["annotations"]["org.opencontainers.image.ref.name"],
        "latest"
    );
    let mdigest = m["digest"].as_str().expect("digest");
    let manifest = std::fs::read(
        layout
            .join("blobs/sha256")
            .join(mdigest.trim_start_matches("sha256:")),
    )
    .expect("manifest blob");
    assert_eq!(sha256_digest(&manifest), mdigest);

    // A second image on top of busybox: one more layer with a file and a whiteout.
    let two = ImageBuilder::new()
        .layer(images::busybox_layer().expect("busybox layer"))
        .layer(
            LayerBuilder::new()
                .file("msg.txt", "from layer two\n", 0o644)
                .whiteout("etc/group")
                .build()
                .expect("layer two"),
        )
        .build()
        .expect("image two");
    let layout_two = dir.path().join("two");
    two.write_layout(&layout_two, "latest").expect("layout two");

    let ctd = Containerd::start().expect("start containerd");
    let name = ctd
        .import_layout(&layout, "docker.io/talaria/busybox")
        .expect("import busybox");
    assert_eq!(name, "docker.io/talaria/busybox:latest");
    let out = ctd
        .ctr_stdout(&[
            "run",
            "--rm",
            &name,
            "smoke-1",
            "/bin/sh",
            "-c",
            "echo hello-$((6*7)); id -u",
        ])
        .expect("ctr run");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["hello-42", "0"],
        "{out:?}"
    );

    let name_two = ctd
        .import_layout(&layout_two, "docker.io/talaria/two")
        .expect("import two");
    let out = ctd
        .ctr_stdout(&[
            "run",
            "--rm",
            &name_two,
            "smoke-2",
            "/bin/sh",
            "-c",
            "cat /msg.txt; test -e /etc/group || echo group-gone; test -e /etc/passwd && echo passwd-kept",
        ])
        .expect("ctr run two");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["from layer two", "group-gone", "passwd-kept"],
        "{out:?}"
    );
}

#[test]
fn shaped_registry_is_slow_but_works() {
    const DELAY_MS: u64 = 40;
    let mut reg = Registry::start_shaped(16, DELAY_MS as u32).expect("start shaped registry");
    let host = reg.host();
    assert!(host.starts_with("10.213."), "{host}");

    // A request on a fresh connection costs the handshake plus the request round trip.
    let t0 = Instant::now();
    let r = http::request(&host, "GET", "/v2/", &[], &[], T).expect("GET /v2/");
    let elapsed = t0.elapsed();
    assert_eq!(r.status, 200);
    assert!(
        elapsed >= Duration::from_millis(2 * DELAY_MS),
        "GET /v2/ took {elapsed:?}, expected >= 2 x {DELAY_MS} ms"
    );

    // Rate: 2 MiB at 16 Mbit/s needs about a second (lower bound only, with bucket slack).
    let blob: Vec<u8> = (0..2 * 1024 * 1024u32).map(|i| (i % 241) as u8).collect();
    let digest = images::push_blob(&host, "smoke/slow", &blob).expect("push over shaped link");
    let sent_before = reg
        .bytes_sent()
        .expect("a shaped registry counts what it sends");
    let t0 = Instant::now();
    let r = http::request(
        &host,
        "GET",
        &format!("/v2/smoke/slow/blobs/{digest}"),
        &[],
        &[],
        T,
    )
    .expect("GET blob");
    let elapsed = t0.elapsed();
    assert_eq!(r.body, blob);
    assert!(
        elapsed >= Duration::from_millis(800),
        "2 MiB at 16 Mbit/s took only {elapsed:?}"
    );
    // The relay counted the blob (plus the response's head) towards the client, not the
    // request (the bench's "over the link" column).
    let sent = reg.bytes_sent().unwrap_or(0) - sent_before;
    assert!(
        (blob.len() as u64..blob.len() as u64 + 4096).contains(&sent),
        "sent {sent} bytes for a {} byte blob",
        blob.len()
    );
    assert_eq!(Registry::start().expect("start").bytes_sent(), None);

    reg.stop();
    reg.start_again().expect("restart shaped");
    let r = http::request(
        &host,
        "HEAD",
        &format!("/v2/smoke/slow/blobs/{digest}"),
        &[],
        &[],
        T,
    )
    .expect("HEAD after restart");
    assert_eq!(r.status, 200);
}

#[test]
fn containerd_pulls_from_a_shaped_registry() {
    let reg = Registry::start_shaped(200, 10).expect("start shaped registry");
    let image = images::busybox_image().expect("busybox image");
    let digest = image
        .push(&reg.host(), "talaria/busybox", "latest")
        .expect("push busybox");
    let ctd = Containerd::start().expect("start containerd");
    let reference = format!("{}/talaria/busybox:latest", reg.host());
    ctd.pull_plain_http(&reference).expect("ctr pull");
    let listed = ctd.ctr_stdout(&["images", "ls"]).expect("images ls");
    assert!(listed.contains(&digest), "{listed}");
    let out = ctd
        .ctr_stdout(&[
            "run",
            "--rm",
            &reference,
            "pulled-1",
            "/bin/echo",
            "pulled",
            "ok",
        ])
        .expect("ctr run");
    assert_eq!(out.trim(), "pulled ok");
}

#[test]
fn containerd_loads_extra_config() {
    let ctd = Containerd::start_with_config(
        "[proxy_plugins.talaria-probe]\n  type = \"snapshot\"\n  address = \"/nonexistent/talaria-probe.sock\"\n",
    )
    .expect("start containerd with a proxy snapshotter");
    let plugins = ctd.ctr_stdout(&["plugins", "ls"]).expect("plugins ls");
    let line = plugins
        .lines()
        .find(|l| l.contains("talaria-probe"))
        .unwrap_or_else(|| panic!("proxy plugin not registered:\n{plugins}"));
    assert!(line.contains("io.containerd.snapshotter.v1"), "{line}");
}
