//! Sluice's gRPC contracts, generated at build time from `proto/` (nothing generated is
//! committed). `v1` is the public API; `worker::v1` the internal services between the router,
//! prefill, decode and expert workers.

pub mod v1 {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("sluice.v1");
}

pub mod worker {
    pub mod v1 {
        #![allow(clippy::all, clippy::pedantic)]
        tonic::include_proto!("sluice.worker.v1");
    }
}

/// Encoded `FileDescriptorSet` of every Sluice proto, for the reflection services.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/sluice_descriptor.bin"));

impl From<v1::FinishReason> for &'static str {
    fn from(reason: v1::FinishReason) -> Self {
        match reason {
            v1::FinishReason::Unspecified => "unspecified",
            v1::FinishReason::Length => "length",
            v1::FinishReason::Stop => "stop",
            v1::FinishReason::Eos => "eos",
            v1::FinishReason::Cancelled => "cancelled",
            v1::FinishReason::Error => "error",
        }
    }
}
