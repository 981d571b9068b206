//! The in-process transport of `sluice up`: the snapshot moves between roles of one process
//! without a copy, through the same checks as any other transport.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use sluice_engine::CacheSnapshot;

use super::{CacheInbox, CacheTransport, Destination, TransferHeader, TransportKind};
use crate::error::{Result, RuntimeError};

/// The inboxes of the decode workers in this process, by address.
#[derive(Default)]
pub struct InProcessHub {
    inboxes: Mutex<HashMap<String, Arc<CacheInbox>>>,
}

impl InProcessHub {
    pub fn register(&self, address: &str, inbox: Arc<CacheInbox>) {
        self.inboxes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(address.to_string(), inbox);
    }

    fn get(&self, address: &str) -> Option<Arc<CacheInbox>> {
        self.inboxes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(address)
            .cloned()
    }
}

pub struct InProcessTransport {
    hub: Arc<InProcessHub>,
}

impl InProcessTransport {
    pub fn new(hub: Arc<InProcessHub>) -> Self {
        InProcessTransport { hub }
    }
}

#[async_trait]
impl CacheTransport for InProcessTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::InProcess
    }

    async fn push(
        &self,
        dest: &Destination,
        header: TransferHeader,
        snapshot: CacheSnapshot,
    ) -> Result<u64> {
        let inbox = self
            .hub
            .get(&dest.address)
            .ok_or_else(|| RuntimeError::Unavailable {
                worker: dest.worker_id.to_string(),
                message: "not a decode worker of this process".into(),
            })?;
        let bytes = snapshot.total_bytes() as u64;
        inbox.deliver(header, snapshot)?;
        Ok(bytes)
    }
}
