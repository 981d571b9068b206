//! The kernels' thread pool: persistent workers, pinned to cores (when the process owns
//! exactly that many), that spin briefly between jobs and then park. A decode step runs a few hundred small jobs (one per matrix product and
//! per attention / DeltaNet phase); waking a thread per job, or rayon's join tree, costs a
//! measurable share of a step, and rayon's injector allocates. Here a job is a borrowed closure
//! `f(task)` published through one atomic word, its tasks claimed one at a time by the calling
//! thread and the workers; nothing is allocated.
//!
//! The caller runs tasks too and returns only when every task has finished, so `f` may borrow
//! from the caller's stack. A job started from inside a task runs inline on that thread; jobs
//! from two outside threads take turns.

use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Spin this long for the next job before parking: longer than the gaps between the jobs of a
/// step, far shorter than the gaps between steps.
const SPIN: Duration = Duration::from_micros(200);
/// Tasks per published job (the claim word holds 16-bit counts); larger jobs go in rounds.
const MAX_TASKS: usize = u16::MAX as usize;

type Task<'a> = dyn Fn(usize) + Sync + 'a;

/// The claim word: `generation << 32 | tasks << 16 | next`.
fn pack(generation: u32, tasks: usize, next: usize) -> u64 {
    (generation as u64) << 32 | (tasks as u64) << 16 | next as u64
}

fn unpack(word: u64) -> (u32, usize, usize) {
    (
        (word >> 32) as u32,
        ((word >> 16) & 0xffff) as usize,
        (word & 0xffff) as usize,
    )
}

struct Shared {
    claim: AtomicU64,
    /// The current job: points at a `&Task` on the submitting thread's stack.
    job: AtomicPtr<()>,
    /// Tasks of the current job finished (by anyone).
    done: AtomicUsize,
    panicked: AtomicBool,
    sleepers: AtomicUsize,
    park: Mutex<()>,
    wake: Condvar,
    shutdown: AtomicBool,
}

pub struct KernelPool {
    shared: Arc<Shared>,
    /// Held by the outside thread whose job is running.
    submit: Mutex<u32>,
    threads: usize,
}

thread_local! {
    /// Set while this thread runs a task: nested jobs then run inline.
    static IN_TASK: Cell<bool> = const { Cell::new(false) };
}

impl KernelPool {
    /// Runs `f(0..tasks)` on the pool; returns when all have run.
    pub fn for_each(&self, tasks: usize, f: impl Fn(usize) + Sync) {
        self.run(tasks, &f)
    }

    /// `f(i, chunk)` for each `chunk`-sized piece of `data` (the last may be shorter), in
    /// parallel.
    pub fn for_each_chunk_mut<T: Send>(
        &self,
        data: &mut [T],
        chunk: usize,
        f: impl Fn(usize, &mut [T]) + Sync,
    ) {
        let chunk = chunk.max(1);
        let len = data.len();
        let base = SendPtr(data.as_mut_ptr());
        self.for_each(len.div_ceil(chunk), |i| {
            let start = i * chunk;
            let here = chunk.min(len - start);
            // SAFETY: task i is run exactly once per job, and chunks of distinct tasks are
            // disjoint pieces of `data`, which the caller lends mutably for the whole job.
            let piece = unsafe { std::slice::from_raw_parts_mut(base.get().add(start), here) };
            f(i, piece)
        })
    }

    /// As `for_each_chunk_mut`, over two slices cut into the same number of whole chunks (a
    /// remainder past the last whole chunk of either slice is not visited).
    pub fn for_each_chunk_pair_mut<A: Send, B: Send>(
        &self,
        a: &mut [A],
        a_chunk: usize,
        b: &mut [B],
        b_chunk: usize,
        f: impl Fn(usize, &mut [A], &mut [B]) + Sync,
    ) {
        let (a_chunk, b_chunk) = (a_chunk.max(1), b_chunk.max(1));
        let tasks = (a.len() / a_chunk).min(b.len() / b_chunk);
        let (pa, pb) = (SendPtr(a.as_mut_ptr()), SendPtr(b.as_mut_ptr()));
        self.for_each(tasks, |i| {
            // SAFETY: as in `for_each_chunk_mut`; `tasks` whole chunks fit in each slice.
            let (ca, cb) = unsafe {
                (
                    std::slice::from_raw_parts_mut(pa.get().add(i * a_chunk), a_chunk),
                    std::slice::from_raw_parts_mut(pb.get().add(i * b_chunk), b_chunk),
                )
            };
            f(i, ca, cb)
        })
    }

