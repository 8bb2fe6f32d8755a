//! Live counters of a run, sampled once a second into the report's timeline and the
//! progress line on stderr.
//!
//! Device tasks bump relaxed atomics (one per token, a few per generation); the sampler
//! only reads them, so nothing locks. The line overwrites itself on a terminal and is a
//! plain line per second otherwise (logs, CI).

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::timing::round3;

/// Counters shared by every device task.
#[derive(Debug, Default)]
pub struct Live {
    /// Generations in progress.
    active: AtomicU64,
    started: AtomicU64,
    completed: AtomicU64,
    failed: AtomicU64,
    /// `Token` frames received.
    tokens: AtomicU64,
    reconnects: AtomicU64,
    resumes: AtomicU64,
    replays: AtomicU64,
    lost: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub active: u64,
    pub started: u64,
    pub completed: u64,
    pub failed: u64,
    pub tokens: u64,
    /// Reconnection attempts, resumes with the state kept, sessions rebuilt by replay, and
    /// generations lost after every attempt.
    pub reconnects: u64,
    pub resumes: u64,
    pub replays: u64,
    pub lost: u64,
}

impl Live {
    pub fn generation_started(&self) {
        self.started.fetch_add(1, Ordering::Relaxed);
        self.active.fetch_add(1, Ordering::Relaxed);
    }

    pub fn generation_ended(&self, ok: bool) {
        self.active.fetch_sub(1, Ordering::Relaxed);
        let counter = if ok { &self.completed } else { &self.failed };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn token(&self) {
        self.tokens.fetch_add(1, Ordering::Relaxed);
    }

    pub fn reconnect(&self) {
        self.reconnects.fetch_add(1, Ordering::Relaxed);
    }

    pub fn resume(&self) {
        self.resumes.fetch_add(1, Ordering::Relaxed);
    }

    pub fn replay(&self) {
        self.replays.fetch_add(1, Ordering::Relaxed);
    }

    pub fn lost(&self) {
        self.lost.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            active: self.active.load(Ordering::Relaxed),
            started: self.started.load(Ordering::Relaxed),
            completed: self.completed.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            tokens: self.tokens.load(Ordering::Relaxed),
            reconnects: self.reconnects.load(Ordering::Relaxed),
            resumes: self.resumes.load(Ordering::Relaxed),
            replays: self.replays.load(Ordering::Relaxed),
            lost: self.lost.load(Ordering::Relaxed),
        }
    }
}

/// The progress line for `now` (elapsed `t`), given the previous snapshot a second earlier.
/// Reconnections, resumes, replays and lost generations are shown once there are any.
pub fn progress_line(t: Duration, now: Snapshot, prev: Snapshot, dt: Duration) -> String {
    let secs = t.as_secs_f64().max(1e-9);
    let recent = now.tokens.saturating_sub(prev.tokens) as f64 / dt.as_secs_f64().max(1e-9);
    let mut line = format!(
        "[{:>5.0}s] active {}  done {}  errors {}  output {:.1} tok/s (avg {:.1})",
        t.as_secs_f64(),
        now.active,
        now.completed,
        now.failed,
        recent,
        now.tokens as f64 / secs,
    );
    if now.reconnects > 0 || now.lost > 0 {
        line.push_str(&format!(
            "  reconnects {}  resumed {}  replayed {}  lost {}",
            now.reconnects, now.resumes, now.replays, now.lost
        ));
    }
    line
}

/// The counters at one second of the run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TimelineSample {
    /// Seconds since the start.
    pub t_s: f64,
    /// Generations in progress.
    pub active: u64,
    /// Completed and failed generations so far.
    pub completed: u64,
    pub failed: u64,
    /// `Token` frames received so far.
    pub output_tokens: u64,
    /// `Token` frames per second since the previous sample.
    pub output_tokens_per_s: f64,
}

/// How often the sampler reads the counters.
#[derive(Clone, Copy, Debug)]
pub struct Sampling {
    pub period: Duration,
    /// Print the progress line on stderr at each sample.
    pub print: bool,
}

