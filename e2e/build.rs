fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Client only: tests talk CRI to containerd, nothing here serves it.
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .compile_protos(&["proto/runtime/v1/cri.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
