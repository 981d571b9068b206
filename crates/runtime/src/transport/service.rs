//! `CacheTransfer`, served by decode workers: one service for every transport that sends
//! over the network (`tcp` pushes the bytes; `cuda-ipc` and `nccl` send a header here and
//! move the bytes through the device).

use std::sync::Arc;

use sluice_proto::worker::v1 as pb;
use sluice_proto::worker::v1::cache_transfer_server::CacheTransfer;
use tonic::{Request, Response, Status, Streaming};

use super::device::{DeviceTransports, IpcMemory};
use super::nccl::NcclReceiver;
use super::{CacheInbox, TransportKind, cuda_ipc, tcp};

pub struct CacheTransferService {
    inbox: Arc<CacheInbox>,
    ipc: Option<Arc<dyn IpcMemory>>,
    nccl: Option<Arc<NcclReceiver>>,
}

impl CacheTransferService {
    /// Receives over `tcp` only.
    pub fn new(inbox: Arc<CacheInbox>) -> Self {
        CacheTransferService {
            inbox,
            ipc: None,
            nccl: None,
        }
    }

    /// Also receives over the device transports `device` has, keeping at most
    /// `communicators` NCCL communicators.
    pub fn with_device(mut self, device: &DeviceTransports, communicators: usize) -> Self {
        self.ipc = device.ipc.clone();
        self.nccl = device
            .nccl
            .clone()
            .map(|f| Arc::new(NcclReceiver::new(f, communicators)));
        self
    }

    /// The transports this service receives over (besides `in-process`, which bypasses it).
    pub fn kinds(&self) -> Vec<TransportKind> {
        let mut kinds = vec![TransportKind::Tcp];
        if self.ipc.is_some() {
            kinds.push(TransportKind::CudaIpc);
        }
        if self.nccl.is_some() {
            kinds.push(TransportKind::Nccl);
        }
        kinds
    }

    fn unsupported(kind: TransportKind) -> Status {
        Status::unimplemented(format!(
            "this worker does not receive over `{kind}` (it needs a `--features cuda` build, \
             `--device cuda:N` and `--transport {kind}` or `auto`)"
        ))
    }
}

#[tonic::async_trait]
impl CacheTransfer for CacheTransferService {
    async fn push(
        &self,
        request: Request<Streaming<pb::CacheChunk>>,
    ) -> Result<Response<pb::PushAck>, Status> {
        tcp::receive(&self.inbox, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn handshake(
        &self,
        request: Request<pb::HandshakeRequest>,
    ) -> Result<Response<pb::HandshakeResponse>, Status> {
        let r = request.into_inner();
        match TransportKind::from_pb("transport", r.transport)? {
            TransportKind::Tcp | TransportKind::InProcess => {}
            TransportKind::CudaIpc if self.ipc.is_some() => {}
            TransportKind::Nccl => match &self.nccl {
                Some(nccl) => nccl.accept(&r.sender_id, r.payload)?,
                None => return Err(Self::unsupported(TransportKind::Nccl)),
            },
            other => return Err(Self::unsupported(other)),
        }
        Ok(Response::new(pb::HandshakeResponse {
            payload: Vec::new(),
        }))
    }

    async fn push_ipc(
        &self,
        request: Request<pb::IpcPush>,
    ) -> Result<Response<pb::PushAck>, Status> {
        let memory = self
            .ipc
            .clone()
            .ok_or_else(|| Self::unsupported(TransportKind::CudaIpc))?;
        Ok(Response::new(
            cuda_ipc::receive(memory, &self.inbox, request.into_inner()).await?,
        ))
    }

    async fn push_nccl(
        &self,
        request: Request<pb::NcclPush>,
    ) -> Result<Response<pb::PushAck>, Status> {
        let nccl = self
            .nccl
            .as_ref()
            .ok_or_else(|| Self::unsupported(TransportKind::Nccl))?;
        Ok(Response::new(
            nccl.receive(self.inbox.clone(), request.into_inner())
                .await?,
        ))
    }
}
