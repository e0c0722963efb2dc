//! The presence API (`presence.v1`), generated at build time from the `.proto`
//! files beside this crate: message types, server traits and client stubs.

pub mod v1 {
    tonic::include_proto!("presence.v1");
}

/// The encoded `FileDescriptorSet` of the API, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("presence_descriptor");