    /// `f(i, part)` for each part `bounds[i]..bounds[i + 1]` of `data`, in parallel. `bounds`
    /// must be non-decreasing and end within `data` (checked: parts must not overlap).
    pub fn for_each_span_mut<T: Send>(
        &self,
        data: &mut [T],
        bounds: &[usize],
        f: impl Fn(usize, &mut [T]) + Sync,
    ) {
        assert!(
            bounds.windows(2).all(|w| w[0] <= w[1])
                && bounds.last().is_none_or(|&e| e <= data.len()),
            "spans must be ordered and within the data"
        );
        let base = SendPtr(data.as_mut_ptr());
        self.for_each(bounds.len().saturating_sub(1), |i| {
            // SAFETY: ordered bounds within `data` (asserted) give disjoint parts, one per
            // task, each run once per job while the caller lends `data` mutably.
            let part = unsafe {
                std::slice::from_raw_parts_mut(base.get().add(bounds[i]), bounds[i + 1] - bounds[i])
            };
            f(i, part)
        })
    }
}

/// A pointer the tasks of one job share; each derives a disjoint piece from it.
struct SendPtr<T>(*mut T);

// SAFETY: used only to hand disjoint pieces of one mutable borrow to the tasks of a job.
unsafe impl<T: Send> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    fn get(&self) -> *mut T {
        self.0
    }
}

