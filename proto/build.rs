//! Compiles the etcd v3 API protos with tonic's codegen, and their protobuf-JSON
//! (serde) implementations with pbjson's. The protoc binary comes from
//! `protoc-bin-vendored`, handed to prost-build through its config (never through a
//! global `PROTOC`), so a fresh machine needs no system protoc.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read at run time: a build script binary compiled in another checkout that shares
    // the target dir must not point at that checkout.
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("protos");
    let files = [
        "mvccpb/kv.proto",
        "authpb/auth.proto",
        "etcdserverpb/rpc.proto",
        "v3lockpb/v3lock.proto",
        "v3electionpb/v3election.proto",
        "grpc/health/v1/health.proto",
    ]
    .map(|f| root.join(f));

    let descriptors = PathBuf::from(std::env::var("OUT_DIR")?).join("descriptors.bin");
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    config.file_descriptor_set_path(&descriptors);

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_with_config(config, &files, &[root])?;

    // Protobuf JSON for the etcd packages, as etcd's grpc-gateway writes it: the
    // proto's own (snake_case) field names, 64-bit integers as strings, bytes as
    // base64, enums by name, default values left out, unknown fields ignored.
    pbjson_build::Builder::new()
        .register_descriptors(&std::fs::read(&descriptors)?)?
        .preserve_proto_field_names()
        .ignore_unknown_fields()
        .build(&[
            ".mvccpb",
            ".authpb",
            ".etcdserverpb",
            ".v3lockpb",
            ".v3electionpb",
        ])?;
    Ok(())
}
