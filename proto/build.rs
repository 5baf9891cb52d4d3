//! Compiles the gRPC contract in `proto/` with protox (a pure-Rust protobuf compiler, so no
//! `protoc` is needed on the machine) and generates the tonic service code and the file
//! descriptor set served by gRPC reflection.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/dccsign/v1/issuance.proto",
        "proto/dccsign/v1/keys.proto",
        "proto/dccsign/v1/revocation.proto",
    ];
    // Paths are relative to the package root (cargo runs build scripts there).
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("dccsign_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
