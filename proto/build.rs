//! Compiles `reload/v1/*.proto` with the pure-Rust `protox` compiler (no
//! system `protoc` needed) and generates the tonic/prost code from its
//! descriptor set. The encoded descriptor set is also written to OUT_DIR so
//! the agent can serve gRPC reflection.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "reload/v1/agent.proto",
    "reload/v1/artifacts.proto",
    "reload/v1/leases.proto",
    "reload/v1/services.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let fds = protox::compile(PROTOS, ["."])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("reload_v1_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .emit_rerun_if_changed(false)
        // Upload chunks as `Bytes`: decoded without a copy out of the
        // receive buffer.
        .bytes(".reload.v1.UploadArtifactRequest.chunk")
        .bytes(".reload.v1.ReadArtifactResponse.chunk")
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed=reload");
    Ok(())
}
