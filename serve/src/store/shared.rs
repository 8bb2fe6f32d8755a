//! Pieces both stores (sessions, and the REST tenants in `crate::rest::store`) use: the
//! 32-byte SHA-256 digest that stands in for a secret, and the Redis connection set-up.

use std::time::Duration;

use std::future::Future;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, RedisError, RedisResult, ServerErrorKind};

/// The SHA-256 of a secret (a resume token, an API key): what the stores keep instead of it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct SecretDigest(pub(crate) [u8; 32]);

impl SecretDigest {
    /// Whether the two digests are equal, in time that does not depend on where they differ.
    pub(crate) fn matches(&self, other: &SecretDigest) -> bool {
        use subtle::ConstantTimeEq;
        self.0.ct_eq(&other.0).into()
    }

    pub(crate) fn to_hex(self) -> String {
        hex::encode(self.0)
    }

    pub(crate) fn from_hex(s: &str) -> Option<Self> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(Self(out))
    }
}

/// A lazily connecting manager for `url` and the server's address (for logs), with few,
/// short reconnect retries: a failed reconnect ends quickly and the next call starts a new
/// one, so recovery follows Redis's return within about a second. The error text never
/// quotes the URL: it may hold a password.
pub(crate) fn redis_manager(
    url: &str,
    op_timeout: Duration,
) -> Result<(ConnectionManager, String), String> {
    let client =
        redis::Client::open(url).map_err(|e| format!("bad redis url: {}", e.category()))?;
    let addr = client.get_connection_info().addr().to_string();
    let manager_config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(op_timeout))
        .set_response_timeout(Some(op_timeout))
        .set_number_of_retries(2)
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_millis(500));
    let conn = ConnectionManager::new_lazy_with_config(client, manager_config)
        .map_err(|e| format!("redis client: {e}"))?;
    Ok((conn, addr))
}

/// How a failed Redis call reads to a store: retry later, data it did not write, or a
/// refused command. Each store maps it onto its own error type.
#[derive(Debug)]
pub(crate) enum RedisFailure {
    Unavailable(String),
    Corrupt(String),
    Backend(String),
}

/// Runs one Redis call under `timeout`, records its latency and outcome in the process's
/// Redis metrics, and classifies a failure. `addr` (`host:port`, never the URL, which may
/// hold a password) goes into the messages.
pub(crate) async fn bounded_call<T>(
    addr: &str,
    timeout: Duration,
    call: impl Future<Output = RedisResult<T>>,
) -> Result<T, RedisFailure> {
    use tracing::Instrument as _;
    let started = std::time::Instant::now();
    let span = tracing::info_span!(
        "redis",
        otel.kind = "client",
        db.system = "redis",
        server.address = %addr,
        error.type = tracing::field::Empty,
    );
    let call = call.instrument(span.clone());
    let timed_out = || {
        RedisFailure::Unavailable(format!(
            "redis at {addr} did not answer within {} ms",
            timeout.as_millis()
        ))
    };
    let result = match tokio::time::timeout(timeout, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) if e.is_timeout() => Err(timed_out()),
        Ok(Err(e)) => Err(classify(addr, e)),
        Err(_) => Err(timed_out()),
    };
    crate::metrics::record_redis(started.elapsed(), result.is_err());
    if let Err(f) = &result {
        span.record(
            "error.type",
            match f {
                RedisFailure::Unavailable(_) => "unavailable",
                RedisFailure::Corrupt(_) => "corrupt",
                RedisFailure::Backend(_) => "backend",
            },
        );
    }
    result
}

fn classify(addr: &str, e: RedisError) -> RedisFailure {
    let transient = e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || matches!(
            e.kind(),
            ErrorKind::Server(
                ServerErrorKind::BusyLoading
                    | ServerErrorKind::TryAgain
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::ClusterDown
            )
        );
    if transient {
        RedisFailure::Unavailable(format!("redis at {addr}: {e}"))
    } else if e.kind() == ErrorKind::UnexpectedReturnType || e.kind() == ErrorKind::Parse {
        RedisFailure::Corrupt(e.to_string())
    } else {
        RedisFailure::Backend(format!("redis at {addr}: {e}"))
    }
}