/// Samples the counters every `how.period` until `stop` fires or is dropped; returns the
/// samples.
pub async fn sample(
    live: Arc<Live>,
    start: Instant,
    how: Sampling,
    mut stop: oneshot::Receiver<()>,
) -> Vec<TimelineSample> {
    let (tty, print) = (std::io::stderr().is_terminal(), how.print);
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::from_std(start) + how.period,
        how.period,
    );
    let (mut prev, mut prev_at) = (Snapshot::default(), start);
    let mut timeline = Vec::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut stop => break,
        }
        let (now, at) = (live.snapshot(), Instant::now());
        let dt = (at - prev_at).as_secs_f64().max(1e-9);
        timeline.push(TimelineSample {
            t_s: round3((at - start).as_secs_f64()),
            active: now.active,
            completed: now.completed,
            failed: now.failed,
            output_tokens: now.tokens,
            output_tokens_per_s: round3(now.tokens.saturating_sub(prev.tokens) as f64 / dt),
        });
        if print {
            let line = progress_line(at - start, now, prev, at - prev_at);
            let mut err = std::io::stderr().lock();
            let _ = if tty {
                write!(err, "\r{line}\x1b[K")
            } else {
                writeln!(err, "{line}")
            };
            let _ = err.flush();
        }
        (prev, prev_at) = (now, at);
    }
    if print && tty {
        eprintln!();
    }
    timeline
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_formats() {
        let live = Live::default();
        live.generation_started();
        live.generation_started();
        live.generation_ended(true);
        (0..30).for_each(|_| live.token());
        let s = live.snapshot();
        assert_eq!(
            s,
            Snapshot {
                active: 1,
                started: 2,
                completed: 1,
                failed: 0,
                tokens: 30,
                ..Snapshot::default()
            }
        );
        let prev = Snapshot {
            tokens: 10,
            ..Snapshot::default()
        };
        let line = progress_line(Duration::from_secs(3), s, prev, Duration::from_secs(1));
        assert_eq!(
            line,
            "[    3s] active 1  done 1  errors 0  output 20.0 tok/s (avg 10.0)"
        );
        live.reconnect();
        live.reconnect();
        live.resume();
        live.lost();
        let line = progress_line(
            Duration::from_secs(3),
            live.snapshot(),
            prev,
            Duration::from_secs(1),
        );
        assert!(
            line.ends_with("reconnects 2  resumed 1  replayed 0  lost 1"),
            "{line}"
        );
    }

    #[tokio::test]
    async fn samples_every_period_until_stopped() {
        let live = Arc::new(Live::default());
        let (stop_tx, stop_rx) = oneshot::channel();
        let start = Instant::now();
        let how = Sampling {
            period: Duration::from_millis(100),
            print: false,
        };
        let sampler = tokio::spawn(sample(live.clone(), start, how, stop_rx));
        live.generation_started();
        (0..5).for_each(|_| live.token());
        tokio::time::sleep(Duration::from_millis(150)).await;
        (0..3).for_each(|_| live.token());
        // At least one tick comes after the last tokens, however late the timer runs.
        tokio::time::sleep(Duration::from_millis(350)).await;
        stop_tx.send(()).expect("stop");
        let timeline = sampler.await.expect("join");
        assert!(timeline.len() >= 2, "{timeline:?}");
        let last = timeline.last().expect("last");
        assert_eq!((last.output_tokens, last.active), (8, 1));
        assert!(timeline.windows(2).all(|w| w[0].t_s <= w[1].t_s));
        // Each sample's rate covers the time since the previous one (the start for the first).
        let mut prev_t = 0.0;
        let total: f64 = timeline
            .iter()
            .map(|s| {
                let n = s.output_tokens_per_s * (s.t_s - prev_t);
                prev_t = s.t_s;
                n
            })
            .sum();
        assert!((total - 8.0).abs() < 0.1, "{timeline:?}");
    }
}
