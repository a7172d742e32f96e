//! The Snapshots gRPC service over its unix socket, seen by a real gRPC client: the status
//! codes containerd maps to its errdefs, streamed List batches, and shutdown.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::connect;
use talaria_node::proto::containerd::services::snapshots::v1 as pb;
use talaria_node::snapshot::Snapshotter;
use talaria_node::snapshot::service::serve_unix;
use tonic::Code;

fn prepare(key: &str, parent: &str) -> pb::PrepareSnapshotRequest {
    pb::PrepareSnapshotRequest {
        snapshotter: "talaria".into(),
        key: key.into(),
        parent: parent.into(),
        labels: HashMap::new(),
    }
}

fn commit(name: &str, key: &str) -> pb::CommitSnapshotRequest {
    pb::CommitSnapshotRequest {
        snapshotter: "talaria".into(),
        name: name.into(),
        key: key.into(),
        labels: HashMap::from([("l".to_string(), "v".to_string())]),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_speaks_containerds_api() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("s.sock");
    let sn = Arc::new(Snapshotter::open(&dir.path().join("root")).expect("open"));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = {
        let socket = socket.clone();
        tokio::spawn(async move {
            serve_unix(sn, &socket, async {
                let _ = stop_rx.await;
            })
            .await
        })
    };
    let mut c = connect(socket.clone()).await;

    let r = c
        .prepare(prepare("a", ""))
        .await
        .expect("prepare")
        .into_inner();
    assert_eq!(r.mounts.len(), 1);
    assert_eq!(r.mounts[0].r#type, "bind");
    assert_eq!(r.mounts[0].options, ["rw", "rbind"]);
    let e = c.prepare(prepare("a", "")).await.expect_err("duplicate");
    assert_eq!(e.code(), Code::AlreadyExists, "{e}");
    let e = c
        .prepare(prepare("b", "nope"))
        .await
        .expect_err("no parent");
    assert_eq!(e.code(), Code::NotFound, "{e}");

    c.commit(commit("A", "a")).await.expect("commit");
    let e = c.commit(commit("A", "a")).await.expect_err("gone");
    assert_eq!(e.code(), Code::NotFound, "{e}");
    let info = c
        .stat(pb::StatSnapshotRequest {
            snapshotter: "talaria".into(),
            key: "A".into(),
        })
        .await
        .expect("stat")
        .into_inner()
        .info
        .expect("info");
    assert_eq!(info.kind, pb::Kind::Committed as i32);
    assert_eq!(info.labels.get("l").map(String::as_str), Some("v"));
    assert!(info.created_at.is_some_and(|t| t.seconds > 1_600_000_000));

    let r = c
        .prepare(prepare("b", "A"))
        .await
        .expect("prepare b")
        .into_inner();
    assert_eq!(r.mounts[0].r#type, "overlay");
    assert!(
        r.mounts[0]
            .options
            .iter()
            .any(|o| o.starts_with("upperdir="))
    );
    let e = c
        .remove(pb::RemoveSnapshotRequest {
            snapshotter: "talaria".into(),
            key: "A".into(),
        })
        .await
        .expect_err("has a child");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");

    let info = c
        .update(pb::UpdateSnapshotRequest {
            snapshotter: "talaria".into(),
            info: Some(pb::Info {
                name: "A".into(),
                labels: HashMap::from([("new".to_string(), "1".to_string())]),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["labels.new".into()],
            }),
        })
        .await
        .expect("update")
        .into_inner()
        .info
        .expect("info");
    assert_eq!(info.labels.len(), 2, "{:?}", info.labels);

    // More snapshots than one List batch holds: all arrive, over several messages.
    for i in 0..150 {
        c.prepare(prepare(&format!("many-{i:03}"), "A"))
            .await
            .expect("prepare many");
    }
    let mut stream = c
        .list(pb::ListSnapshotsRequest {
            snapshotter: "talaria".into(),
            filters: vec![],
        })
        .await
        .expect("list")
        .into_inner();
    let mut messages = 0;
    let mut names = Vec::new();
    while let Some(msg) = stream.message().await.expect("list message") {
        messages += 1;
        names.extend(msg.info.into_iter().map(|i| i.name));
    }
    assert_eq!(names.len(), 152);
    assert!(messages >= 2, "{messages} messages");

    let u = c
        .usage(pb::UsageRequest {
            snapshotter: "talaria".into(),
            key: "b".into(),
        })
        .await
        .expect("usage")
        .into_inner();
    assert_eq!(u.inodes, 1, "an empty upper dir");
    c.cleanup(pb::CleanupRequest {
        snapshotter: "talaria".into(),
    })
    .await
    .expect("cleanup");

    stop_tx.send(()).expect("stop");
    drop(c);
    tokio::time::timeout(Duration::from_secs(30), server)
        .await
        .expect("server stops")
        .expect("server task")
        .expect("server result");
    assert!(!socket.exists(), "socket removed after shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_unpacks_all_land() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("s.sock");
    let root = dir.path().join("root");
    // A stale socket file from a previous run is replaced.
    std::fs::write(&socket, b"stale").expect("stale socket file");
    let sn = Arc::new(Snapshotter::open(&root).expect("open"));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = {
        let socket = socket.clone();
        tokio::spawn(async move {
            serve_unix(sn, &socket, async {
                let _ = stop_rx.await;
            })
            .await
        })
    };
    let mut base = connect(socket.clone()).await;
    base.prepare(prepare("base-x", ""))
        .await
        .expect("prepare base");
    base.commit(commit("base", "base-x"))
        .await
        .expect("commit base");

    // Several clients unpack layers on the same parent at once, as parallel pulls do.
    let mut tasks = Vec::new();
    for t in 0..4 {
        let mut c = base.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..20 {
                let key = format!("extract-{t}-{i}");
                c.prepare(prepare(&key, "base")).await.expect("prepare");
                c.commit(commit(&format!("layer-{t}-{i}"), &key))
                    .await
                    .expect("commit");
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let mut stream = base
        .list(pb::ListSnapshotsRequest {
            snapshotter: "talaria".into(),
            filters: vec![],
        })
        .await
        .expect("list")
        .into_inner();
    let mut infos = Vec::new();
    while let Some(msg) = stream.message().await.expect("list message") {
        infos.extend(msg.info);
    }
    assert_eq!(infos.len(), 81);
    assert!(infos.iter().all(|i| i.kind == pb::Kind::Committed as i32));
    let dirs = std::fs::read_dir(root.join("snapshots"))
        .expect("read_dir")
        .count();
    assert_eq!(dirs, 81, "one directory per snapshot");
    stop_tx.send(()).expect("stop");
    drop(base);
    tokio::time::timeout(Duration::from_secs(30), server)
        .await
        .expect("server stops")
        .expect("server task")
        .expect("server result");
}
