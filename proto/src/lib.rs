//! # concord-proto
//!
//! The etcd v3 wire protocol as `.proto` files (written for Concord from the public API
//! reference; package names, message names and field numbers are etcd's) and the Rust
//! code tonic/prost generate from them: messages, server traits and clients, and the
//! messages' protobuf JSON (serde `Serialize`/`Deserialize` from pbjson, in the shape
//! etcd's grpc-gateway uses: proto field names, int64 as strings, bytes as base64).
//!
//! Owns: `etcdserverpb` (KV, Watch, Lease, Cluster, Maintenance, Auth), `mvccpb`,
//! `authpb`, `v3lockpb`, `v3electionpb` and `grpc.health.v1`.
//!
//! Not: any behaviour. Services are implemented in `concord-gateway`; this crate holds
//! generated code only, so every other crate (and any etcd client written in Rust) can
//! share one definition of the wire types.

#![allow(missing_docs, clippy::all, clippy::pedantic)]

pub mod mvccpb {
    tonic::include_proto!("mvccpb");
    include!(concat!(env!("OUT_DIR"), "/mvccpb.serde.rs"));
}

pub mod authpb {
    tonic::include_proto!("authpb");
    include!(concat!(env!("OUT_DIR"), "/authpb.serde.rs"));
}

pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
    include!(concat!(env!("OUT_DIR"), "/etcdserverpb.serde.rs"));
}

pub mod v3lockpb {
    tonic::include_proto!("v3lockpb");
    include!(concat!(env!("OUT_DIR"), "/v3lockpb.serde.rs"));
}

pub mod v3electionpb {
    tonic::include_proto!("v3electionpb");
    include!(concat!(env!("OUT_DIR"), "/v3electionpb.serde.rs"));
}

pub mod grpc {
    pub mod health {
        pub mod v1 {
            tonic::include_proto!("grpc.health.v1");
        }
    }
}
