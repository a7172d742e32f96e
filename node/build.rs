fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Server for containerd, client for our own integration tests.
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(
            &["proto/containerd/services/snapshots/v1/snapshots.proto"],
            &["proto"],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
