//! Compiles the .proto files with protox (pure Rust), so a fresh machine needs
//! nothing but cargo; also writes the descriptor set that server reflection serves.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/flotilla/v1/telemetry.proto",
        "proto/flotilla/v1/agent.proto",
        "proto/flotilla/v1/alerts.proto",
        "proto/flotilla/v1/deploy.proto",
        "proto/flotilla/v1/capacity.proto",
        "proto/flotilla/v1/enroll.proto",
        "proto/flotilla/v1/admin.proto",
        "proto/flotilla/v1/fleet.proto",
    ];
    for file in &files {
        println!("cargo:rerun-if-changed={file}");
    }
    let fds = protox::compile(files, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("flotilla_descriptor.bin"), prost::Message::encode_to_vec(&fds))?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // The RPC `Connect` would clash with the generated `connect` constructor;
        // clients are built from a `Channel` with `new` instead.
        .build_transport(false)
        .compile_fds(fds)?;
    Ok(())
}
