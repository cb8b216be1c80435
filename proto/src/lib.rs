//! The cluster's gRPC protocol (generated from `proto/moe.proto`) and the packed-tensor codec.

pub mod tensor;

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("moe.v1");
}

/// Version of the wire protocol this build speaks. Servers refuse any other.
pub const PROTOCOL_VERSION: u32 = 1;

pub use tensor::{TensorError, WireDtype, decode_f32, decode_matrix, encode_bf16, encode_f32};
