//! # concord-proto
//!
//! The etcd v3 wire protocol as `.proto` files (written for Concord from the public API
//! reference; package names, message names and field numbers are etcd's) and the Rust
//! code tonic/prost generate from them: messages, server traits and clients.
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
}

pub mod authpb {
    tonic::include_proto!("authpb");
}

pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
}

pub mod v3lockpb {
    tonic::include_proto!("v3lockpb");
}

pub mod v3electionpb {
    tonic::include_proto!("v3electionpb");
}

pub mod grpc {
    pub mod health {
        pub mod v1 {
            tonic::include_proto!("grpc.health.v1");
        }
    }
}
