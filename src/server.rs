//! The HTTP/1.1 server: an accept loop on hyper with the connection limits `axum::serve`
//! lacks. `axum::serve` builds hyper without a timer, so a client that never finishes its
//! headers, its body, or that keeps a connection idle holds memory and a descriptor for
//! ever; a few hundred such clients exhaust a small pod without presenting any token.
//!
//! Each connection is watched here rather than by hyper's own header timer, because
//! hyper's timer also runs while a kept-alive connection waits for its next request: it
//! cannot tell a slow header from an idle connection, and those want different limits.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::ConnectInfo;
use futures_util::FutureExt;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use crate::config::ServerSettings;
use crate::http::App;

/// Why a request body stopped arriving before its end (the body's error, mapped to HTTP
/// in `http::error`).
#[derive(Debug, thiserror::Error)]
pub enum BodyCut {
    #[error("request body not received within {0} ms")]
    Timeout(u128),
    #[error("server shutting down")]
    ShuttingDown,
}

/// Where the server is in its life: on SIGTERM it drains (keeps accepting, asks clients
/// to reconnect elsewhere), then stops (accepts nothing, ends idle connections and
/// unfinished requests, lets in-flight ones finish).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Serving,
    Draining,
    Stopping,
}

#[derive(Clone)]
pub struct Stopping(watch::Receiver<Phase>);

impl Stopping {
    pub fn channel() -> (watch::Sender<Phase>, Stopping) {
        let (tx, rx) = watch::channel(Phase::Serving);
        (tx, Stopping(rx))
    }

    fn phase(&self) -> Phase {
        *self.0.borrow()
    }

    fn is_stopping(&self) -> bool {
        self.phase() == Phase::Stopping
    }

    async fn wait(&mut self) {
        let _ = self.0.wait_for(|phase| *phase == Phase::Stopping).await;
    }
}

/// Serves `app` on `listener` until `stopping` says stop, then until every connection
/// has ended (the caller bounds that wait by its grace period).
pub async fn run(listener: TcpListener, app: App, settings: ServerSettings, stopping: Stopping) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.max_header_size(settings.max_header_bytes)
        // The watchdog below times headers; hyper's timer would also cut idle connections.
        .header_read_timeout(None)
        .keep_alive(true);
    let http = Arc::new(http);
    let slots = Arc::new(Semaphore::new(settings.max_connections));
    // Each connection task holds a clone; the last one gone ends the drain.
    let (live_tx, mut live_rx) = tokio::sync::mpsc::channel::<()>(1);
    let mut stop = stopping.clone();
    // A descriptor held in reserve. Out of descriptors (more connections allowed than the
    // descriptor limit leaves room for), accept() fails while the kernel keeps completed
    // connections in the backlog, where every new client would wait unanswered until the
    // count drops (measured: a 5 s client timeout, every time). Giving the spare up lets
    // one be accepted and closed at once, so the client retries elsewhere.
    let mut spare = std::fs::File::open("/dev/null").ok();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait() => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) if out_of_descriptors(&error) && spare.is_some() => {
                drop(spare.take());
                // The failed accept left the listener ready: this polls it once.
                if let Some(Ok((stream, _))) = listener.accept().now_or_never() {
                    metrics::counter!("airstate_connections_rejected_total").increment(1);
                    drop(stream);
                }
                spare = std::fs::File::open("/dev/null").ok();
                continue;
            }
            Err(error) => {
                if spare.is_none() {
                    spare = std::fs::File::open("/dev/null").ok();
                }
                // Out of descriptors, typically: pause instead of spinning on the error.
                tracing::warn!(%error, "cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Closed at once: a full replica answering nothing is worse than a refused
            // connection that the client retries elsewhere.
            metrics::counter!("airstate_connections_rejected_total").increment(1);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (http, app, stopping, live) =
            (http.clone(), app.clone(), stopping.clone(), live_tx.clone());
        tokio::spawn(async move {
            metrics::gauge!("airstate_connections_open").increment(1.0);
            serve_connection(&http, stream, peer, app, settings, stopping).await;
            metrics::gauge!("airstate_connections_open").decrement(1.0);
            drop((slot, live));
        });
    }
    drop(listener);
    drop(live_tx);
    let _ = live_rx.recv().await;
}

/// EMFILE (this process) or ENFILE (the system): the same numbers on Linux and the BSDs.
fn out_of_descriptors(error: &std::io::Error) -> bool {
    matches!(error.raw_os_error(), Some(23 | 24))
}

