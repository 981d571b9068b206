//! f32 storage that starts on a cache line. The allocator promises 16-byte alignment only; a
//! 64-byte vector load that straddles two lines costs two loads, which the kernels pay on every
//! row of a misaligned buffer (the cache's DeltaNet states and KV blocks are read every step).

use std::alloc::{Layout, alloc_zeroed, dealloc, handle_alloc_error};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

const ALIGN_BYTES: usize = 64;
/// The alignment asked of the allocator: no more than it gives by itself, so that a zeroed
/// allocation stays `calloc` (fresh pages mapped lazily, never written) — asking for 64 bytes
/// would make the system allocator zero every byte up front.
const ALLOC_ALIGN: usize = 16;

/// `len` f32s, zero-initialised, starting on a 64-byte boundary. Derefs to `[f32]`.
/// Allocated zeroed (as `vec![0.0; n]` is), so the pages of a large cache that no sequence
/// has used yet cost no memory.
pub struct AlignedBuffer {
    /// The allocation, `ALIGN_BYTES` longer than the floats.
    raw: NonNull<u8>,
    /// The first float: `raw` moved up to the next 64-byte boundary.
    ptr: NonNull<f32>,
    len: usize,
}

// SAFETY: it owns its floats exclusively, as a `Vec<f32>` does.
unsafe impl Send for AlignedBuffer {}
// SAFETY: shared access only reads (through `&[f32]`).
unsafe impl Sync for AlignedBuffer {}

impl AlignedBuffer {
    pub fn zeroed(len: usize) -> Self {
        let Some(layout) = Self::layout(len) else {
            // Nothing to allocate (an empty slice needs only a non-null, f32-aligned pointer).
            return AlignedBuffer {
                raw: NonNull::dangling(),
                ptr: NonNull::dangling(),
                len,
            };
        };
        // SAFETY: the layout has a non-zero size.
        let Some(raw) = NonNull::new(unsafe { alloc_zeroed(layout) }) else {
            handle_alloc_error(layout)
        };
        // 16-byte aligned, so the distance to the boundary is whole floats, and it is less
        // than the ALIGN_BYTES of slack allocated.
        let skip = (ALIGN_BYTES - raw.as_ptr() as usize % ALIGN_BYTES) % ALIGN_BYTES;
        // SAFETY: `skip + 4 * len` bytes lie within the allocation.
        let ptr = unsafe { raw.add(skip) }.cast::<f32>();
        AlignedBuffer { raw, ptr, len }
    }

    /// The allocation for `len` floats; `None` for none.
    fn layout(len: usize) -> Option<Layout> {
        let bytes = len.checked_mul(4).filter(|&b| b > 0)?;
        Layout::from_size_align(bytes.checked_add(ALIGN_BYTES)?, ALLOC_ALIGN).ok()
    }
}

impl Drop for AlignedBuffer {
    fn drop(&mut self) {
        if let Some(layout) = Self::layout(self.len) {
            // SAFETY: allocated in `zeroed` with this same layout.
            unsafe { dealloc(self.raw.as_ptr(), layout) }
        }
    }
}

impl Deref for AlignedBuffer {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        // SAFETY: `len` initialised (zeroed) floats at `ptr`, owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuffer {
    fn deref_mut(&mut self) -> &mut [f32] {
        // SAFETY: as in `deref`, with the exclusive borrow of `self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_on_a_cache_line_and_holds_exactly_len_zeros() {
        for len in [0, 1, 15, 16, 17, 1000] {
            let mut b = AlignedBuffer::zeroed(len);
            assert_eq!(b.len(), len);
            assert!(len == 0 || (b.as_ptr() as usize).is_multiple_of(64));
            assert!(b.iter().all(|&v| v == 0.0));
            b.iter_mut().enumerate().for_each(|(i, v)| *v = i as f32);
            assert!(b.iter().enumerate().all(|(i, &v)| v == i as f32));
        }
    }

    /// Resident memory of this process, from the kernel.
    #[cfg(target_os = "linux")]
    fn resident_bytes() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<u64>()
            .unwrap()
            * 1024
    }

    /// A large cache costs memory only where it is used: 1 GiB of zeros is not written up
    /// front (an over-aligned zeroed allocation would be).
    #[cfg(target_os = "linux")]
    #[test]
    fn untouched_pages_are_not_resident() {
        let before = resident_bytes();
        let mut b = AlignedBuffer::zeroed(1 << 28);
        let after = resident_bytes();
        assert!(
            after < before + (64 << 20),
            "{before} → {after} bytes resident"
        );
        b[1 << 27] = 1.0;
        assert_eq!(b[(1 << 27) - 1], 0.0);
    }
}
