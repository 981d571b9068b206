//! The TCP transport: `CacheTransfer.Push` over gRPC. The header goes first and is checked
//! before any data is read; data follows in chunks of at most 1 MiB, each with its crc32c.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use sluice_engine::CacheSnapshot;
use sluice_proto::worker::v1 as pb;
use sluice_proto::worker::v1::cache_transfer_client::CacheTransferClient;
use tonic::transport::Channel;
use tonic::{Status, Streaming};

use super::{
    CacheInbox, CacheTransport, Destination, TransferHeader, TransportKind, header_from_pb,
    header_to_pb,
};
use crate::error::{Result, RuntimeError};
use crate::serve::connect_lazy;

const CHUNK_BYTES: usize = 1 << 20;

/// The largest `CacheTransfer` message a receiver accepts: a data chunk with its framing, or a
/// header (a few bytes per region). Anything larger is refused by gRPC before it is buffered.
pub const MAX_PUSH_MESSAGE_BYTES: usize = 4 * CHUNK_BYTES;

/// One HTTP/2 connection per destination, reused by every transport's `CacheTransfer` calls.
#[derive(Default)]
pub(super) struct Channels {
    channels: Mutex<HashMap<String, Channel>>,
}

impl Channels {
    pub(super) fn client(&self, address: &str) -> Result<CacheTransferClient<Channel>> {
        let mut map = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        let channel = match map.get(address) {
            Some(c) => c.clone(),
            None => {
                let c = connect_lazy(address)?;
                map.insert(address.to_string(), c.clone());
                c
            }
        };
        Ok(CacheTransferClient::new(channel)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX))
    }
}

/// A failed push as the sender reports it: the receiver's refusals as they are, anything else
/// as the destination being unavailable.
pub(super) fn push_error(dest: &Destination, status: Status) -> RuntimeError {
    match status.code() {
        tonic::Code::FailedPrecondition | tonic::Code::InvalidArgument | tonic::Code::DataLoss => {
            RuntimeError::Rpc(status)
        }
        _ => RuntimeError::Unavailable {
            worker: dest.worker_id.to_string(),
            message: format!("cache push failed: {}", status.message()),
        },
    }
}

/// Sends caches over gRPC.
#[derive(Default)]
pub struct TcpTransport {
    channels: Channels,
}

/// Header, then every region in chunks, produced lazily from the snapshot.
fn chunks(
    header: pb::CacheHeader,
    snapshot: CacheSnapshot,
) -> impl Iterator<Item = pb::CacheChunk> {
    let snapshot = Arc::new(snapshot);
    let head = std::iter::once(pb::CacheChunk {
        kind: Some(pb::cache_chunk::Kind::Header(header)),
    });
    let data = (0..snapshot.regions.len()).flat_map(move |region| {
        let snapshot = snapshot.clone();
        let len = snapshot.regions[region].len();
        (0..len).step_by(CHUNK_BYTES).map(move |offset| {
            let bytes = &snapshot.regions[region][offset..(offset + CHUNK_BYTES).min(len)];
            pb::CacheChunk {
                kind: Some(pb::cache_chunk::Kind::Data(pb::CacheData {
                    region: region as u32,
                    offset: offset as u64,
                    crc32c: crc32c::crc32c(bytes),
                    data: bytes.to_vec(),
                })),
            }
        })
    });
    head.chain(data)
}

#[async_trait]
impl CacheTransport for TcpTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Tcp
    }

    async fn push(
        &self,
        dest: &Destination,
        header: TransferHeader,
        snapshot: CacheSnapshot,
    ) -> Result<u64> {
        let total = snapshot.total_bytes() as u64;
        let mut client = self.channels.client(&dest.address)?;
        let stream = tokio_stream::iter(chunks(header_to_pb(&header, total), snapshot));
        let ack = client
            .push(stream)
            .await
            .map_err(|status| push_error(dest, status))?;
        Ok(ack.into_inner().bytes)
    }
}

/// Receives one `Push` stream into `inbox`.
pub(super) async fn receive(
    inbox: &CacheInbox,
    mut stream: Streaming<pb::CacheChunk>,
) -> Result<pb::PushAck, Status> {
    let mut assembly = match stream.message().await? {
        Some(first) => PushAssembly::start(inbox, first)?,
        None => PushAssembly::start(inbox, pb::CacheChunk { kind: None })?,
    };
    while let Some(chunk) = stream.message().await? {
        assembly.chunk(chunk)?;
    }
    assembly.finish()
}

/// One cache push being received: the header checked against the receiver before anything
/// is allocated, then every data chunk placed (crc checked, bounds checked), then the whole
/// delivered. The `Push` handler drives it; so does the fuzz target of the push stream
/// (`fuzz/fuzz_targets/cache_push.rs`): no message sequence makes it panic or allocate more
/// than the receiver's limits allow.
pub struct PushAssembly<'a> {
    inbox: &'a CacheInbox,
    header: TransferHeader,
    regions: Vec<Vec<u8>>,
    received: u64,
}

impl<'a> PushAssembly<'a> {
    /// Takes the stream's first message, which must be the header.
    pub fn start(inbox: &'a CacheInbox, first: pb::CacheChunk) -> Result<Self, Status> {
        let Some(pb::cache_chunk::Kind::Header(header)) = first.kind else {
            return Err(Status::invalid_argument(
                "the first message of a cache push must be its header",
            ));
        };
        let header = header_from_pb(&header)?;
        // Nothing is read or allocated for a cache this worker could not use.
        inbox.check(&header)?;
        let regions = header
            .layout
            .regions
            .iter()
            .map(|r| vec![0u8; r.elements * 4])
            .collect();
        Ok(PushAssembly {
            inbox,
            header,
            regions,
            received: 0,
        })
    }

    /// Places one data chunk.
    pub fn chunk(&mut self, chunk: pb::CacheChunk) -> Result<(), Status> {
        let Some(pb::cache_chunk::Kind::Data(d)) = chunk.kind else {
            return Err(Status::invalid_argument(
                "a second header in one cache push",
            ));
        };
        let region = self.regions.get_mut(d.region as usize).ok_or_else(|| {
            Status::invalid_argument(format!(
                "chunk names region {}, the layout has fewer",
                d.region
            ))
        })?;
        let end = usize::try_from(d.offset)
            .ok()
            .and_then(|start| Some((start, start.checked_add(d.data.len())?)))
            .filter(|&(_, e)| e <= region.len());
        let Some((start, end)) = end else {
            return Err(Status::invalid_argument(format!(
                "chunk of region {} at offset {} overruns it",
                d.region, d.offset
            )));
        };
        if crc32c::crc32c(&d.data) != d.crc32c {
            return Err(RuntimeError::TransferCorrupted(format!(
                "crc32c mismatch in region {} at offset {}",
                d.region, d.offset
            ))
            .into());
        }
        region[start..end].copy_from_slice(&d.data);
        self.received += d.data.len() as u64;
        Ok(())
    }

    /// Checks the byte count and hands the cache to the inbox.
    pub fn finish(self) -> Result<pb::PushAck, Status> {
        let expected: u64 = self.regions.iter().map(|r| r.len() as u64).sum();
        if self.received != expected {
            return Err(RuntimeError::TransferCorrupted(format!(
                "received {} of {expected} bytes",
                self.received
            ))
            .into());
        }
        let transfer_id = self.header.transfer_id.clone();
        let snapshot = CacheSnapshot {
            layout: self.header.layout.clone(),
            regions: self.regions,
        };
        self.inbox.deliver(self.header, snapshot)?;
        Ok(pb::PushAck {
            transfer_id,
            bytes: self.received,
        })
    }
}
