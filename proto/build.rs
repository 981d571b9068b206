//! Compiles the protos with protox (pure Rust: no system `protoc` for our own protos) and
//! generates the prost messages and tonic services into OUT_DIR, plus the encoded descriptor
//! set that the reflection services serve.

use std::path::PathBuf;

use prost::Message;

const PROTOS: [&str; 2] = ["sluice/v1/inference.proto", "sluice/worker/v1/worker.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(PROTOS, ["."])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("sluice_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
