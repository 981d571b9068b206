//! The CUDA IPC transport, for a prefill and a decode worker on one node: the sender exports
//! the cache as one device buffer and sends its handle in `CacheTransfer.PushIpc`; the
//! receiver checks the header, maps the buffer, copies it into its own memory and answers,
//! after which the sender frees the buffer. No byte crosses the network stack.

use std::sync::Arc;

use async_trait::async_trait;
use sluice_engine::CacheSnapshot;
use sluice_proto::worker::v1 as pb;

use super::device::IpcMemory;
use super::tcp::{Channels, push_error};
use super::{
    CacheInbox, CacheTransport, Destination, TransferHeader, TransportKind, header_from_pb,
    header_to_pb,
};
use crate::error::{Result, RuntimeError};

/// The sending side, on prefill workers.
pub struct CudaIpcTransport {
    memory: Arc<dyn IpcMemory>,
    channels: Channels,
}

impl CudaIpcTransport {
    pub fn new(memory: Arc<dyn IpcMemory>) -> Self {
        CudaIpcTransport {
            memory,
            channels: Channels::default(),
        }
    }
}

fn blocking_error(e: tokio::task::JoinError) -> RuntimeError {
    RuntimeError::Internal(format!("device copy panicked: {e}"))
}

#[async_trait]
impl CacheTransport for CudaIpcTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::CudaIpc
    }

    async fn push(
        &self,
        dest: &Destination,
        header: TransferHeader,
        snapshot: CacheSnapshot,
    ) -> Result<u64> {
        let total = snapshot.total_bytes() as u64;
        let memory = self.memory.clone();
        let buffer = tokio::task::spawn_blocking(move || {
            let parts: Vec<&[u8]> = snapshot.regions.iter().map(Vec::as_slice).collect();
            memory.export(&parts)
        })
        .await
        .map_err(blocking_error)??;
        let ack = self
            .channels
            .client(&dest.address)?
            .push_ipc(pb::IpcPush {
                header: Some(header_to_pb(&header, total)),
                handle: buffer.handle(),
            })
            .await
            .map_err(|status| push_error(dest, status))?;
        // The receiver holds its own copy now (or refused): the export can go.
        drop(buffer);
        Ok(ack.into_inner().bytes)
    }
}

/// Receives one `PushIpc` into `inbox`: nothing is mapped for a header this worker refuses.
pub async fn receive(
    memory: Arc<dyn IpcMemory>,
    inbox: &CacheInbox,
    push: pb::IpcPush,
) -> Result<pb::PushAck> {
    let header = push
        .header
        .as_ref()
        .ok_or_else(|| RuntimeError::invalid("header", "missing"))?;
    let total = header.total_bytes;
    let header = header_from_pb(header)?;
    inbox.check(&header)?;
    let expected: u64 = header
        .layout
        .regions
        .iter()
        .map(|r| r.elements as u64 * 4)
        .sum();
    if total != expected {
        return Err(RuntimeError::TransferCorrupted(format!(
            "the header announces {total} bytes, its layout holds {expected}"
        )));
    }
    if push.handle.is_empty() {
        return Err(RuntimeError::invalid("handle", "no buffer handle"));
    }
    let layout = header.layout.clone();
    let regions = tokio::task::spawn_blocking(move || {
        let mut regions: Vec<Vec<u8>> = layout
            .regions
            .iter()
            .map(|r| vec![0u8; r.elements * 4])
            .collect();
        let mut parts: Vec<&mut [u8]> = regions.iter_mut().map(Vec::as_mut_slice).collect();
        memory.import(&push.handle, &mut parts).map(|()| regions)
    })
    .await
    .map_err(blocking_error)??;
    let transfer_id = header.transfer_id.clone();
    let snapshot = CacheSnapshot {
        layout: header.layout.clone(),
        regions,
    };
    inbox.deliver(header, snapshot)?;
    Ok(pb::PushAck {
        transfer_id,
        bytes: expected,
    })
}
