//! Per-thread pools of reusable buffers. A step takes the buffers it needs and gives them back
//! when they drop, so once the first steps have sized them a decode step allocates nothing
//! (`tests/allocations.rs` counts). A thread keeps what its largest step needed: the price is
//! memory equal to the peak working set, held between steps.

use std::cell::RefCell;
use std::ops::{Deref, DerefMut};
use std::thread::LocalKey;

/// Buffers a thread keeps per element type; more are freed. (A buffer dropped on another
/// thread than the one that took it joins that thread's pool.)
const KEPT: usize = 48;
/// Capacities are rounded up to a power of two of at least this many elements (up to
/// `EXACT_ABOVE`), so the varying small requests of a step (an expert's 1..k rows, the last
/// row tile) share a few sizes and a thread's pool stops growing after its first steps.
const MIN_CAPACITY: usize = 4096;
const EXACT_ABOVE: usize = 1 << 20;
/// Small buffers a thread's pool starts with, so a thread that has not yet run every kind of
/// task (a pool worker early on) still finds one.
const STOCK: usize = 4;

/// Element types with a pool of their own.
pub trait Pooled: Copy + Default + 'static {
    fn free_list() -> &'static LocalKey<RefCell<Vec<Vec<Self>>>>;
}

macro_rules! pooled {
    ($($ty:ty => $name:ident),* $(,)?) => {
        thread_local! {
            $(static $name: RefCell<Vec<Vec<$ty>>> = const { RefCell::new(Vec::new()) };)*
        }
        $(impl Pooled for $ty {
            fn free_list() -> &'static LocalKey<RefCell<Vec<Vec<Self>>>> {
                &$name
            }
        })*
    };
}

pooled!(f32 => FREE_F32, u16 => FREE_U16, usize => FREE_USIZE);

/// Buffers start on a 64-byte boundary (a cache line, one AVX-512 vector): a vector load that
/// straddles two lines costs two, which cost the matrix kernels ~30 % when activations and
/// widened weight tiles started 16 bytes past a line (allocators promise only 16).
const ALIGN_BYTES: usize = 64;

/// A buffer from this thread's pool, returned to it on drop. Derefs to a slice starting on a
/// 64-byte boundary (the pooled `Vec` holds a few elements of padding before it).
pub struct Scratch<T: Pooled> {
    buf: Vec<T>,
    /// Where the aligned slice starts in `buf`.
    start: usize,
}

/// Elements of padding a buffer may need before its aligned start.
fn pad<T>() -> usize {
    ALIGN_BYTES / std::mem::size_of::<T>()
}

/// `len` zeros.
pub fn zeroed<T: Pooled>(len: usize) -> Scratch<T> {
    let (mut buf, start) = take::<T>(len);
    buf.clear();
    buf.resize(start + len, T::default());
    Scratch { buf, start }
}

/// The capacity a request for `len` gets.
fn size_class(len: usize) -> usize {
    if len > EXACT_ABOVE {
        len
    } else {
        len.max(MIN_CAPACITY).next_power_of_two()
    }
}

/// `len` elements the caller overwrites before reading: whatever an earlier user left there
/// (initialised values, never uninitialised memory), which saves zeroing large outputs.
pub fn for_overwrite<T: Pooled>(len: usize) -> Scratch<T> {
    let (mut buf, start) = take::<T>(len);
    if buf.len() >= start + len {
        buf.truncate(start + len);
    } else {
        buf.resize(start + len, T::default());
    }
    Scratch { buf, start }
}

/// An empty buffer with room for `capacity` elements.
pub fn with_capacity<T: Pooled>(capacity: usize) -> Scratch<T> {
    let (mut buf, start) = take::<T>(capacity);
    buf.truncate(start);
    buf.resize(start, T::default());
    Scratch { buf, start }
}

/// A buffer with room for `capacity` after its aligned start, and that start: the smallest
/// pooled one that holds it, else the largest grown to the size class, else a new one. Best
/// fit keeps a small request from taking the buffer a large one needs.
fn take<T: Pooled>(capacity: usize) -> (Vec<T>, usize) {
    let needed = capacity + pad::<T>();
    let mut buf = pick::<T>(needed);
    if buf.capacity() < needed {
        let class = size_class(needed);
        buf.reserve_exact(class - buf.len());
    }
    let misaligned = buf.as_ptr() as usize % ALIGN_BYTES;
    // Element-aligned allocations: the distance to the boundary is whole elements.
    let start = (ALIGN_BYTES - misaligned) % ALIGN_BYTES / std::mem::size_of::<T>();
    (buf, start)
}

