//! Where to connect and how long to keep trying: [`ServerList`] and [`ReconnectPolicy`].
//!
//! One WebSocket carries one session (docs/protocol.md §1), so the client connects once per
//! generation and again after every drop. The server list is shared and can be changed while
//! a generation runs (a load balancer, or a test, tells the device about a new replica);
//! each connection attempt takes the next URL in turn. The delay between attempts grows
//! exponentially with random jitter, so thousands of devices that lost the same replica do
//! not come back in lock-step.

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The WebSocket URLs (`ws://HOST:PORT/v1/edge/ws`) of the replicas a device may use.
///
/// Cloning shares the list: [`ServerList::set`] on one clone is seen by every generation
/// that holds another. A std `RwLock` is enough: it is held only to copy one string, never
/// across an `.await`.
#[derive(Clone, Debug)]
pub struct ServerList(Arc<RwLock<Vec<String>>>);

impl ServerList {
    pub fn new(urls: Vec<String>) -> Self {
        Self(Arc::new(RwLock::new(urls)))
    }

    /// A list of one URL.
    pub fn single(url: impl Into<String>) -> Self {
        Self::new(vec![url.into()])
    }

    /// Replaces the URLs; the next connection attempt uses the new list.
    pub fn set(&self, urls: Vec<String>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = urls;
    }

    /// The URL for the `attempt`-th connection (round robin), if the list is not empty.
    pub fn pick(&self, attempt: usize) -> Option<String> {
        let urls = self.0.read().unwrap_or_else(|e| e.into_inner());
        (!urls.is_empty()).then(|| urls[attempt % urls.len()].clone())
    }

    pub fn urls(&self) -> Vec<String> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl From<&str> for ServerList {
    fn from(url: &str) -> Self {
        Self::single(url)
    }
}

/// How the client reconnects after a dropped connection or a `3xx` error.
///
/// The `n`-th retry of one outage waits `min(max_delay, initial_delay × multiplier^n)`, less
/// a random fraction (up to `jitter`) of it. An outage ends with an error after
/// `max_attempts` failed attempts or `max_elapsed`, whichever comes first; it is over when
/// a connection makes progress again (a new token or the end).
#[derive(Clone, Debug, PartialEq)]
pub struct ReconnectPolicy {
    pub initial_delay: Duration,
    pub max_delay: Duration,
    pub multiplier: f64,
    /// In `[0, 1]`: the largest fraction of a delay taken off at random.
    pub jitter: f64,
    pub max_attempts: u32,
    pub max_elapsed: Duration,
}

impl Default for ReconnectPolicy {
    fn default() -> Self {
        Self {
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
            multiplier: 2.0,
            jitter: 0.5,
            max_attempts: 12,
            max_elapsed: Duration::from_secs(60),
        }
    }
}

impl ReconnectPolicy {
    /// Never reconnect: a dropped connection ends the generation with an error.
    pub fn never() -> Self {
        Self {
            max_attempts: 0,
            ..Self::default()
        }
    }

    /// The delay before retry number `attempt` (0-based) of an outage, with jitter from
    /// `rng`.
    pub(crate) fn delay(&self, attempt: u32, rng: &mut Jitter) -> Duration {
        self.delay_at(attempt, rng.unit())
    }

    /// The delay before retry number `attempt` (0-based) of an outage, given a uniform draw
    /// `unit` in `[0, 1)` for the jitter: `min(max_delay, initial_delay × multiplier^attempt)`
    /// less `jitter × unit` of it. The one backoff of the project (the load generator's
    /// simulated devices use it too).
    pub fn delay_at(&self, attempt: u32, unit: f64) -> Duration {
        let exponent = attempt.min(64) as i32;
        let base = self.initial_delay.as_secs_f64() * self.multiplier.max(1.0).powi(exponent);
        let capped = base.min(self.max_delay.as_secs_f64());
        let cut = self.jitter.clamp(0.0, 1.0) * unit.clamp(0.0, 1.0);
        Duration::from_secs_f64((capped * (1.0 - cut)).max(0.0))
    }
}

/// A small xorshift generator for backoff jitter (no need for a crypto RNG, or a dependency).
#[derive(Debug)]
pub(crate) struct Jitter(u64);

impl Jitter {
    pub(crate) fn new() -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let local = 0u8;
        let addr = &local as *const u8 as u64;
        Self((nanos ^ addr.rotate_left(32)) | 1)
    }

    /// Uniform in `[0, 1)`.
    pub(crate) fn unit(&mut self) -> f64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_cap_and_jitter_down() {
        let p = ReconnectPolicy::default();
        let mut rng = Jitter::new();
        for attempt in 0..20 {
            let d = p.delay(attempt, &mut rng);
            let full = (0.1 * 2f64.powi(attempt as i32)).min(5.0);
            assert!(d.as_secs_f64() <= full + 1e-9, "attempt {attempt}: {d:?}");
            assert!(
                d.as_secs_f64() >= full * 0.5 - 1e-9,
                "attempt {attempt}: {d:?}"
            );
        }
        let no_jitter = ReconnectPolicy { jitter: 0.0, ..p };
        assert_eq!(no_jitter.delay(3, &mut rng), Duration::from_millis(800));
        assert_eq!(no_jitter.delay(30, &mut rng), Duration::from_secs(5));
    }

    #[test]
    fn server_list_round_robins_and_updates() {
        let list = ServerList::new(vec!["a".into(), "b".into()]);
        let shared = list.clone();
        assert_eq!(list.pick(0).as_deref(), Some("a"));
        assert_eq!(list.pick(3).as_deref(), Some("b"));
        shared.set(vec!["c".into()]);
        assert_eq!(list.pick(1).as_deref(), Some("c"));
        shared.set(vec![]);
        assert_eq!(list.pick(0), None);
    }
}