impl KernelPool {
    /// A pool of `threads` (the caller of `run` counts as one, so `threads - 1` are started).
    pub fn new(threads: usize) -> Self {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            claim: AtomicU64::new(pack(0, 0, 0)),
            job: AtomicPtr::new(std::ptr::null_mut()),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            park: Mutex::new(()),
            wake: Condvar::new(),
            shutdown: AtomicBool::new(false),
        });
        // Pinned only when the process owns exactly as many CPUs as it runs threads (the
        // whole machine, or an exclusive cpuset): on a shared node, pods pinning to the same
        // core numbers would pile onto the same cores.
        let cores = allowed_cores();
        let pin = cores.len() == threads;
        let started = Arc::new(AtomicUsize::new(0));
        let mut spawned_workers = 0;
        for w in 1..threads {
            let shared = shared.clone();
            // Worker w on the w-th allowed core; the caller usually runs on the first.
            let core = if pin { cores.get(w).copied() } else { None };
            let started = started.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("sluice-kernel-{w}"))
                .spawn(move || {
                    if let Some(core) = core {
                        pin_to(core);
                    }
                    super::scratch::stock_thread();
                    started.fetch_add(1, Ordering::Release);
                    worker(&shared)
                });
            if spawned.is_err() {
                // Fewer workers only means less parallelism: the caller runs what is left.
                break;
            }
            spawned_workers += 1;
        }
        // Workers are running (their start-up done) before the first job.
        while started.load(Ordering::Acquire) < spawned_workers {
            std::thread::yield_now();
        }
        KernelPool {
            shared,
            submit: Mutex::new(0),
            threads,
        }
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f(0..tasks)` on the pool and the calling thread; returns when all have run. A
    /// panic in a task is raised here once every task has finished.
    pub fn run(&self, tasks: usize, f: &Task<'_>) {
        if tasks == 0 {
            return;
        }
        if tasks == 1 || self.threads == 1 || IN_TASK.get() {
            run_inline(tasks, f);
            return;
        }
        let mut generation = self.submit.lock().unwrap_or_else(|e| e.into_inner());
        let mut first = 0;
        while first < tasks {
            let here = (tasks - first).min(MAX_TASKS);
            let offset = move |i: usize| f(first + i);
            *generation = generation.wrapping_add(1);
            self.run_round(*generation, here, &offset);
            first += here;
        }
    }

    fn run_round(&self, generation: u32, tasks: usize, f: &Task<'_>) {
        let s = &*self.shared;
        // Workers reach `f` through this slot, which outlives the round: this function returns
        // only after every task of the round has finished, and no worker runs a task of a
        // finished round (claims are checked against the generation).
        let slot: &Task<'_> = f;
        s.job
            .store(&slot as *const &Task<'_> as *mut (), Ordering::Relaxed);
        s.done.store(0, Ordering::Relaxed);
        s.panicked.store(false, Ordering::Relaxed);
        s.claim.store(pack(generation, tasks, 0), Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _guard = s.park.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        let mine = claim_and_run(s, generation, &slot);
        let mut spins = 0u32;
        while s.done.load(Ordering::Acquire) < tasks {
            // A worker descheduled mid-task (more threads than cores) gets the core back.
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1024) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        if let Err(panic) = mine {
            resume_unwind(panic);
        }
        if s.panicked.load(Ordering::Acquire) {
            panic!("a kernel task panicked on a pool thread");
        }
    }
}

impl Drop for KernelPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        let _guard = self.shared.park.lock().unwrap_or_else(|e| e.into_inner());
        self.shared.wake.notify_all();
    }
}

fn run_inline(tasks: usize, f: &Task<'_>) {
    let was = IN_TASK.replace(true);
    let out = catch_unwind(AssertUnwindSafe(|| (0..tasks).for_each(f)));
    IN_TASK.set(was);
    if let Err(panic) = out {
        resume_unwind(panic);
    }
}

/// Claims and runs tasks of round `generation` until none are left. A panicking task is
/// counted as finished and flagged; the first panic's payload is returned. `slot` is the
/// round's job slot (see `run_round`); it is read only after a claim succeeds.
fn claim_and_run(s: &Shared, generation: u32, slot: *const &Task<'_>) -> std::thread::Result<()> {
    let was = IN_TASK.replace(true);
    let mut first_panic = Ok(());
    let mut word = s.claim.load(Ordering::Acquire);
    loop {
        let (g, tasks, next) = unpack(word);
        if g != generation || next >= tasks {
            break;
        }
        match s
            .claim
            .compare_exchange_weak(word, word + 1, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => {
                // SAFETY: task `next` of round `generation` is claimed and not finished, so the
                // round's submitter is still waiting in `run_round` and its slot is live; a
                // slot read for another round would have failed the claim's generation check.
                let f: &Task<'_> = unsafe { *slot };
                if let Err(panic) = catch_unwind(AssertUnwindSafe(|| f(next))) {
                    s.panicked.store(true, Ordering::Release);
                    if first_panic.is_ok() {
                        first_panic = Err(panic);
                    }
                }
                s.done.fetch_add(1, Ordering::Release);
                word = s.claim.load(Ordering::Acquire);
            }
            Err(now) => word = now,
        }
    }
    IN_TASK.set(was);
    first_panic
}

fn worker(s: &Shared) {
    let mut seen = unpack(s.claim.load(Ordering::Acquire)).0;
    loop {
        let generation = match wait_for_job(s, seen) {
            Some(g) => g,
            None => return,
        };
        seen = generation;
        // Read after the claim word showed this generation (stored before it, Release/SeqCst):
        // this round's job, or a later one's — then the claims below fail on the generation.
        let slot = s.job.load(Ordering::Acquire) as *const &Task<'static>;
        // A panic here was flagged for the caller, who raises it.
        let _ = claim_and_run(s, generation, slot);
    }
}

/// Spins, then parks, until the claim word shows a generation other than `seen`; `None` on
/// shutdown.
fn wait_for_job(s: &Shared, seen: u32) -> Option<u32> {
    let start = Instant::now();
    let mut spins = 0u32;
    loop {
        let (g, _, _) = unpack(s.claim.load(Ordering::Acquire));
        if g != seen {
            return Some(g);
        }
        if s.shutdown.load(Ordering::Relaxed) {
            return None;
        }
        spins = spins.wrapping_add(1);
        if !spins.is_multiple_of(64) || start.elapsed() < SPIN {
            std::hint::spin_loop();
            continue;
        }
        let mut guard = s.park.lock().unwrap_or_else(|e| e.into_inner());
        s.sleepers.fetch_add(1, Ordering::SeqCst);
        loop {
            let (g, _, _) = unpack(s.claim.load(Ordering::SeqCst));
            if g != seen || s.shutdown.load(Ordering::SeqCst) {
                break;
            }
            guard = s.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
        }
        s.sleepers.fetch_sub(1, Ordering::SeqCst);
        drop(guard);
        if s.shutdown.load(Ordering::SeqCst) {
            return None;
        }
    }
}

/// The CPUs this process may run on, in order.
fn allowed_cores() -> Vec<usize> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity fills it.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0 {
                return (0..libc::CPU_SETSIZE as usize)
                    .filter(|&c| libc::CPU_ISSET(c, &set))
                    .collect();
            }
        }
    }
    Vec::new()
}

/// Pins the calling thread to `core` (best effort: a refusal leaves it unpinned).
fn pin_to(core: usize) {
    #[cfg(target_os = "linux")]
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET stays within it (core is one
    // of the allowed CPUs, below CPU_SETSIZE).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = core;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn every_task_runs_exactly_once_across_many_jobs() {
        let pool = KernelPool::new(3);
        for tasks in [1, 2, 3, 7, 64, 1000] {
            for _ in 0..50 {
                let hits: Vec<AtomicU32> = (0..tasks).map(|_| AtomicU32::new(0)).collect();
                pool.run(tasks, &|i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(
                    hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                    "{tasks}"
                );
            }
        }
    }

    #[test]
    fn jobs_larger_than_one_round_and_nested_jobs_complete() {
        let pool = KernelPool::new(2);
        let n = MAX_TASKS * 2 + 5;
        let sum = AtomicU64::new(0);
        pool.run(n, &|i| {
            sum.fetch_add(i as u64, Ordering::Relaxed);
        });
        assert_eq!(sum.load(Ordering::Relaxed), (n as u64 * (n as u64 - 1)) / 2);
        // A job started inside a task runs inline, not deadlocking on the pool.
        let inner = AtomicU64::new(0);
        pool.run(4, &|_| {
            pool.run(3, &|j| {
                inner.fetch_add(j as u64 + 1, Ordering::Relaxed);
            })
        });
        assert_eq!(inner.load(Ordering::Relaxed), 4 * 6);
    }

    #[test]
    fn workers_park_and_wake_and_outside_threads_take_turns() {
        let pool = Arc::new(KernelPool::new(2));
        pool.run(8, &|_| {});
        // Long enough for the worker to park.
        std::thread::sleep(SPIN * 20);
        let count = Arc::new(AtomicU64::new(0));
        let callers: Vec<_> = (0..3)
            .map(|_| {
                let (pool, count) = (pool.clone(), count.clone());
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        pool.run(5, &|_| {
                            count.fetch_add(1, Ordering::Relaxed);
                        });
                    }
                })
            })
            .collect();
        for c in callers {
            c.join().unwrap();
        }
        assert_eq!(count.load(Ordering::Relaxed), 3 * 200 * 5);
    }

    #[test]
    fn a_panicking_task_is_raised_after_the_others_finish() {
        let pool = KernelPool::new(2);
        let finished = AtomicU64::new(0);
        let out = catch_unwind(AssertUnwindSafe(|| {
            pool.run(16, &|i| {
                if i == 5 {
                    panic!("task 5");
                }
                finished.fetch_add(1, Ordering::Relaxed);
            })
        }));
        assert!(out.is_err());
        assert_eq!(finished.load(Ordering::Relaxed), 15);
        // The pool still works.
        let again = AtomicU64::new(0);
        pool.run(16, &|_| {
            again.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(again.load(Ordering::Relaxed), 16);
    }

    #[test]
    fn chunk_helpers_hand_out_disjoint_pieces() {
        let pool = KernelPool::new(2);
        let mut data: Vec<usize> = vec![0; 103];
        pool.for_each_chunk_mut(&mut data, 10, |i, c| c.iter_mut().for_each(|v| *v += i + 1));
        for (k, v) in data.iter().enumerate() {
            assert_eq!(*v, k / 10 + 1);
        }
        let (mut a, mut b) = (vec![0u32; 12], vec![0u8; 8]);
        pool.for_each_chunk_pair_mut(&mut a, 3, &mut b, 2, |i, ca, cb| {
            ca.fill(i as u32);
            cb.fill(i as u8);
        });
        assert_eq!(a, [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]);
        assert_eq!(b, [0, 0, 1, 1, 2, 2, 3, 3]);
    }
}
