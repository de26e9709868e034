//! Idle timeouts for connections the proxy does not drive byte by byte itself: the hyper path,
//! CONNECT tunnels, upgraded and spliced connections. The lean HTTP/1 path times each of its
//! own waits instead ([`crate::h1`]).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Requests open on one connection; while any is, the connection may be silent for the longer
/// (stream) limit.
#[derive(Debug, Clone, Default)]
pub struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    /// Counts a request until the guard is dropped.
    pub fn enter(&self) -> InFlightGuard {
        self.0.fetch_add(1, Ordering::Relaxed);
        InFlightGuard(self.0.clone())
    }

    fn any(&self) -> bool {
        self.0.load(Ordering::Relaxed) > 0
    }
}

/// One open request of an [`InFlight`].
#[derive(Debug)]
pub struct InFlightGuard(Arc<AtomicUsize>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An I/O object that fails with `TimedOut` once nothing has been read or written for `idle`
/// (or, while a request is in flight, for `busy`).
#[derive(Debug)]
pub struct IdleIo<T> {
    inner: T,
    idle: Duration,
    busy: Duration,
    in_flight: InFlight,
    last: Instant,
    /// Armed lazily: only a wait that returns `Pending` polls it, so busy connections pay no
    /// timer work per read.
    sleep: Pin<Box<Sleep>>,
}

impl<T> IdleIo<T> {
    pub fn new(inner: T, idle: Duration, busy: Duration, in_flight: InFlight) -> Self {
        let now = Instant::now();
        IdleIo {
            inner,
            idle,
            busy,
            in_flight,
            last: now,
            sleep: Box::pin(tokio::time::sleep_until(now + idle)),
        }
    }

    /// The same limit whether or not a request is open.
    pub fn fixed(inner: T, limit: Duration) -> Self {
        Self::new(inner, limit, limit, InFlight::default())
    }

    fn limit(&self) -> Duration {
        if self.in_flight.any() {
            self.busy
        } else {
            self.idle
        }
    }

    /// Ready once the connection has been silent for its limit.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let deadline = self.last + self.limit();
            if self.sleep.deadline() != deadline {
                self.sleep.as_mut().reset(deadline);
            }
            match self.sleep.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                // Activity or a request may have moved the deadline since it was armed.
                Poll::Ready(()) if Instant::now() < self.last + self.limit() => continue,
                Poll::Ready(()) => return Poll::Ready(()),
            }
        }
    }

    /// What an inner poll gives, with the clock moved on progress and the limit checked
    /// while waiting.
    fn after<R>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        match polled {
            Poll::Ready(r) => {
                self.last = Instant::now();
                Poll::Ready(r)
            }
            Poll::Pending => match self.poll_expired(cx) {
                Poll::Ready(()) => Poll::Ready(Err(timed_out())),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "connection idle for too long")
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        this.after(cx, polled)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.after(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.after(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<T: hyper_util::client::legacy::connect::Connection>
    hyper_util::client::legacy::connect::Connection for IdleIo<T>
{
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        self.inner.connected()
    }
}

/// Copies bytes both ways until both sides close, or until neither side has sent or received a
/// byte for `idle`.
pub async fn splice<A, B>(a: A, b: B, idle: Duration) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut a = IdleIo::fixed(a, idle);
    let mut b = IdleIo::fixed(b, idle);
    tokio::io::copy_bidirectional(&mut a, &mut b).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_times_out_and_an_active_one_does_not() {
        let (a, mut peer) = tokio::io::duplex(64);
        let mut io = IdleIo::fixed(a, Duration::from_secs(10));
        let mut byte = [0u8; 1];
        // Activity every 6 s keeps it open past 10 s.
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(6)).await;
            peer.write_all(b"x").await.unwrap();
            assert_eq!(io.read(&mut byte).await.unwrap(), 1);
        }
        let started = Instant::now();
        let err = io.read(&mut byte).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_in_flight_gets_the_longer_limit() {
        let (a, _peer) = tokio::io::duplex(64);
        let in_flight = InFlight::default();
        let mut io = IdleIo::new(
            a,
            Duration::from_secs(5),
            Duration::from_secs(60),
            in_flight.clone(),
        );
        let guard = in_flight.enter();
        let started = Instant::now();
        let mut byte = [0u8; 1];
        let err = io.read(&mut byte).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(60));
        drop(guard);
        let started = Instant::now();
        let err = io.read(&mut byte).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(0));
    }
}
