//! The host backend's workers: threads that stay alive between ops and wait for the next
//! one by spinning for a while before they sleep. A decode step hands them about a hundred
//! short jobs (tens of microseconds each); waking a sleeping thread through the kernel for
//! each one cost about a sixth of the step (measured with rayon's pool, which yields and
//! then sleeps), so workers spin first, as llama.cpp's do.

use std::prelude::v1::*;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

/// A job's parts as the workers see it: a type-erased borrow of the caller's closure.
/// The caller waits until every claimed part has finished before the borrow ends (see
/// [`Pool::run`]), and a part can be claimed only while its job is current: a worker takes
/// parts only of the job whose number it read with the job, and claims them through a
/// cursor carrying that number.
#[derive(Clone, Copy)]
struct Job {
    epoch: u64,
    f: *const (dyn Fn(usize) + Sync + 'static),
    parts: usize,
}

// SAFETY: the closure behind `f` is `Sync` and outlives every use (see `Job`).
#[allow(unsafe_code)]
unsafe impl Send for Job {}

struct Shared {
    /// (job number << 32) | next part to claim: claiming checks the job number, so a late
    /// worker cannot take a part of a newer job with an older job's closure.
    cursor: AtomicU64,
    job: Mutex<Option<Job>>,
    /// Parts of the current job not yet finished.
    remaining: AtomicUsize,
    /// A panic from a part, re-raised on the caller.
    panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
    sleeping: Mutex<usize>,
    wake: Condvar,
    stop: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Spins before a worker sleeps: about 50-100 microseconds on current processors, longer
/// than the gap between a decode step's products.
const SPINS: u32 = 1 << 15;

impl Shared {
    /// Claims and runs parts of `job` until none is left.
    fn work(&self, job: Job) {
        loop {
            let c = self.cursor.load(Ordering::Acquire);
            let i = (c & 0xFFFF_FFFF) as usize;
            if c >> 32 != job.epoch || i >= job.parts {
                return;
            }
            if self
                .cursor
                .compare_exchange_weak(c, c + 1, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                continue;
            }
            // SAFETY: part i of the current job was claimed above, so the caller is still
            // inside `run`, waiting for `remaining` to reach zero, and the closure lives.
            #[allow(unsafe_code)]
            let f = unsafe { &*job.f };
            if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(i))) {
                lock(&self.panic).get_or_insert(p);
            }
            self.remaining.fetch_sub(1, Ordering::AcqRel);
        }
    }

    fn worker(&self) {
        let mut seen = 0u64;
        loop {
            let mut spins = 0u32;
            let epoch = loop {
                let e = self.cursor.load(Ordering::Acquire) >> 32;
                if e != seen || self.stop.load(Ordering::Acquire) {
                    break e;
                }
                if spins < SPINS {
                    spins += 1;
                    std::hint::spin_loop();
                    continue;
                }
                let mut sleeping = lock(&self.sleeping);
                *sleeping += 1;
                while self.cursor.load(Ordering::Acquire) >> 32 == seen
                    && !self.stop.load(Ordering::Acquire)
                {
                    sleeping = self.wake.wait(sleeping).unwrap_or_else(|e| e.into_inner());
                }
                *sleeping -= 1;
            };
            if self.stop.load(Ordering::Acquire) {
                return;
            }
            seen = epoch;
            // The job read here may already be a newer one than the number seen (published
            // between the two reads) or an older one: only the matching one is worked on,
            // else the next loop sees the newer number.
            if let Some(job) = *lock(&self.job)
                && job.epoch == epoch
            {
                self.work(job);
            }
        }
    }
}

/// A fixed set of worker threads.
pub(crate) struct Pool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// One caller at a time (a `Host` may be shared between threads).
    caller: Mutex<()>,
}

impl core::fmt::Debug for Pool {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Pool({} workers)", self.workers.len())
    }
}

