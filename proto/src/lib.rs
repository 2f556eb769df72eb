//! Switchyard's wire protocol.
//!
//! `proto/switchyard/v1/snapshot.proto` defines the snapshot stream and
//! documents its contract; this crate holds the generated tonic/prost code
//! ([`v1`]) and the one place where the domain model and the wire types meet
//! ([`convert`]), and the transport security both ends share ([`tls`]):
//!
//! ```text
//!   switchyard_model::ServiceState ──encode──▶ v1::ServiceState ──▶ gRPC
//!   switchyard_model::ServiceState ◀─decode+validate── v1::ServiceState ◀── gRPC
//! ```

pub mod codec;
pub mod convert;
pub mod parts;
pub mod tls;

/// Generated code for package `switchyard.v1`.
#[allow(
    missing_docs,
    missing_debug_implementations,
    unused_qualifications,
    clippy::all
)]
pub mod v1 {
    tonic::include_proto!("switchyard.v1");
}

/// The encoded `FileDescriptorSet` of every Switchyard proto, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("switchyard_descriptor");
