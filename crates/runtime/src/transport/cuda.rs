//! The device side of the GPU transports on CUDA (`cuda` feature): IPC-exportable buffers
//! from `cuMemAlloc` (stream-ordered pool memory cannot be exported) and two-rank NCCL
//! communicators. Caches are host bytes until the engine has a CUDA backend, so each side
//! copies host↔device around the device transfer.

use std::mem::MaybeUninit;
use std::sync::{Arc, Mutex, PoisonError};

use cudarc::driver::{CudaContext, CudaStream, DriverError, sys};
use cudarc::nccl::{Comm, Id};

use super::device::{
    Communicator, CommunicatorFactory, DeviceTransports, ExportedBuffer, IpcMemory,
};
use crate::error::{Result, RuntimeError};

fn driver(what: &str) -> impl Fn(DriverError) -> RuntimeError + '_ {
    move |e| RuntimeError::Device(format!("{what}: {e}"))
}

fn nccl(what: &str) -> impl Fn(cudarc::nccl::result::NcclError) -> RuntimeError + '_ {
    move |e| RuntimeError::Device(format!("{what}: NCCL error {:?}", e.0))
}

/// The device transports of `cuda:ordinal` that this host can run: `ipc` and/or `nccl`
/// asked for; a missing library or device is an error naming it.
pub fn device_transports(ordinal: usize, ipc: bool, want_nccl: bool) -> Result<DeviceTransports> {
    // SAFETY: only probes whether the shared library can be loaded.
    if !unsafe { sys::is_culib_present() } {
        return Err(RuntimeError::Device(
            "no CUDA driver (libcuda.so) could be loaded".into(),
        ));
    }
    let ctx = CudaContext::new(ordinal).map_err(driver("opening the device"))?;
    let mut out = DeviceTransports::default();
    if ipc {
        out.ipc = Some(Arc::new(CudaIpc { ctx: ctx.clone() }));
    }
    if want_nccl {
        // SAFETY: as above.
        if !unsafe { cudarc::nccl::sys::is_culib_present() } {
            return Err(RuntimeError::Device(
                "NCCL (libnccl.so) could not be loaded: put its folder on LD_LIBRARY_PATH".into(),
            ));
        }
        out.nccl = Some(Arc::new(NcclFactory { ctx }));
    }
    Ok(out)
}

struct CudaIpc {
    ctx: Arc<CudaContext>,
}

struct CudaBuffer {
    ctx: Arc<CudaContext>,
    ptr: sys::CUdeviceptr,
    len: usize,
    handle: Vec<u8>,
}

impl ExportedBuffer for CudaBuffer {
    fn handle(&self) -> Vec<u8> {
        self.handle.clone()
    }
    fn len(&self) -> usize {
        self.len
    }
}

impl Drop for CudaBuffer {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: `ptr` came from `cuMemAlloc` in this context and is freed once.
            let _ = unsafe { sys::cuMemFree_v2(self.ptr) };
        }
    }
}

impl IpcMemory for CudaIpc {
    fn export(&self, parts: &[&[u8]]) -> Result<Box<dyn ExportedBuffer>> {
        self.ctx
            .bind_to_thread()
            .map_err(driver("binding the context"))?;
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let mut ptr: sys::CUdeviceptr = 0;
        // SAFETY: plain driver calls on a bound context; every copy stays inside `len` bytes.
        unsafe {
            sys::cuMemAlloc_v2(&mut ptr, len.max(1))
                .result()
                .map_err(driver("allocating the export buffer"))?;
        }
        let mut buffer = CudaBuffer {
            ctx: self.ctx.clone(),
            ptr,
            len,
            handle: Vec::new(),
        };
        let mut at = 0u64;
        for part in parts {
            // SAFETY: see above.
            unsafe {
                sys::cuMemcpyHtoD_v2(ptr + at, part.as_ptr().cast(), part.len())
                    .result()
                    .map_err(driver("copying the cache to the device"))?;
            }
            at += part.len() as u64;
        }
        let mut handle = MaybeUninit::<sys::CUipcMemHandle>::uninit();
        // SAFETY: `ptr` is a `cuMemAlloc` allocation, which IPC can export.
        let handle = unsafe {
            sys::cuIpcGetMemHandle(handle.as_mut_ptr(), ptr)
                .result()
                .map_err(driver("exporting the buffer"))?;
            handle.assume_init()
        };
        buffer.handle = handle.reserved.iter().map(|&c| c as u8).collect();
        Ok(Box::new(buffer))
    }

