//! The OCI layout store: concurrent index.json writers, digest checks, hostile digests.

mod common;

use bytes::Bytes;
use talaria_artifact::oci::layout::{LayoutError, OciLayout};
use talaria_artifact::oci::store::{LayoutStore, Store};
use talaria_artifact::oci::{self, RawManifest};

#[test]
fn concurrent_writers_lose_no_index_entries() {
    let dir = tempfile::tempdir().unwrap();
    let layout = OciLayout::open_or_create(dir.path()).unwrap();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let l = layout.clone();
            std::thread::spawn(move || {
                for i in 0..10 {
                    let body = format!(
                        r#"{{"schemaVersion":2,"mediaType":"{}","manifests":[],"annotations":{{"n":"{t}-{i}"}}}}"#,
                        oci::OCI_INDEX
                    );
                    let raw = RawManifest::new(Bytes::from(body), None);
                    l.put_manifest(&raw, Some(&format!("t{t}-{i}")), None).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let idx = layout.read_index().unwrap();
    assert_eq!(idx.manifests.len(), 80);
    // No temporary files left behind.
    let leftovers = std::fs::read_dir(dir.path().join("blobs/sha256"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with(".tmp")
        })
        .count();
    assert_eq!(leftovers, 0);
    // Re-tagging moves the tag.
    let raw = RawManifest::new(
        Bytes::from_static(br#"{"schemaVersion":2,"manifests":[]}"#),
        None,
    );
    layout.put_manifest(&raw, Some("t0-0"), None).unwrap();
    assert_eq!(layout.resolve("t0-0").unwrap().digest, raw.digest);
    assert_eq!(layout.read_index().unwrap().manifests.len(), 80);
}

#[tokio::test]
async fn corrupt_blobs_and_hostile_digests_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (image, _) = common::test_image(21);
    image.write_layout(dir.path(), "v1").unwrap();
    let layout = OciLayout::open(dir.path()).unwrap();
    let store = LayoutStore::new(layout.clone());

    // A blob whose bytes changed on disk.
    let victim = &image.layers[0];
    let path = layout.blob_path(&victim.digest).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let e = store.get_blob(&victim.digest, 1 << 30).await.unwrap_err();
    assert!(e.to_string().contains("does not match"), "{e}");
    // The streamed read fails before handing out its last chunk.
    let desc = common::image_manifest(&store, "v1").await.layers[0].clone();
    let mut s = store.open_blob(&desc).await.unwrap();
    let mut err = None;
    loop {
        match s.next_chunk().await {
            Ok(Some(_)) => continue,
            Ok(None) => break,
            Err(e) => {
                err = Some(e);
                break;
            }
        }
    }
    assert!(err.is_some(), "corrupt stream reached its end");

    // Digests that would escape the layout are rejected before touching the disk.
    for bad in ["sha256:../../etc/passwd", "sha256:ABC", "md5:00"] {
        assert!(matches!(layout.blob_path(bad), Err(LayoutError::Format(_))));
        assert!(store.get_blob(bad, 10).await.is_err());
    }
    // Unknown tags are "not found".
    let e = store.get_manifest("nope").await.unwrap_err();
    assert!(e.is_not_found(), "{e}");
    // A directory that is not a layout.
    let empty = tempfile::tempdir().unwrap();
    assert!(OciLayout::open(empty.path()).is_err());
}