async fn serve_connection(
    http: &hyper::server::conn::http1::Builder,
    stream: TcpStream,
    peer: SocketAddr,
    app: App,
    settings: ServerSettings,
    mut stopping: Stopping,
) {
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Watched {
        stream,
        activity: activity.clone(),
    });
    let service = {
        let activity = activity.clone();
        let stopping = stopping.clone();
        hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            let in_flight = InFlight::begin(activity.clone());
            let mut request = request.map(|body| {
                Body::new(DeadlineBody::new(
                    body,
                    settings.body_read_timeout,
                    stopping.clone(),
                ))
            });
            // Read by the forwarder for `X-Forwarded-For`, as `axum::serve` provided it.
            request.extensions_mut().insert(ConnectInfo(peer));
            let mut app = app.clone();
            let draining = stopping.clone();
            async move {
                let mut response = match app.call(request).await {
                    Ok(response) => response,
                    Err(never) => match never {},
                };
                if draining.phase() != Phase::Serving {
                    // The client's next request opens a new connection, which the
                    // Service by then routes to another replica.
                    response.headers_mut().insert(
                        axum::http::header::CONNECTION,
                        axum::http::HeaderValue::from_static("close"),
                    );
                }
                Ok::<_, Infallible>(response.map(|body| {
                    Body::new(TrackedBody {
                        inner: body,
                        _in_flight: in_flight,
                    })
                }))
            }
        })
    };
    let connection = http.serve_connection(io, service);
    let mut connection = std::pin::pin!(connection);
    // The watchdog sleeps to the connection's deadline or for one header timeout, whichever
    // is sooner, and looks again when it wakes. Nothing wakes it per request: a head that
    // starts while it sleeps finds the timer at most one header timeout away, so the
    // head's own deadline is never missed, and a request's bytes cost no timer or
    // notification (three wakes per request did; BENCHMARKS.md has what they cost a GET).
    let watchdog = tokio::time::sleep(Duration::ZERO);
    let mut watchdog = std::pin::pin!(watchdog);
    let stop = stopping.wait();
    let mut stop = std::pin::pin!(stop);
    let mut told_to_stop = false;
    loop {
        tokio::select! {
            biased;
            _ = connection.as_mut() => return,
            _ = watchdog.as_mut() => {
                let now = Instant::now();
                let deadline = activity.deadline(&settings);
                if deadline.is_some_and(|at| at <= now) {
                    metrics::counter!("airstate_connections_timed_out_total").increment(1);
                    return;
                }
                let look_again = now + settings.header_read_timeout;
                watchdog
                    .as_mut()
                    .reset(deadline.map_or(look_again, |at| at.min(look_again)));
            }
            _ = stop.as_mut(), if !told_to_stop => {
                told_to_stop = true;
                connection.as_mut().graceful_shutdown();
            }
        }
        // Between requests, or inside a request's headers: nothing in flight to finish.
        if told_to_stop && activity.idle() {
            return;
        }
    }
}

/// What a connection is doing, as its reads, writes and requests show.
struct Activity {
    state: Mutex<ActivityState>,
}

struct ActivityState {
    in_flight: usize,
    /// When the first byte of a request not yet handed to the router arrived.
    head_started: Option<Instant>,
    last_active: Instant,
}

impl Activity {
    fn new() -> Self {
        Self {
            state: Mutex::new(ActivityState {
                in_flight: 0,
                head_started: None,
                last_active: Instant::now(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ActivityState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn read(&self, bytes: usize) {
        let mut state = self.lock();
        let now = Instant::now();
        state.last_active = now;
        if bytes > 0 && state.in_flight == 0 && state.head_started.is_none() {
            state.head_started = Some(now);
        }
    }

    fn wrote(&self) {
        self.lock().last_active = Instant::now();
    }

    /// When the connection is to be closed if nothing changes; `None` while a request is
    /// in flight (its body has its own deadline, its handler may take its time).
    fn deadline(&self, settings: &ServerSettings) -> Option<Instant> {
        let state = self.lock();
        if state.in_flight > 0 {
            return None;
        }
        Some(match state.head_started {
            Some(started) => started + settings.header_read_timeout,
            None => state.last_active + settings.idle_timeout,
        })
    }

    fn idle(&self) -> bool {
        self.lock().in_flight == 0
    }
}

/// A request from the moment hyper hands it over until its response body is dropped.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn begin(activity: Arc<Activity>) -> Self {
        {
            let mut state = activity.lock();
            state.in_flight += 1;
            state.head_started = None;
        }
        InFlight(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        {
            let mut state = self.0.lock();
            state.in_flight -= 1;
            state.last_active = Instant::now();
        }
    }
}

/// The socket, reporting its reads and writes to the connection's [`Activity`].
struct Watched {
    stream: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            self.activity.read(buf.filled().len() - before);
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        if let Poll::Ready(Ok(_)) = polled {
            self.activity.wrote();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(_)) = polled {
            self.activity.wrote();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// A request body that must arrive in full within the body timeout, and that ends with an
/// error when the server stops, so a half-sent request cannot hold the shutdown.
struct DeadlineBody {
    inner: Incoming,
    /// Made on the first read that has to wait: most bodies (every GET's) arrive with
    /// their head and never need one.
    timer: Option<Pin<Box<Sleep>>>,
    deadline: Instant,
    timeout: Duration,
    stopping: Stopping,
    stop_wait: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl DeadlineBody {
    fn new(inner: Incoming, timeout: Duration, stopping: Stopping) -> Self {
        Self {
            inner,
            timer: None,
            deadline: Instant::now() + timeout,
            timeout,
            stopping,
            stop_wait: None,
        }
    }
}

impl hyper::body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|frame| frame.map_err(Into::into)));
        }
        let deadline = this.deadline;
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(BodyCut::Timeout(this.timeout.as_millis()).into())));
        }
        if this.stopping.is_stopping() {
            return Poll::Ready(Some(Err(BodyCut::ShuttingDown.into())));
        }
        let stop_wait = this.stop_wait.get_or_insert_with(|| {
            let mut stopping = this.stopping.clone();
            Box::pin(async move { stopping.wait().await })
        });
        if stop_wait.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(BodyCut::ShuttingDown.into())));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that keeps its request counted as in flight until it is sent.
struct TrackedBody<B> {
    inner: B,
    _in_flight: InFlight,
}

impl<B> hyper::body::Body for TrackedBody<B>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
