//! Caps on the public listener's open connections: per source address and in total.
//!
//! A connection over either cap is closed as soon as it is accepted, before a byte is read
//! (before any TLS handshake), so that one address holding many idle or trickling
//! connections cannot take every descriptor and starve other devices and `/healthz`. The
//! count of a connection ends when its stream is dropped, whatever ended it. IPv4-mapped IPv6
//! peers count as their IPv4 address.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// How many connections may be open at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnLimits {
    pub per_ip: usize,
    pub total: usize,
}

#[derive(Debug)]
struct Counts {
    limits: ConnLimits,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

impl Counts {
    /// Takes a slot for `ip`, or `None` when a cap is reached.
    fn take(self: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        let mut open = self
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (total, per_ip) = &mut *open;
        let mine = per_ip.entry(ip).or_insert(0);
        if *total >= self.limits.total || *mine >= self.limits.per_ip {
            if *mine == 0 {
                per_ip.remove(&ip);
            }
            return None;
        }
        *mine += 1;
        *total += 1;
        Some(Slot {
            counts: self.clone(),
            ip,
        })
    }

    fn give_back(&self, ip: IpAddr) {
        let mut open = self
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (total, per_ip) = &mut *open;
        *total = total.saturating_sub(1);
        if let Some(n) = per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&ip);
            }
        }
    }
}

/// One open connection's place in the counts; given back on drop.
#[derive(Debug)]
struct Slot {
    counts: Arc<Counts>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.counts.give_back(self.ip);
    }
}

/// A TCP listener that closes connections over the caps at once.
#[derive(Debug)]
pub struct CappedListener {
    tcp: TcpListener,
    counts: Arc<Counts>,
}

impl CappedListener {
    pub fn new(tcp: TcpListener, limits: ConnLimits) -> Self {
        Self {
            tcp,
            counts: Arc::new(Counts {
                limits,
                open: Mutex::new((0, HashMap::new())),
            }),
        }
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// The next connection within the caps.
    pub async fn accept(&mut self) -> (Counted<TcpStream>, SocketAddr) {
        loop {
            let (stream, peer) = match self.tcp.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors and the like: wait a little, as axum does.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            match self.counts.take(peer.ip().to_canonical()) {
                Some(slot) => {
                    let _ = stream.set_nodelay(true);
                    return (
                        Counted {
                            inner: stream,
                            _slot: slot,
                        },
                        peer,
                    );
                }
                None => {
                    tracing::debug!(%peer, "connection over the caps; closed");
                    drop(stream);
                }
            }
        }
    }
}

impl axum::serve::Listener for CappedListener {
    type Io = Counted<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        CappedListener::accept(self).await
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        CappedListener::local_addr(self)
    }
}

/// A stream that holds its connection's place in the counts while it lives.
#[derive(Debug)]
pub struct Counted<S> {
    inner: S,
    _slot: Slot,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_per_address_and_in_total_and_slots_come_back() {
        let counts = Arc::new(Counts {
            limits: ConnLimits {
                per_ip: 2,
                total: 3,
            },
            open: Mutex::new((0, HashMap::new())),
        });
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        let a1 = counts.take(a).expect("first");
        let _a2 = counts.take(a).expect("second");
        assert!(counts.take(a).is_none(), "a third from one address");
        let _b1 = counts.take(b).expect("another address");
        assert!(counts.take(b).is_none(), "over the total");
        drop(a1);
        let _b2 = counts.take(b).expect("a slot came back");
        // An address refused leaves no entry behind.
        let c: IpAddr = "10.0.0.3".parse().expect("ip");
        assert!(counts.take(c).is_none());
        let open = counts.open.lock().expect("lock");
        assert!(!open.1.contains_key(&c));
        assert_eq!(open.0, 3);
    }
}
