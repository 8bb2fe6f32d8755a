//! The Redis connection every Redis-backed store shares, and the one way a store calls it.
//!
//! [`RedisConn`] is one lazily connecting [`ConnectionManager`] (a multiplexed connection
//! that reconnects itself) with one timeout: [`Stores::open`](crate::Stores::open) makes one
//! and hands clones to the session store, the tenant store and the saved opens. Clones share
//! the connection. Every store call goes through `bounded_call`: a timeout, a `redis` span,
//! a report to the process's call observer ([`set_call_observer`]: the server's Redis
//! metrics), and a `RedisFailure` that each store maps onto its own error type.

use std::future::Future;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, RedisError, RedisResult, ServerErrorKind};

/// What `bounded_call` reports after every call: its duration and whether it failed.
pub type CallObserver = fn(Duration, bool);

static OBSERVER: OnceLock<CallObserver> = OnceLock::new();

/// Registers the function told about every Redis call of every store in this process (the
/// server's `tandem_redis_*` metrics). The first registration wins; later ones are ignored,
/// so a process that starts several servers registers the same function each time harmlessly.
/// Until one is registered, calls are not reported.
pub fn set_call_observer(observer: CallObserver) {
    let _ = OBSERVER.set(observer);
}

/// One Redis connection with its timeout and the server's address (for messages). Cheap to
/// clone: clones share the connection.
#[derive(Clone)]
pub struct RedisConn {
    manager: ConnectionManager,
    /// `host:port` only, for error messages (the URL may hold a password).
    addr: String,
    op_timeout: Duration,
}

impl std::fmt::Debug for RedisConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConn")
            .field("addr", &self.addr)
            .field("op_timeout", &self.op_timeout)
            .finish_non_exhaustive()
    }
}

impl RedisConn {
    /// A lazily connecting manager for `url`, with few, short reconnect retries: a failed
    /// reconnect ends quickly and the next call starts a new one, so recovery follows Redis's
    /// return within about a second. Connects on the first call, so this fails only for a
    /// malformed URL; the error text never quotes the URL (it may hold a password).
    pub fn open(url: &str, op_timeout: Duration) -> Result<Self, String> {
        let client =
            redis::Client::open(url).map_err(|e| format!("bad redis url: {}", e.category()))?;
        let addr = client.get_connection_info().addr().to_string();
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(op_timeout))
            .set_response_timeout(Some(op_timeout))
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500));
        let manager = ConnectionManager::new_lazy_with_config(client, manager_config)
            .map_err(|e| format!("redis client: {e}"))?;
        Ok(Self {
            manager,
            addr,
            op_timeout,
        })
    }

    /// A handle to the shared connection, for one call.
    pub(crate) fn manager(&self) -> ConnectionManager {
        self.manager.clone()
    }

    /// The most one call may take, connecting included.
    pub(crate) fn op_timeout(&self) -> Duration {
        self.op_timeout
    }

    /// Runs one call through `bounded_call` with this connection's address and timeout.
    pub(crate) async fn bounded<T>(
        &self,
        call: impl Future<Output = RedisResult<T>>,
    ) -> Result<T, RedisFailure> {
        bounded_call(&self.addr, self.op_timeout, call).await
    }

    /// `PING`, bounded: whether Redis answers now.
    pub(crate) async fn ping(&self) -> Result<(), RedisFailure> {
        let mut conn = self.manager();
        self.bounded(async move { redis::cmd("PING").query_async::<String>(&mut conn).await })
            .await
            .map(drop)
    }
}

/// How a failed Redis call reads to a store: retry later, data it did not write, or a
/// refused command. Each store maps it onto its own error type.
#[derive(Debug)]
pub(crate) enum RedisFailure {
    Unavailable(String),
    Corrupt(String),
    Backend(String),
}

/// Runs one Redis call under `timeout`, reports its latency and outcome to the call observer,
/// and classifies a failure. `addr` (`host:port`, never the URL, which may hold a password)
/// goes into the messages.
async fn bounded_call<T>(
    addr: &str,
    timeout: Duration,
    call: impl Future<Output = RedisResult<T>>,
) -> Result<T, RedisFailure> {
    use tracing::Instrument as _;
    let started = Instant::now();
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
    if let Some(observe) = OBSERVER.get() {
        observe(started.elapsed(), result.is_err());
    }
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
