//! How the engine is sized, and the waits it paces itself by.

use std::time::Duration;

use candle_core::DType;
use tandem_kvcache::KvDtype;
use tandem_scheduler::SchedulerConfig;

/// How the engine is sized.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub scheduler: SchedulerConfig,
    pub block_size: usize,
    pub kv_blocks: usize,
    pub kv_dtype: KvDtype,
    /// Share the KV of full blocks whose incoming hidden states are byte-identical between
    /// sessions (a common system prompt sent as its own chunk), through a hash chain.
    pub prefix_sharing: bool,
    /// The longest the engine waits, after a step, for the next inputs of devices that
    /// answered within this time before (decode-maximal batches), unless the step's fitted
    /// fixed cost is longer: then up to that, at most 100 ms (see `wait_cap`). Zero: never
    /// wait.
    pub decode_wait: Duration,
    /// The most drafts the engine asks a device for per decode input (speculation; 0: none,
    /// and drafts a device sends anyway are still computed exactly).
    pub max_draft_tokens: u8,
}

/// The most a step's fitted fixed cost adds to [`EngineConfig::decode_wait`] (see
/// [`wait_cap`]): about a CPU step's fixed cost on a small model; a longer wait would cost
/// the waiting rows more time than it saves.
pub(crate) const MAX_FIXED_COST_WAIT: Duration = Duration::from_millis(100);

/// How long, at most, the engine waits for the devices it just sent a token to: the
/// configured `decode_wait`, or the step's fixed cost `a` from the fitted step time `a +
/// r · rows` when that is longer (up to [`MAX_FIXED_COST_WAIT`]); zero when `decode_wait` is
/// zero (waiting switched off).
///
/// Why the fixed cost: a step started without a device's row occupies the engine for at
/// least `a`, so that row waits about as long anyway, and then costs another step's `a` of
/// its own. Waiting up to `a` for devices that answered within `a` last time therefore
/// costs the rows already present at most one fixed cost, and saves a whole step for the
/// others. On a CPU the fixed cost (streaming every weight once) is tens of milliseconds,
/// and devices whose answers take a few milliseconds (their edge layer, the network) were
/// otherwise never waited for: their rows trickled in and the engine ran steps of 1–5 rows.
pub(crate) fn wait_cap(decode_wait: Duration, fit: Option<(f64, f64)>) -> Duration {
    if decode_wait.is_zero() {
        return Duration::ZERO;
    }
    let fixed = fit
        .map(|(a, _)| a)
        .filter(|a| a.is_finite() && *a > 0.0)
        .map_or(Duration::ZERO, |a| {
            Duration::from_secs_f64(a.min(MAX_FIXED_COST_WAIT.as_secs_f64()))
        });
    decode_wait.max(fixed)
}

/// How often the engine schedules again while work waits for KV blocks.
pub(crate) const BLOCKED_POLL: Duration = Duration::from_millis(20);

/// The default [`EngineConfig::decode_wait`]: long enough for a device on a local network to
/// answer, short against a CPU step.
pub const DEFAULT_DECODE_WAIT: Duration = Duration::from_millis(5);

/// The default [`EngineConfig::max_draft_tokens`] (protocol cap: `MAX_DRAFTS`).
pub const MAX_DRAFT_CAP: u8 = 8;

/// The KV cache's dtype for weights of `dtype`: the same (bf16 keys and values halve the
/// cache's memory and the attention's reads; scores and sums stay f32).
pub fn kv_dtype_for(dtype: DType) -> KvDtype {
    match dtype {
        DType::BF16 => KvDtype::BF16,
        DType::F16 => KvDtype::F16,
        _ => KvDtype::F32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wait_cap_is_the_configured_wait_or_the_fixed_cost_when_longer() {
        let ms = Duration::from_millis;
        // Zero switches waiting off, whatever the fit.
        assert_eq!(
            wait_cap(Duration::ZERO, Some((0.050, 0.002))),
            Duration::ZERO
        );
        // No fit yet, or a fixed cost below the configured wait: the configured wait.
        assert_eq!(wait_cap(ms(5), None), ms(5));
        assert_eq!(wait_cap(ms(5), Some((0.001, 0.002))), ms(5));
        // A CPU step's fixed cost of 40 ms: wait up to that.
        assert_eq!(wait_cap(ms(5), Some((0.040, 0.002))), ms(40));
        // Capped at 100 ms, and nonsense fits are ignored.
        assert_eq!(wait_cap(ms(5), Some((3.0, 0.002))), MAX_FIXED_COST_WAIT);
        assert_eq!(wait_cap(ms(5), Some((f64::NAN, 0.002))), ms(5));
        assert_eq!(wait_cap(ms(5), Some((-0.2, 0.002))), ms(5));
        // A configured wait above the cap stays as configured.
        assert_eq!(wait_cap(ms(300), Some((0.040, 0.002))), ms(300));
    }
}
