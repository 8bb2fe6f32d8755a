//! CPU time of this process's threads, by what they do (Linux `/proc`; nothing elsewhere).
//!
//! The serving overhead that issue 7 bounds ("scheduler + transport under 3% of step time")
//! lives on different threads from the model's compute: the WebSocket and REST tasks run on
//! the async runtime's workers, the scheduler on the engine thread between steps, the matmul
//! on the engine thread and its team. Wall-clock spans on the engine thread cover the
//! engine's part ([`tandem_engine::EngineStats::bookkeeping_s`]); this module covers the rest
//! by reading each thread's CPU time and grouping threads by name:
//!
//! | group | threads |
//! |---|---|
//! | `engine` | `tandem-engine` (steps, scheduling, command handling) |
//! | `matmul` | `tandem-matmul-*` (the engine's compute team) |
//! | `io` | `tandem-io`, and tokio's default names (sockets, frames, session actors, REST) |
//! | `other` | everything else (the main thread, blocking pools, exporters) |
//!
//! CPU time comes from `/proc/self/task/*/schedstat` (nanoseconds on a CPU), or from the
//! `utime + stime` of `/proc/self/task/*/stat` (clock ticks) where schedstat is missing.
//! Threads come and go (the runtime's blocking pool lets idle threads exit), so each read
//! remembers the threads it saw: a thread that has exited keeps counting with the time the
//! last read saw, and the totals never go down.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{LazyLock, Mutex};

/// The thread groups, in exposition order.
pub const GROUPS: [&str; 4] = ["engine", "matmul", "io", "other"];

/// The group of a thread named `comm` (as `/proc` shows it: at most 15 bytes).
pub fn group_of(comm: &str) -> &'static str {
    if comm == "tandem-engine" {
        "engine"
    } else if comm.starts_with("tandem-matmul") {
        "matmul"
    } else if ["tandem-io", "tokio-rt-worker", "tokio-runtime-w"]
        .iter()
        .any(|p| comm.starts_with(p))
    {
        "io"
    } else {
        "other"
    }
}

/// Seconds on a CPU from a `schedstat` line (`run_ns wait_ns slices`).
fn schedstat_seconds(line: &str) -> Option<f64> {
    let ns: u64 = line.split_whitespace().next()?.parse().ok()?;
    Some(ns as f64 * 1e-9)
}

/// Seconds of `utime + stime` from a `stat` line, at `hz` ticks per second. The command name
/// in parentheses may hold spaces and parentheses itself, so fields are counted after the
/// last `)`: `state` is the first, `utime` the 12th, `stime` the 13th.
fn stat_seconds(line: &str, hz: f64) -> Option<f64> {
    let rest = &line[line.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / hz)
}

/// Ticks per second of `/proc`'s `stat` times: `USER_HZ`, 100 on every Linux ABI in use.
const USER_HZ: f64 = 100.0;

/// One thread's CPU seconds, read from its `/proc/self/task/<tid>` directory.
fn task_seconds(dir: &Path) -> Option<f64> {
    if let Ok(s) = std::fs::read_to_string(dir.join("schedstat")) {
        if let Some(v) = schedstat_seconds(&s) {
            return Some(v);
        }
    }
    stat_seconds(&std::fs::read_to_string(dir.join("stat")).ok()?, USER_HZ)
}

/// This process's live threads: id, name and CPU seconds so far; `None` where
/// `/proc/self/task` cannot be read (not Linux).
fn threads() -> Option<Vec<(u64, String, f64)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let Some(tid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let dir = entry.path();
        // A thread may exit between the listing and the reads: skip it.
        let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else {
            continue;
        };
        if let Some(secs) = task_seconds(&dir) {
            out.push((tid, comm.trim_end().to_owned(), secs));
        }
    }
    Some(out)
}

/// Threads seen by earlier reads: their group and CPU seconds then, and the seconds of
/// those that have exited since, per group. Exited threads' time stays in the totals, so
/// they never go down (a thread's time after the last read before it exited is lost).
#[derive(Default)]
struct Seen {
    live: HashMap<u64, (usize, f64)>,
    retired: [f64; 4],
}

/// One read: every thread of `now` (tid, group index, seconds) is recorded, threads of the
/// last read that are gone (or whose tid now holds a thread with less time: reused) retire
/// with their last seconds; returns the totals per group.
fn account(seen: &mut Seen, now: &[(u64, usize, f64)]) -> [f64; 4] {
    let mut next = HashMap::with_capacity(now.len());
    for &(tid, group, secs) in now {
        if let Some(&(g, last)) = seen.live.get(&tid) {
            if g != group || secs < last {
                seen.retired[g] += last;
            }
        }
        seen.live.remove(&tid);
        next.insert(tid, (group, secs));
    }
    for (_, (g, last)) in seen.live.drain() {
        seen.retired[g] += last;
    }
    seen.live = next;
    let mut out = seen.retired;
    for &(_, group, secs) in now {
        out[group] += secs;
    }
    out
}