impl<T: Pooled> Scratch<T> {
    /// Appends `value` (within the requested capacity no reallocation moves the start).
    pub fn push(&mut self, value: T) {
        debug_assert!(self.buf.len() < self.buf.capacity());
        self.buf.push(value);
    }

    /// Appends `values`.
    pub fn extend_from_slice(&mut self, values: &[T]) {
        self.buf.extend_from_slice(values);
    }

    /// Empties it, keeping its room.
    pub fn clear(&mut self) {
        self.buf.truncate(self.start);
    }

    /// Elements it can hold from its aligned start.
    pub fn capacity(&self) -> usize {
        self.buf.capacity() - self.start
    }
}

impl<T: Pooled> Extend<T> for Scratch<T> {
    fn extend<I: IntoIterator<Item = T>>(&mut self, values: I) {
        self.buf.extend(values);
    }
}

/// Stocks this thread's pools (every element type) now, so its first tasks allocate nothing:
/// the kernel pool's workers call it when they start.
pub fn stock_thread() {
    stock::<f32>();
    stock::<u16>();
    stock::<usize>();
}

fn stock<T: Pooled>() {
    T::free_list().with_borrow_mut(stock_list);
}

fn stock_list<T: Pooled>(free: &mut Vec<Vec<T>>) {
    if free.capacity() == 0 {
        free.reserve_exact(KEPT);
        free.extend((0..STOCK).map(|_| Vec::with_capacity(MIN_CAPACITY)));
    }
}

fn pick<T: Pooled>(capacity: usize) -> Vec<T> {
    T::free_list().with_borrow_mut(|free| {
        stock_list(free);
        let fit = free
            .iter()
            .enumerate()
            .filter(|(_, b)| b.capacity() >= capacity)
            .min_by_key(|(_, b)| b.capacity())
            .or_else(|| free.iter().enumerate().max_by_key(|(_, b)| b.capacity()))
            .map(|(i, _)| i);
        fit.map(|i| free.swap_remove(i)).unwrap_or_default()
    })
}

impl<T: Pooled> Drop for Scratch<T> {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        if buf.capacity() == 0 {
            return;
        }
        // `try_with`: the thread's pool may already be gone while the thread exits.
        let _ = T::free_list().try_with(|free| {
            if let Ok(mut free) = free.try_borrow_mut()
                && free.len() < KEPT
            {
                free.push(buf);
            }
        });
    }
}

impl<T: Pooled> Deref for Scratch<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        &self.buf[self.start..]
    }
}

impl<T: Pooled> DerefMut for Scratch<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.buf[self.start..]
    }
}

impl<'a, T: Pooled> IntoIterator for &'a Scratch<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl<'a, T: Pooled> IntoIterator for &'a mut Scratch<T> {
    type Item = &'a mut T;
    type IntoIter = std::slice::IterMut<'a, T>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter_mut()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_best_fit_and_zeroed_on_request() {
        // Its own thread: the pool is per thread.
        std::thread::spawn(|| {
            let large = {
                let mut a = zeroed::<f32>(10);
                let mut b = zeroed::<f32>(100_000);
                a.fill(1.0);
                b.fill(2.0);
                b.as_ptr() as usize
            };
            // A small request takes a small buffer (the pool's stock or the one returned),
            // never the large one, and zeroed means zeroed.
            let s = zeroed::<f32>(8);
            assert_ne!(s.as_ptr() as usize, large);
            assert!(s.iter().all(|&v| v == 0.0));
            let l = for_overwrite::<f32>(90_000);
            assert_eq!(l.as_ptr() as usize, large);
            assert_eq!(l.len(), 90_000);
            // Capacities come in size classes (less the padding before the aligned start).
            assert!((131_072 - 16..=131_072).contains(&l.capacity()));
            assert!((MIN_CAPACITY - 16..=MIN_CAPACITY).contains(&s.capacity()));
            // Every buffer starts on a cache line, whatever the allocator gave.
            for p in [l.as_ptr() as usize, s.as_ptr() as usize] {
                assert_eq!(p % ALIGN_BYTES, 0);
            }
            let odd = zeroed::<u16>(33);
            assert_eq!(odd.as_ptr() as usize % ALIGN_BYTES, 0);
            assert_eq!(odd.len(), 33);
            // Stale but initialised contents.
            assert!(l.iter().all(|&v| v == 2.0));
            let mut v = with_capacity::<usize>(5);
            v.extend([1, 2, 3]);
            v.push(4);
            assert_eq!(&v[..], &[1, 2, 3, 4]);
            assert_eq!(v.as_ptr() as usize % ALIGN_BYTES, 0);
            v.clear();
            assert!(v.is_empty() && v.capacity() >= 5);
        })
        .join()
        .unwrap();
    }
}
