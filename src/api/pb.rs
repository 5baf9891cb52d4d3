//! Code generated from `proto/dccsign/v1/issuance.proto`.
#![allow(missing_docs, clippy::all)]

tonic::include_proto!("dccsign.v1");

/// The encoded file descriptor set, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/dccsign_descriptor.bin"));