/// CPU seconds used so far by this process's threads, per group of [`GROUPS`], exited
/// threads included as of the last read that saw them (reads are serialized); `None` where
/// `/proc/self/task` cannot be read (not Linux).
pub fn cpu_seconds_by_group() -> Option<[f64; 4]> {
    static SEEN: LazyLock<Mutex<Seen>> = LazyLock::new(Mutex::default);
    let now: Vec<(u64, usize, f64)> = threads()?
        .into_iter()
        .filter_map(|(tid, comm, secs)| {
            let g = group_of(&comm);
            Some((tid, GROUPS.iter().position(|&x| x == g)?, secs))
        })
        .collect();
    let mut seen = SEEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    Some(account(&mut seen, &now))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_are_grouped_by_name() {
        assert_eq!(group_of("tandem-engine"), "engine");
        assert_eq!(group_of("tandem-matmul-0"), "matmul");
        assert_eq!(group_of("tandem-io"), "io");
        assert_eq!(group_of("tokio-runtime-w"), "io");
        assert_eq!(group_of("tokio-rt-worker"), "io");
        assert_eq!(group_of("tandem"), "other");
        assert_eq!(group_of("tandem-engine2"), "other");
    }

    #[test]
    fn stat_lines_are_read_past_odd_command_names() {
        // Fields after the name: state ppid pgrp session tty tpgid flags minflt cminflt
        // majflt cmajflt utime stime ...
        let line = "4242 (a) b (c)) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 1 0";
        assert_eq!(stat_seconds(line, 100.0), Some(3.0));
        assert_eq!(stat_seconds("4242 (x) S 1 2", 100.0), None);
        assert_eq!(schedstat_seconds("1500000000 20 3\n"), Some(1.5));
        assert_eq!(schedstat_seconds("garbage"), None);
    }

    #[test]
    fn a_busy_thread_is_listed_with_its_cpu_time() {
        if threads().is_none() {
            return; // no /proc here: nothing to read
        }
        // Spin on a thread with a name of its own until it has used 50 ms of CPU by its own
        // clock, then list the threads while it is still alive. (Group sums are not compared
        // before and after: other tests' threads come and go meanwhile.)
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let (spun_tx, spun_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::Builder::new()
            .name("tandem-matmul-Z".into())
            .spawn(move || {
                let start = cpu_time_of_this_thread();
                let mut x = 0u64;
                while cpu_time_of_this_thread() - start < 0.05 {
                    for i in 0..10_000u64 {
                        x = x.wrapping_mul(31).wrapping_add(i);
                    }
                    std::hint::black_box(x);
                }
                let _ = spun_tx.send(());
                let _ = done_rx.recv();
            })
            .expect("spawn");
        spun_rx.recv().expect("the spinner reports");
        let listed = threads().expect("listed");
        let by_group = cpu_seconds_by_group().expect("grouped");
        let _ = done_tx.send(());
        t.join().expect("join");
        let spun = listed
            .iter()
            .find(|(_, name, _)| name == "tandem-matmul-Z")
            .map(|&(_, _, secs)| secs)
            .expect("the spinning thread is listed");
        assert!(spun >= 0.05, "{spun} s");
        assert_eq!(group_of("tandem-matmul-Z"), "matmul");
        assert!(by_group.iter().all(|&s| s >= 0.0) && by_group[1] >= 0.05);
    }

    #[test]
    fn exited_and_reused_threads_keep_their_time() {
        let mut seen = Seen::default();
        // Two io threads and a matmul thread.
        assert_eq!(
            account(&mut seen, &[(1, 2, 1.0), (2, 2, 2.0), (3, 1, 5.0)]),
            [0.0, 5.0, 3.0, 0.0]
        );
        // Thread 2 exits; thread 1 runs on.
        assert_eq!(
            account(&mut seen, &[(1, 2, 1.5), (3, 1, 6.0)]),
            [0.0, 6.0, 3.5, 0.0]
        );
        // Thread 1's id is reused by a new thread with less time, in another group.
        assert_eq!(
            account(&mut seen, &[(1, 3, 0.25), (3, 1, 6.0)]),
            [0.0, 6.0, 3.5, 0.25]
        );
        // Same group, less time: also a new thread.
        assert_eq!(
            account(&mut seen, &[(1, 3, 0.1), (3, 1, 6.0)]),
            [0.0, 6.0, 3.5, 0.35]
        );
    }

    /// This thread's CPU seconds, from the same files.
    fn cpu_time_of_this_thread() -> f64 {
        let tid = std::fs::read_link("/proc/thread-self")
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .expect("/proc/thread-self");
        task_seconds(&Path::new("/proc/self/task").join(tid)).expect("own times")
    }
}
