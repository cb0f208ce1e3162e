//! Compiles `proto/greeter/v1/greeter.proto` with the pure-Rust `protox`
//! compiler (no system `protoc`), as `proto/build.rs` does for the agent's
//! API.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let fds = protox::compile(["greeter/v1/greeter.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .emit_rerun_if_changed(false)
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
