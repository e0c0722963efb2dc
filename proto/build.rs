//! Generates the presence API from the `.proto` files with protox, a pure-Rust
//! protobuf compiler, so building needs no `protoc` install.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "presence/v1/presence.proto",
    "presence/v1/contacts.proto",
    "presence/v1/feed.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptors = protox::compile(PROTOS, ["."])?;
    std::fs::write(
        out_dir.join("presence_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Small per-stream buffers: see `codec::CompactCodec`.
        .codec_path("crate::codec::CompactCodec")
        .compile_fds(descriptors)?;
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}
