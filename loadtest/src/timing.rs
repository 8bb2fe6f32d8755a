//! The simulated devices' timing: connection and silence timeouts, the reconnection backoff,
//! and the rounding the reports use. A leaf module: settings (`config`) and the devices
//! (`device`) both read it, and it reads neither.

use std::time::Duration;

/// Longest wait for the TCP + WebSocket handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default of the silence timeout: a server silent this long while the device waits for it
/// counts as a lost connection (see [`crate::device`], *Silence*).
pub const DEFAULT_SILENCE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long to wait for `Done` after a token that looks final.
pub const FINAL_TOKEN_GRACE: Duration = Duration::from_secs(2);
/// First reconnection delay; it doubles per failed attempt up to [`BACKOFF_MAX`].
pub const BACKOFF_INITIAL: Duration = Duration::from_millis(250);
pub const BACKOFF_MAX: Duration = Duration::from_secs(4);

/// The delay before reconnection attempt `attempt` (0-based) of an outage:
/// `min(BACKOFF_MAX, BACKOFF_INITIAL × 2^attempt)`, less up to a quarter at random (`jitter`
/// in `[0, 1)`), so thousands of devices cut at once do not come back at once. The device
/// library's [`tandem_edge::ReconnectPolicy`] with these settings.
pub fn backoff(attempt: u32, jitter: f64) -> Duration {
    let policy = tandem_edge::ReconnectPolicy {
        initial_delay: BACKOFF_INITIAL,
        max_delay: BACKOFF_MAX,
        multiplier: 2.0,
        jitter: 0.25,
        ..tandem_edge::ReconnectPolicy::default()
    };
    policy.delay_at(attempt, jitter)
}

/// Rounds to 3 decimals (milliseconds to microseconds in the reports); non-finite values
/// become 0.
pub fn round3(v: f64) -> f64 {
    if v.is_finite() {
        (v * 1000.0).round() / 1000.0
    } else {
        0.0
    }
}
