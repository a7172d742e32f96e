//! `crds/` must be exactly what the Rust types generate.

#[test]
fn crds_dir_is_current() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
    let files = talaria_controller::crdgen::crd_files().expect("generate CRDs");
    assert_eq!(files.len(), 3);
    for (name, yaml) in files {
        let on_disk = std::fs::read_to_string(dir.join(&name)).unwrap_or_default();
        assert!(
            on_disk == yaml,
            "crds/{name} is not current: run `cargo run -p talaria-controller --bin crdgen`"
        );
    }
}
