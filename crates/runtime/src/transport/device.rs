//! What the GPU transports need from a device, as traits: memory another process on the node
//! can map (CUDA IPC) and two-rank communicators between a sender and a receiver (NCCL). The
//! CUDA implementations live behind the `cuda` feature ([`super::cuda`]); the transports'
//! protocols are tested against host-memory fakes.

use std::sync::Arc;

use crate::error::Result;

/// A device buffer exported for other processes; freed when dropped.
pub trait ExportedBuffer: Send + Sync {
    /// Opaque bytes another process gives [`IpcMemory::import`] to map this buffer.
    fn handle(&self) -> Vec<u8>;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Device memory shared between processes on one node.
pub trait IpcMemory: Send + Sync {
    /// One exported buffer holding `parts` back to back.
    fn export(&self, parts: &[&[u8]]) -> Result<Box<dyn ExportedBuffer>>;

    /// Maps the buffer `handle` names (exported by another process), copies its first `len`
    /// bytes into `parts` (back to back, as exported) and unmaps it.
    fn import(&self, handle: &[u8], parts: &mut [&mut [u8]]) -> Result<()>;
}

/// One end of a two-rank communicator. Sends and receives on one communicator are matched in
/// order, so a sender holds it exclusively for the length of one transfer.
pub trait Communicator: Send + Sync {
    fn send(&self, bytes: &[u8]) -> Result<()>;
    fn recv(&self, bytes: &mut [u8]) -> Result<()>;
}

/// Makes communicators: the sender draws a unique id, both sides join with it.
pub trait CommunicatorFactory: Send + Sync {
    fn unique_id(&self) -> Result<Vec<u8>>;

    /// Joins the communicator `id` as `rank` (0: the sender, 1: the receiver). Blocks until
    /// the other rank has joined too.
    fn join(&self, id: &[u8], rank: usize) -> Result<Arc<dyn Communicator>>;
}

/// The device side of a worker's transports; `None` where a transport is off.
#[derive(Clone, Default)]
pub struct DeviceTransports {
    pub ipc: Option<Arc<dyn IpcMemory>>,
    pub nccl: Option<Arc<dyn CommunicatorFactory>>,
}

#[cfg(test)]
pub mod fake {
    //! Host-memory stand-ins: an exported buffer is a file in a shared directory (so two
    //! processes could map it), a communicator is a pair of channels keyed by its id.

    use std::collections::HashMap;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
    use std::sync::{Arc, Condvar, Mutex, PoisonError};
    use std::time::Duration;

    use super::*;
    use crate::error::RuntimeError;

    pub struct FileIpc {
        pub dir: PathBuf,
        next: AtomicU64,
    }

    impl FileIpc {
        pub fn new(dir: PathBuf) -> Self {
            FileIpc {
                dir,
                next: AtomicU64::new(0),
            }
        }

        /// Buffers exported and not yet freed.
        pub fn live(&self) -> usize {
            std::fs::read_dir(&self.dir).map_or(0, |d| d.count())
        }
    }

    struct FileBuffer {
        path: PathBuf,
        len: usize,
    }

    impl ExportedBuffer for FileBuffer {
        fn handle(&self) -> Vec<u8> {
            self.path.to_string_lossy().as_bytes().to_vec()
        }
        fn len(&self) -> usize {
            self.len
        }
    }

    impl Drop for FileBuffer {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    impl IpcMemory for FileIpc {
        fn export(&self, parts: &[&[u8]]) -> Result<Box<dyn ExportedBuffer>> {
            let n = self.next.fetch_add(1, Ordering::Relaxed);
            let path = self.dir.join(format!("buffer-{n}"));
            let bytes = parts.concat();
            std::fs::write(&path, &bytes)?;
            Ok(Box::new(FileBuffer {
                path,
                len: bytes.len(),
            }))
        }

        fn import(&self, handle: &[u8], parts: &mut [&mut [u8]]) -> Result<()> {
            let path = PathBuf::from(String::from_utf8_lossy(handle).into_owned());
            let bytes = std::fs::read(&path)
                .map_err(|e| RuntimeError::Internal(format!("cannot map {path:?}: {e}")))?;
            let want: usize = parts.iter().map(|p| p.len()).sum();
            if bytes.len() < want {
                return Err(RuntimeError::Internal(format!(
                    "the buffer holds {} bytes, {want} wanted",
                    bytes.len()
                )));
            }
            let mut at = 0;
            for p in parts.iter_mut() {
                p.copy_from_slice(&bytes[at..at + p.len()]);
                at += p.len();
            }
            Ok(())
        }
    }

    type Pipe = (SyncSender<Vec<u8>>, Mutex<Receiver<Vec<u8>>>);

    /// Communicators between the ranks of one process, by id.
    #[derive(Default)]
    pub struct ChannelFactory {
        next: AtomicU64,
        pending: Mutex<HashMap<Vec<u8>, Arc<ChannelComm>>>,
        joined: Condvar,
        /// Communicators made, by either rank.
        pub joins: AtomicU64,
    }

    pub struct ChannelComm {
        /// rank 0 → rank 1 only: a cache moves one way.
        pipe: Pipe,
    }

    impl Communicator for ChannelComm {
        fn send(&self, bytes: &[u8]) -> Result<()> {
            self.pipe
                .0
                .send(bytes.to_vec())
                .map_err(|_| RuntimeError::Internal("the peer left".into()))
        }
        fn recv(&self, bytes: &mut [u8]) -> Result<()> {
            let rx = self.pipe.1.lock().unwrap_or_else(PoisonError::into_inner);
            let got = rx
                .recv_timeout(Duration::from_secs(10))
                .map_err(|_| RuntimeError::Internal("nothing arrived".into()))?;
            if got.len() != bytes.len() {
                return Err(RuntimeError::Internal(format!(
                    "{} bytes sent, {} posted",
                    got.len(),
                    bytes.len()
                )));
            }
            bytes.copy_from_slice(&got);
            Ok(())
        }
    }

    impl CommunicatorFactory for ChannelFactory {
        fn unique_id(&self) -> Result<Vec<u8>> {
            Ok(format!("id-{}", self.next.fetch_add(1, Ordering::Relaxed)).into_bytes())
        }

        fn join(&self, id: &[u8], rank: usize) -> Result<Arc<dyn Communicator>> {
            self.joins.fetch_add(1, Ordering::Relaxed);
            let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
            // The first rank to arrive makes the pair and waits for the second, like NCCL's
            // `ncclCommInitRank`.
            if let Some(comm) = pending.remove(id) {
                self.joined.notify_all();
                return Ok(comm);
            }
            let (tx, rx) = sync_channel(64);
            let comm = Arc::new(ChannelComm {
                pipe: (tx, Mutex::new(rx)),
            });
            pending.insert(id.to_vec(), comm.clone());
            let (pending, timeout) = self
                .joined
                .wait_timeout_while(pending, Duration::from_secs(10), |p| p.contains_key(id))
                .unwrap_or_else(PoisonError::into_inner);
            if timeout.timed_out() {
                drop(pending);
                return Err(RuntimeError::Internal(format!(
                    "rank {rank}: no peer joined"
                )));
            }
            Ok(comm)
        }
    }
}
