//! Compiles the etcd v3 API protos with tonic's codegen. The protoc binary comes from
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

    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_with_config(config, &files, &[root])?;
    Ok(())
}