    fn import(&self, handle: &[u8], parts: &mut [&mut [u8]]) -> Result<()> {
        let reserved: [u8; 64] = handle
            .try_into()
            .map_err(|_| RuntimeError::invalid("handle", "a CUDA IPC handle has 64 bytes"))?;
        self.ctx
            .bind_to_thread()
            .map_err(driver("binding the context"))?;
        let handle = sys::CUipcMemHandle {
            reserved: reserved.map(|b| b as std::ffi::c_char),
        };
        let mut ptr: sys::CUdeviceptr = 0;
        // SAFETY: maps another process's allocation; reads stay within the parts' total,
        // which the receiver checked against the header before calling.
        unsafe {
            sys::cuIpcOpenMemHandle_v2(
                &mut ptr,
                handle,
                sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32,
            )
            .result()
            .map_err(driver("mapping the sender's buffer"))?;
        }
        let mut at = 0u64;
        let mut copied = Ok(());
        for part in parts.iter_mut() {
            // SAFETY: see above.
            copied = unsafe {
                sys::cuMemcpyDtoH_v2(part.as_mut_ptr().cast(), ptr + at, part.len()).result()
            };
            if copied.is_err() {
                break;
            }
            at += part.len() as u64;
        }
        // SAFETY: `ptr` was mapped above and is unmapped once.
        let _ = unsafe { sys::cuIpcCloseMemHandle(ptr) };
        copied.map_err(driver("copying from the sender's buffer"))
    }
}

struct NcclFactory {
    ctx: Arc<CudaContext>,
}

/// One rank of a two-rank communicator, used by one thread at a time.
struct NcclComm {
    comm: Mutex<CommCell>,
    stream: Arc<CudaStream>,
    peer: i32,
}

struct CommCell(Comm);
// SAFETY: an NCCL communicator may be used from any thread as long as calls on it do not
// overlap; the Mutex around it guarantees that.
unsafe impl Send for CommCell {}

impl Communicator for NcclComm {
    fn send(&self, bytes: &[u8]) -> Result<()> {
        let comm = self.comm.lock().unwrap_or_else(PoisonError::into_inner);
        let data = self
            .stream
            .clone_htod(bytes)
            .map_err(driver("copying the cache to the device"))?;
        comm.0.send(&data, self.peer).map_err(nccl("ncclSend"))?;
        self.stream
            .synchronize()
            .map_err(driver("waiting for ncclSend"))
    }

    fn recv(&self, bytes: &mut [u8]) -> Result<()> {
        let comm = self.comm.lock().unwrap_or_else(PoisonError::into_inner);
        let mut data = self
            .stream
            .alloc_zeros::<u8>(bytes.len())
            .map_err(driver("allocating the receive buffer"))?;
        comm.0
            .recv(&mut data, self.peer)
            .map_err(nccl("ncclRecv"))?;
        self.stream
            .memcpy_dtoh(&data, bytes)
            .map_err(driver("copying the cache from the device"))?;
        self.stream
            .synchronize()
            .map_err(driver("waiting for ncclRecv"))
    }
}

impl CommunicatorFactory for NcclFactory {
    fn unique_id(&self) -> Result<Vec<u8>> {
        let id = Id::new().map_err(nccl("ncclGetUniqueId"))?;
        Ok(id.internal().iter().map(|&c| c as u8).collect())
    }

    fn join(&self, id: &[u8], rank: usize) -> Result<Arc<dyn Communicator>> {
        let internal: [u8; 128] = id
            .try_into()
            .map_err(|_| RuntimeError::invalid("payload", "an NCCL unique id has 128 bytes"))?;
        let id = Id::uninit(internal.map(|b| b as std::ffi::c_char));
        let stream = self.ctx.new_stream().map_err(driver("creating a stream"))?;
        let comm =
            Comm::from_rank(stream.clone(), rank, 2, id).map_err(nccl("ncclCommInitRank"))?;
        Ok(Arc::new(NcclComm {
            comm: Mutex::new(CommCell(comm)),
            stream,
            peer: 1 - rank as i32,
        }))
    }
}
