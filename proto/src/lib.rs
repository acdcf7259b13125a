//! The `flotilla.v1` protocol: the generated code of `proto/flotilla/v1/*.proto`,
//! the descriptor set for server reflection, and the conversions between wire
//! types and the domain model of `flotilla-common` (validating on the way in).

#![allow(missing_docs)]

/// Generated types and service stubs of package `flotilla.v1`.
pub mod pb {
    #![allow(clippy::all, clippy::pedantic, clippy::unwrap_used, clippy::expect_used)]
    tonic::include_proto!("flotilla.v1");
}

mod convert;

pub use convert::{Limits, WireError};

/// The encoded `FileDescriptorSet` of every Flotilla proto file, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("flotilla_descriptor");

/// The protocol revision this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;
