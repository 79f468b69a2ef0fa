//! Generated protobuf and gRPC code for `proto/hostvol/v1/node.proto`, and nothing else.

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("hostvol.v1");
}

/// Encoded descriptors of the proto files, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/hostvol_descriptor.bin"));
