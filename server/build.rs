//! Generates the gRPC service (KServe v2 / Open Inference Protocol) from `proto/` at build time.
//!
//! protox compiles the .proto files in pure Rust, so building kiln needs no `protoc` on the
//! machine (or in the Docker builder). The encoded descriptor set is also written to OUT_DIR for
//! the gRPC reflection service.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/open_inference_grpc.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("inference_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_server(true)
        // The client is used by the end-to-end tests and the gRPC load tool, not by `kiln serve`.
        .build_client(true)
        .build_transport(false)
        .compile_fds(fds)?;
    Ok(())
}
