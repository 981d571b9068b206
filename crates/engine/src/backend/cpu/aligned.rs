//! f32 storage that starts on a cache line. The allocator promises 16-byte alignment only; a
//! 64-byte vector load that straddles two lines costs two loads, which the kernels pay on every
//! row of a misaligned buffer (the cache's DeltaNet states and KV blocks are read every step).

use std::alloc::{Layout, alloc_zeroed, dealloc, handle_alloc_error};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

const ALIGN_BYTES: usize = 64;

/// `len` f32s, zero-initialised, starting on a 64-byte boundary. Derefs to `[f32]`.
/// Allocated zeroed (as `vec![0.0; n]` is), so the pages of a large cache that no sequence
/// has used yet cost no memory.
pub struct AlignedBuffer {
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
                ptr: NonNull::dangling(),
                len,
            };
        };
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        match NonNull::new(raw.cast::<f32>()) {
            Some(ptr) => AlignedBuffer { ptr, len },
            None => handle_alloc_error(layout),
        }
    }

    /// The allocation for `len` floats; `None` for none.
    fn layout(len: usize) -> Option<Layout> {
        let bytes = len.checked_mul(4).filter(|&b| b > 0)?;
        Layout::from_size_align(bytes, ALIGN_BYTES).ok()
    }
}

impl Drop for AlignedBuffer {
    fn drop(&mut self) {
        if let Some(layout) = Self::layout(self.len) {
            // SAFETY: allocated in `zeroed` with this same layout.
            unsafe { dealloc(self.ptr.as_ptr().cast(), layout) }
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
}