impl Pool {
    /// `workers` threads, or `None` if the system refuses one.
    pub(crate) fn new(workers: usize) -> Option<Pool> {
        let shared = Arc::new(Shared {
            cursor: AtomicU64::new(0),
            job: Mutex::new(None),
            remaining: AtomicUsize::new(0),
            panic: Mutex::new(None),
            sleeping: Mutex::new(0),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let mut pool = Pool {
            shared,
            workers: Vec::with_capacity(workers),
            caller: Mutex::new(()),
        };
        for i in 0..workers {
            let s = Arc::clone(&pool.shared);
            let handle = std::thread::Builder::new()
                .name(format!("edgetune-host-{i}"))
                .spawn(move || s.worker())
                .ok()?;
            pool.workers.push(handle);
        }
        Some(pool)
    }

    /// Runs `f(0..parts)`, the calling thread taking parts too, and returns when all have
    /// finished; a panic in a part is re-raised here after the others finish.
    pub(crate) fn run(&self, parts: usize, f: &(dyn Fn(usize) + Sync)) {
        // The cursor counts parts in 32 bits; one part needs no workers.
        if parts <= 1 || parts > u32::MAX as usize {
            (0..parts).for_each(f);
            return;
        }
        let _one_caller = lock(&self.caller);
        let s = &*self.shared;
        // SAFETY: the lifetime is erased only for the workers' copy; this function does not
        // return before `remaining` is zero, i.e. before every claimed part has returned,
        // and the job number in `cursor` keeps a late worker from claiming a part after.
        #[allow(unsafe_code)]
        let erased: *const (dyn Fn(usize) + Sync + 'static) = unsafe {
            core::mem::transmute::<
                *const (dyn Fn(usize) + Sync + '_),
                *const (dyn Fn(usize) + Sync + 'static),
            >(f)
        };
        let epoch = (s.cursor.load(Ordering::Acquire) >> 32) + 1;
        let job = Job {
            epoch,
            f: erased,
            parts,
        };
        *lock(&s.job) = Some(job);
        s.remaining.store(parts, Ordering::Release);
        s.cursor.store(epoch << 32, Ordering::Release);
        if *lock(&s.sleeping) > 0 {
            let _guard = lock(&s.sleeping);
            s.wake.notify_all();
        }
        s.work(job);
        while s.remaining.load(Ordering::Acquire) > 0 {
            std::hint::spin_loop();
        }
        *lock(&s.job) = None;
        if let Some(p) = lock(&s.panic).take() {
            std::panic::resume_unwind(p);
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        {
            let _guard = lock(&self.shared.sleeping);
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_part_runs_once_per_job() {
        let pool = Pool::new(3).unwrap();
        for parts in [0, 1, 2, 7, 64] {
            for _ in 0..200 {
                let hits: Vec<AtomicUsize> = (0..parts).map(|_| AtomicUsize::new(0)).collect();
                pool.run(parts, &|i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
            }
        }
    }

    #[test]
    fn jobs_of_changing_size_never_share_parts() {
        // More workers than this machine's cores, and every job a different size from the
        // last: a late worker must not run a part of a newer job with an older claim.
        let pool = Pool::new(4).unwrap();
        for round in 0..3000usize {
            let parts = 2 + (round * 7) % 13;
            let hits: Vec<AtomicUsize> = (0..parts).map(|_| AtomicUsize::new(0)).collect();
            pool.run(parts, &|i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(
                hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                "round {round}"
            );
        }
    }

    #[test]
    fn a_panic_in_a_part_reaches_the_caller_and_the_pool_goes_on() {
        let pool = Pool::new(2).unwrap();
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.run(8, &|i| assert!(i != 5, "part five"));
        }));
        assert!(caught.is_err());
        let count = AtomicUsize::new(0);
        pool.run(8, &|_| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 8);
    }

    #[test]
    fn workers_that_slept_wake_for_the_next_job() {
        let pool = Pool::new(2).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        let count = AtomicUsize::new(0);
        pool.run(16, &|_| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 16);
    }
}
