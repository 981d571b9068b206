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

/// A buffer from this thread's pool, returned to it on drop. Derefs to `Vec<T>`.
pub struct Scratch<T: Pooled> {
    buf: Vec<T>,
}

/// `len` zeros.
pub fn zeroed<T: Pooled>(len: usize) -> Scratch<T> {
    let mut buf = take::<T>(len);
    buf.clear();
    buf.resize(len, T::default());
    Scratch { buf }
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
    let mut buf = take::<T>(len);
    if buf.len() >= len {
        buf.truncate(len);
    } else {
        buf.resize(len, T::default());
    }
    Scratch { buf }
}

/// An empty buffer with room for `capacity` elements.
pub fn with_capacity<T: Pooled>(capacity: usize) -> Scratch<T> {
    let mut buf = take::<T>(capacity);
    buf.clear();
    Scratch { buf }
}

/// A buffer with room for `capacity`: the smallest pooled one that holds it, else the largest
/// grown to the size class, else a new one. Best fit keeps a small request from taking the
/// buffer a large one needs.
fn take<T: Pooled>(capacity: usize) -> Vec<T> {
    let mut buf = pick::<T>(capacity);
    if buf.capacity() < capacity {
        let class = size_class(capacity);
        buf.reserve_exact(class - buf.len());
    }
    buf
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
    type Target = Vec<T>;

    fn deref(&self) -> &Vec<T> {
        &self.buf
    }
}

impl<T: Pooled> DerefMut for Scratch<T> {
    fn deref_mut(&mut self) -> &mut Vec<T> {
        &mut self.buf
    }
}

impl<'a, T: Pooled> IntoIterator for &'a Scratch<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;

    fn into_iter(self) -> Self::IntoIter {
        self.buf.iter()
    }
}

impl<'a, T: Pooled> IntoIterator for &'a mut Scratch<T> {
    type Item = &'a mut T;
    type IntoIter = std::slice::IterMut<'a, T>;

    fn into_iter(self) -> Self::IntoIter {
        self.buf.iter_mut()
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
            // Capacities come in size classes.
            assert_eq!(l.capacity(), 131_072);
            assert_eq!(s.capacity(), MIN_CAPACITY);
            // Stale but initialised contents.
            assert!(l.iter().all(|&v| v == 2.0));
            let mut v = with_capacity::<usize>(5);
            v.extend([1, 2, 3]);
            assert_eq!(&v[..], &[1, 2, 3]);
        })
        .join()
        .unwrap();
    }
}
