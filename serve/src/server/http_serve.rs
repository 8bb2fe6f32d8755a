//! The HTTP/1.1 accept loop of both listeners: `axum::serve` with one addition, a deadline on
//! request heads.
//!
//! `axum::serve` gives hyper no timer, so hyper's header timeout never runs: a client that
//! trickles its request head one byte at a time, or connects and says nothing, holds its
//! connection (and a descriptor, and a place under the connection caps) for as long as it
//! likes. Here every connection is served by hyper's HTTP/1 server with a Tokio timer and
//! `header_read_timeout`: a request head must be complete within `http_header_timeout_ms` of
//! the moment the server starts waiting for it (the connection's start, or the previous
//! answer on a kept-alive connection), or the connection is closed. An upgraded WebSocket is
//! out of hyper's hands from the `101` on; its own deadline (`handshake_timeout_ms`, for
//! `Open`/`Resume`) takes over in `ws`.
//!
//! Graceful shutdown as `axum::serve` does it: stop accepting, ask every connection to finish
//! its request in flight and close, wait for them all.

use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::sync::watch;

use crate::ws::stopped;

/// Serves `app` on `listener` until `stop` turns `true`, then drains its connections.
pub(crate) async fn serve<L>(
    mut listener: L,
    app: Router,
    header_timeout: Duration,
    mut stop: watch::Receiver<bool>,
) where
    L: axum::serve::Listener,
{
    // Connections hold a receiver of `closing`: sending on it starts their graceful
    // shutdown, and `closing.closed()` resolves once every one of them is gone.
    let (closing, _) = watch::channel(false);
    loop {
        let (io, _peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stopped(&mut stop) => break,
        };
        let service = TowerToHyperService::new(app.clone());
        let mut close = closing.subscribe();
        tokio::spawn(async move {
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades();
            tokio::pin!(conn);
            let mut asked = false;
            loop {
                tokio::select! {
                    result = conn.as_mut() => {
                        if let Err(e) = result {
                            tracing::debug!(error = %e, "connection ended with an error");
                        }
                        break;
                    }
                    _ = stopped(&mut close), if !asked => {
                        asked = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
        });
    }
    drop(listener);
    let _ = closing.send(true);
    closing.closed().await;
}
