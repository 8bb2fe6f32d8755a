//! A small fork-join pool for the matmuls: the calling thread plus one helper per other
//! core, handed work through atomics.
//!
//! Why not rayon: a forward pass calls the matmul a few hundred times per step, each call
//! a fraction of a millisecond. Called from outside its pool, rayon queues the job, wakes a
//! worker, and parks the caller; with two cores the second worker was often still asleep
//! when the first had finished its half, so it ran the other half too — one core's worth of
//! throughput with hand-off costs on top (measured: a matmul split in two ran slower than on
//! one thread). Here a call is cut into more parts than threads and every participant —
//! the caller first — claims parts from one counter until none are left, so a helper that
//! wakes late simply takes fewer (and one that wakes after every part is taken is let off:
//! the caller does not wait for its wake-up); each helper spins for a short while after its last part
//! (a forward pass calls again within microseconds) before it parks, and nothing is queued.
//!
//! One call at a time uses the helpers; a call that finds them busy (two engines in one
//! process, tests in parallel) runs all its parts on its own thread.
//!
//! A part may panic: the call still waits for every helper that took the job before it
//! unwinds (the job borrows the caller's stack), and then re-raises the first panic on the
//! caller's thread. The helpers survive and serve the next call.

use std::any::Any;
use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// How long a helper spins for new work before it parks. Short: other pools (rayon, used by
/// attention) need the cores between two matmuls.
const SPIN: Duration = Duration::from_micros(50);

/// A call: `f(part)` for every part claimed from the counter, borrowed for its duration.
#[derive(Clone, Copy)]
struct Job {
    f: *const (dyn Fn(usize) + Sync),
    next: *const AtomicUsize,
    parts: usize,
}

impl Job {
    /// Claims and runs parts until none are left.
    ///
    /// # Safety
    /// `f` and `next` must be alive.
    unsafe fn drain(self) {
        loop {
            // SAFETY: the caller's promise.
            let part = unsafe { (*self.next).fetch_add(1, Ordering::Relaxed) };
            if part >= self.parts {
                return;
            }
            // SAFETY: as above.
            unsafe { (*self.f)(part) };
        }
    }
}

struct Slot {
    /// Bumped by the caller for each part handed out.
    posted: AtomicUsize,
    /// Set to `posted` by the helper when that part is done.
    done: AtomicUsize,
    /// The last ticket resolved: claimed by the helper (which then runs the job) or cancelled
    /// by the caller (who found every part taken before the helper woke up). Each ticket
    /// goes from `ticket - 1` to `ticket` by one compare-exchange, so exactly one side wins.
    claimed: AtomicUsize,
    /// Set by the helper before it parks, cleared when it wakes.
    parked: AtomicBool,
    /// Set when the team is dropped: the helper ends at its next post.
    stop: AtomicBool,
    /// The call: written by the caller before `posted` is bumped, read by the helper after.
    job: UnsafeCell<Option<Job>>,
    /// A panic raised by a part this helper ran, stored before `done` and taken by the
    /// caller after it sees `done`.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

// SAFETY: `job` is written only while the helper does not read it: every earlier ticket was
// either run to `done` or cancelled (and a cancelled ticket's job is never read), and the new
// job is published to the helper by the release store of `posted`; see `Team::run`.
unsafe impl Sync for Slot {}
// SAFETY: as above; the job pointer is only dereferenced while the caller keeps it alive.
unsafe impl Send for Slot {}

struct Helper {
    slot: Arc<Slot>,
    thread: Thread,
    handle: Option<std::thread::JoinHandle<()>>,
}

pub struct Team {
    helpers: Vec<Helper>,
    busy: Mutex<()>,
}

impl Team {
    /// The process's team: one helper per available core beyond the first, or
    /// `TANDEM_MATMUL_THREADS - 1` helpers when that variable is set to a positive number.
    pub fn global() -> &'static Team {
        static TEAM: OnceLock<Team> = OnceLock::new();
        TEAM.get_or_init(|| {
            let threads = std::env::var("TANDEM_MATMUL_THREADS")
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .filter(|&n| n > 0)
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            Team::new(threads - 1)
        })
    }

