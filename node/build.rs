fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Server for containerd, client for our own integration tests.
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(
            &["proto/containerd/services/snapshots/v1/snapshots.proto"],
            &["proto"],
        )?;
    // CRI messages the image-service proxy decodes (it forwards raw bytes, no service code).
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(false)
        .compile_protos(&["proto/runtime/v1/image_pull.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