    /// A team of its own with `threads` threads in all (the caller and `threads - 1`
    /// helpers, at least 0), for callers that must control the thread count (tests).
    pub fn with_threads(threads: usize) -> Self {
        Self::new(threads.saturating_sub(1))
    }

    fn new(helpers: usize) -> Self {
        let helpers = (0..helpers)
            .map(|i| {
                let slot = Arc::new(Slot {
                    posted: AtomicUsize::new(0),
                    done: AtomicUsize::new(0),
                    claimed: AtomicUsize::new(0),
                    parked: AtomicBool::new(false),
                    stop: AtomicBool::new(false),
                    job: UnsafeCell::new(None),
                    panic: Mutex::new(None),
                });
                let theirs = Arc::clone(&slot);
                let handle = std::thread::Builder::new()
                    .name(format!("tandem-matmul-{i}"))
                    .spawn(move || helper_loop(&theirs))
                    .expect("spawning a matmul helper thread");
                Helper {
                    slot,
                    thread: handle.thread().clone(),
                    handle: Some(handle),
                }
            })
            .collect();
        Self {
            helpers,
            busy: Mutex::new(()),
        }
    }

    /// Threads that run a call's parts: the caller and the helpers.
    pub fn threads(&self) -> usize {
        self.helpers.len() + 1
    }

    /// Runs `f(0)`, …, `f(parts - 1)`, each once, on the caller and the helpers, and returns
    /// when all are done. When the helpers are busy with another caller's call, this caller
    /// runs every part itself.
    pub fn run(&self, parts: usize, f: &(dyn Fn(usize) + Sync)) {
        let guard = match self.busy.try_lock() {
            Ok(guard) if parts > 1 && !self.helpers.is_empty() => guard,
            _ => {
                (0..parts).for_each(f);
                return;
            }
        };
        let next = AtomicUsize::new(0);
        // SAFETY: the lifetime is erased only for the duration of this call: every helper
        // that receives the job is waited for below, before `f` and `next` go out of scope.
        let job = Job {
            f: unsafe {
                std::mem::transmute::<&(dyn Fn(usize) + Sync), *const (dyn Fn(usize) + Sync)>(f)
            },
            next: &next,
            parts,
        };
        let handed = (parts - 1).min(self.helpers.len());
        for h in &self.helpers[..handed] {
            let slot = &h.slot;
            let ticket = slot.posted.load(Ordering::Relaxed) + 1;
            // SAFETY: the helper does not read `job` now (its last ticket is done or was
            // cancelled, and we hold `busy`), nor before the store below publishes it.
            unsafe { *slot.job.get() = Some(job) };
            // SeqCst, as `parked` below: with the helper's store of `parked` and load of
            // `posted`, at least one side sees the other (otherwise a post can be missed by
            // a helper going to sleep, and the caller waits forever).
            slot.posted.store(ticket, Ordering::SeqCst);
            if slot.parked.load(Ordering::SeqCst) {
                h.thread.unpark();
            }
        }
        // A panic here must not unwind past the helpers that still use `f` and `next`: catch
        // it, wait for them, then raise it again.
        let mine = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // SAFETY: `f` and `next` live until the end of this function.
            unsafe { job.drain() }
        }));
        let mut first_panic = mine.err();
        for h in &self.helpers[..handed] {
            let want = h.slot.posted.load(Ordering::Relaxed);
            // A helper that has not claimed the call yet (still waking up) is let off: every
            // part is taken, and waiting for it would put its wake-up on the critical path.
            let cancelled = h
                .slot
                .claimed
                .compare_exchange(want - 1, want, Ordering::AcqRel, Ordering::Acquire)
                .is_ok();
            if cancelled {
                continue;
            }
            while h.slot.done.load(Ordering::Acquire) != want {
                std::hint::spin_loop();
            }
            let theirs = h
                .slot
                .panic
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            if first_panic.is_none() {
                first_panic = theirs;
            }
        }
        drop(guard);
        if let Some(payload) = first_panic {
            std::panic::resume_unwind(payload);
        }
    }

    /// `f(i, chunk)` for each consecutive `chunk`-long piece of `data` (the last may be
    /// shorter), spread over the team.
    pub(crate) fn for_chunks<T: Send>(
        &self,
        data: &mut [T],
        chunk: usize,
        f: &(dyn Fn(usize, &mut [T]) + Sync),
    ) {
        let chunk = chunk.max(1);
        let (len, base) = (data.len(), SendPtr(data.as_mut_ptr()));
        self.run(len.div_ceil(chunk), &|i| {
            let start = i * chunk;
            let n = chunk.min(len - start);
            // SAFETY: the pieces are disjoint and inside `data`, which is borrowed mutably
            // for the whole call; each piece is handed to exactly one part.
            let piece = unsafe { std::slice::from_raw_parts_mut(base.get().add(start), n) };
            f(i, piece);
        });
    }
}

impl Drop for Team {
    /// Ends the helpers (a team of one's own, as in tests; the global team lives forever).
    fn drop(&mut self) {
        for h in &mut self.helpers {
            h.slot.stop.store(true, Ordering::SeqCst);
            h.slot.posted.fetch_add(1, Ordering::SeqCst);
            h.thread.unpark();
            // No call is in flight (`run` borrows the team), so the helper is idle and
            // returns at once.
            if let Some(t) = h.handle.take() {
                let _ = t.join();
            }
        }
    }
}

struct SendPtr<T>(*mut T);
impl<T> Clone for SendPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SendPtr<T> {}
// SAFETY: used only to hand disjoint pieces of one slice to the team's threads.
unsafe impl<T: Send> Sync for SendPtr<T> {}
unsafe impl<T: Send> Send for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The pointer (a method, so that closures capture the wrapper, not the field).
    fn get(self) -> *mut T {
        self.0
    }
}

fn helper_loop(slot: &Slot) {
    let mut seen = 0;
    loop {
        let mut since = Instant::now();
        let mut spins = 0u32;
        let ticket = loop {
            let posted = slot.posted.load(Ordering::Acquire);
            if posted != seen {
                break posted;
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(64) {
                std::hint::spin_loop();
                continue;
            }
            if since.elapsed() < SPIN {
                continue;
            }
            // Park; the caller unparks after posting if it sees `parked`. The flag is set
            // before the re-check, so a post between the two is seen either here or there.
            slot.parked.store(true, Ordering::SeqCst);
            if slot.posted.load(Ordering::SeqCst) == seen {
                std::thread::park();
            }
            slot.parked.store(false, Ordering::SeqCst);
            since = Instant::now();
        };
        if slot.stop.load(Ordering::Acquire) {
            return;
        }
        seen = ticket;
        // Claim the call, unless the caller finished every part and cancelled it first.
        if slot
            .claimed
            .compare_exchange(ticket - 1, ticket, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            continue;
        }
        // SAFETY: published by the caller's store of `posted`, which we acquired.
        let job = unsafe { *slot.job.get() };
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // SAFETY: the caller keeps the job alive until it sees `done == ticket`.
            if let Some(job) = job {
                unsafe { job.drain() }
            }
        }));
        if let Err(payload) = ran {
            // The caller re-raises it once every helper is done with the job.
            *slot.panic.lock().unwrap_or_else(|e| e.into_inner()) = Some(payload);
        }
        slot.done.store(ticket, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn every_part_runs_exactly_once() {
        let team = Team::new(2);
        for parts in [0, 1, 2, 3, 7] {
            for _ in 0..200 {
                let hits: Vec<AtomicU64> = (0..parts).map(|_| AtomicU64::new(0)).collect();
                team.run(parts, &|p| {
                    hits[p].fetch_add(1, Ordering::Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
            }
        }
    }

    #[test]
    fn chunks_cover_the_slice_once_with_their_indices() {
        let team = Team::new(1);
        for (len, chunk) in [(0, 3), (1, 3), (10, 3), (12, 3), (1000, 7)] {
            let mut data = vec![0usize; len];
            team.for_chunks(&mut data, chunk, &|i, piece| {
                piece.iter_mut().for_each(|v| *v += i + 1);
            });
            let want: Vec<usize> = (0..len).map(|j| j / chunk + 1).collect();
            assert_eq!(data, want, "len {len} chunk {chunk}");
        }
    }

    #[test]
    fn parked_helpers_wake_up_and_concurrent_callers_both_finish() {
        let team = Arc::new(Team::new(1));
        std::thread::sleep(SPIN * 5); // the helper has parked by now
        let sum = AtomicU64::new(0);
        team.run(2, &|p| {
            sum.fetch_add(p as u64 + 1, Ordering::Relaxed);
        });
        assert_eq!(sum.load(Ordering::Relaxed), 3);
        let callers: Vec<_> = (0..4)
            .map(|_| {
                let team = Arc::clone(&team);
                std::thread::spawn(move || {
                    let sum = AtomicU64::new(0);
                    for _ in 0..500 {
                        team.run(2, &|p| {
                            sum.fetch_add(p as u64 + 1, Ordering::Relaxed);
                        });
                    }
                    sum.load(Ordering::Relaxed)
                })
            })
            .collect();
        for c in callers {
            assert_eq!(c.join().expect("test setup"), 1500);
        }
    }

    #[test]
    fn calls_that_finish_before_a_helper_wakes_run_every_part_once() {
        // Between calls the helper parks; the caller often takes every part before it wakes
        // and lets it off. Tiny calls make that the common case, longer ones the rare case;
        // either way every part runs once, and the next call works.
        let team = Team::new(1);
        let calls = AtomicU64::new(0);
        for i in 0..300u64 {
            if i % 10 == 0 {
                std::thread::sleep(SPIN * 2);
            }
            let hits: Vec<AtomicU64> = (0..3).map(|_| AtomicU64::new(0)).collect();
            team.run(3, &|p| {
                if i % 7 == 0 {
                    std::thread::sleep(Duration::from_micros(200));
                }
                hits[p].fetch_add(1, Ordering::Relaxed);
            });
            assert!(
                hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                "call {i}"
            );
            calls.fetch_add(1, Ordering::Relaxed);
        }
        assert_eq!(calls.load(Ordering::Relaxed), 300);
    }

    #[test]
    fn a_panicking_part_reaches_the_caller_after_every_helper_is_done() {
        let team = Team::new(2);
        for bad in [0usize, 3, 7] {
            let running = AtomicU64::new(0);
            let finished = AtomicU64::new(0);
            let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                team.run(8, &|p| {
                    running.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_micros(300));
                    if p == bad {
                        panic!("part {p} failed");
                    }
                    finished.fetch_add(1, Ordering::SeqCst);
                });
            }));
            let payload = caught.expect_err("the panic reaches the caller");
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .unwrap_or_default();
            assert_eq!(msg, format!("part {bad} failed"));
            // Every part that started had ended (or panicked) before `run` returned: nothing
            // still runs on the borrowed closure, and nothing starts later. (Parts left
            // unclaimed when the caller's own part panicked may not run: the call failed.)
            let (r, f) = (
                running.load(Ordering::SeqCst),
                finished.load(Ordering::SeqCst),
            );
            assert_eq!(r, f + 1, "a part still ran after the call returned");
            std::thread::sleep(Duration::from_millis(5));
            assert_eq!(
                running.load(Ordering::SeqCst),
                r,
                "a part started after the call"
            );
        }
        // The helpers survived and serve the next call.
        let hits: Vec<AtomicU64> = (0..6).map(|_| AtomicU64::new(0)).collect();
        team.run(6, &|p| {
            hits[p].fetch_add(1, Ordering::Relaxed);
        });
        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
    }

    #[test]
    fn dropping_a_team_ends_its_helpers() {
        // `drop` joins the helpers: a helper that did not end would hang this test.
        for i in 0..20 {
            let team = Team::with_threads(3);
            assert_eq!(team.threads(), 3);
            if i % 2 == 0 {
                std::thread::sleep(SPIN * 3); // parked helpers, then spinning ones
            }
            let sum = AtomicU64::new(0);
            team.run(6, &|p| {
                sum.fetch_add(p as u64, Ordering::Relaxed);
            });
            assert_eq!(sum.load(Ordering::Relaxed), 15);
            drop(team);
        }
        assert_eq!(Team::with_threads(0).threads(), 1, "the caller always runs");
    }
}
