//! The HTTP server of the metrics: `GET /metrics` (and `HEAD`) answered
//! with the exposition, on its own thread and single-threaded runtime so
//! that scrapes never run on the workers of the data path. hyper (HTTP/1.1
//! only) parses requests with bounded buffers; a client gets at most
//! [`HEADER_TIMEOUT`] to send its headers and [`CONNECTION_TIMEOUT`] in
//! all, at most [`MAX_CONNECTIONS`] are served at once, and anything but a
//! bodiless GET or HEAD of `/metrics` is answered with an error status.
//! The resources' state comes from the daemon's main loop
//! ([`ScrapeRequest`]), which answers without waiting on any I/O.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{header, Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};

use super::expose::{self, ResourceSample};
use crate::addr::{Addr, AddrKind};

/// Longest a client may take to send a request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest one connection is kept, whatever it does.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// Connections served at once; more are closed at once.
pub const MAX_CONNECTIONS: usize = 16;

/// Largest request head read (request line and headers): larger ones get
/// `431 Request Header Fields Too Large`.
pub const MAX_HEAD: usize = 16 * 1024;

/// Longest wait for the daemon's state.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

/// A scrape asking the daemon's main loop for the resources' state.
pub struct ScrapeRequest {
    pub reply: oneshot::Sender<Vec<ResourceSample>>,
}

/// Failure to set up the metrics server.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics address {0} is not a TCP address (Prometheus scrapes over TCP)")]
    NotTcp(String),
    #[error("unable to listen on metrics address {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("unable to start the metrics server's thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// A bound metrics address (blocking form, so it can be bound before the
/// daemon forks; served by [`MetricsListener::serve`]).
#[derive(Debug)]
pub struct MetricsListener {
    listener: std::net::TcpListener,
    addr: Addr,
}

impl MetricsListener {
    /// Bind `addr` (a TCP address).
    pub fn bind(addr: &Addr) -> Result<MetricsListener, MetricsError> {
        let AddrKind::Tcp { .. } = &addr.kind else {
            return Err(MetricsError::NotTcp(addr.to_string()));
        };
        let bind = |source| MetricsError::Bind {
            addr: addr.to_string(),
            source,
        };
        let addrs = addr.socket_addrs().map_err(bind)?;
        let listener = std::net::TcpListener::bind(&addrs[..]).map_err(bind)?;
        listener.set_nonblocking(true).map_err(bind)?;
        Ok(MetricsListener {
            listener,
            addr: addr.clone(),
        })
    }

    /// The address as configured.
    pub fn addr(&self) -> &Addr {
        &self.addr
    }

    /// The address actually bound (the port, when 0 was asked).
    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }

    /// Serve scrapes on a thread of its own until the returned server is
    /// stopped or dropped; each scrape asks `scrapes` for the state.
    pub fn serve(
        self,
        scrapes: mpsc::Sender<ScrapeRequest>,
    ) -> Result<MetricsServer, MetricsError> {
        let (stop, stop_rx) = watch::channel(false);
        let MetricsListener { listener, addr } = self;
        let shown = addr.to_string();
        std::thread::Builder::new()
            .name("hast-metrics".into())
            .spawn(move || run(listener, &shown, scrapes, stop_rx))
            .map_err(MetricsError::Thread)?;
        Ok(MetricsServer { stop, addr })
    }
}

/// A running metrics server; stops when dropped.
#[derive(Debug)]
pub struct MetricsServer {
    stop: watch::Sender<bool>,
    addr: Addr,
}

impl MetricsServer {
    /// The address it serves, as configured.
    pub fn addr(&self) -> &Addr {
        &self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

/// The server thread: a single-threaded runtime accepting until `stop`.
fn run(
    listener: std::net::TcpListener,
    addr: &str,
    scrapes: mpsc::Sender<ScrapeRequest>,
    stop: watch::Receiver<bool>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("metrics server on {addr}: cannot start its runtime: {e}");
            return;
        }
    };
    rt.block_on(async move {
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("metrics server on {addr}: {e}");
                return;
            }
        };
        match listener.local_addr() {
            Ok(at) => tracing::info!("serving metrics at http://{at}/metrics"),
            Err(_) => tracing::info!("serving metrics at {addr}"),
        }
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let what = format!("the metrics address {addr}");
        let conn_stop = stop.clone();
        crate::accept::serve(listener, &what, Some(stop.clone()), move |stream, peer| {
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::debug!("metrics: {peer} refused, {MAX_CONNECTIONS} connections busy");
                return;
            };
            let scrapes = scrapes.clone();
            let mut stop = conn_stop.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| answer(req, scrapes.clone()));
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .max_buf_size(MAX_HEAD)
                    .serve_connection(TokioIo::new(stream), service);
                tokio::select! {
                    r = tokio::time::timeout(CONNECTION_TIMEOUT, conn) => match r {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => tracing::debug!("metrics: connection from {peer}: {e}"),
                        Err(_) => tracing::debug!("metrics: connection from {peer} closed after {CONNECTION_TIMEOUT:?}"),
                    },
                    _ = crate::accept::stopped(&mut stop) => {}
                }
                drop(slot);
            });
        })
        .await;
        // Connections still open end with the runtime.
        tracing::info!("metrics server at {addr} stopped");
    });
}

fn reply(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(format!("{text}\n"))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Whether the request announces a body (metrics requests have none).
fn has_body(req: &Request<Incoming>) -> bool {
    let h = req.headers();
    h.contains_key(header::TRANSFER_ENCODING)
        || h.get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.to_str().map_or(true, |s| s.trim() != "0"))
}

/// Answer one request.
async fn answer(
    req: Request<Incoming>,
    scrapes: mpsc::Sender<ScrapeRequest>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let head = req.method() == Method::HEAD;
    if req.method() != Method::GET && !head {
        let mut r = reply(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD");
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return Ok(r);
    }
    if has_body(&req) {
        let mut r = reply(
            StatusCode::PAYLOAD_TOO_LARGE,
            "a request body is not accepted",
        );
        r.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
        return Ok(r);
    }
    match req.uri().path() {
        "/metrics" => {}
        "/" => {
            return Ok(reply(
                StatusCode::OK,
                "hastd: metrics at /metrics (Prometheus text format)",
            ))
        }
        _ => {
            return Ok(reply(
                StatusCode::NOT_FOUND,
                "not found; metrics are at /metrics",
            ))
        }
    }
    let (tx, rx) = oneshot::channel();
    let samples = async {
        scrapes.send(ScrapeRequest { reply: tx }).await.ok()?;
        rx.await.ok()
    };
    let Ok(Some(samples)) = tokio::time::timeout(SCRAPE_TIMEOUT, samples).await else {
        return Ok(reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "hastd did not report its state in time",
        ));
    };
    let text = match expose::encode(samples) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!("metrics: encoding failed: {e}");
            return Ok(reply(StatusCode::INTERNAL_SERVER_ERROR, "encoding failed"));
        }
    };
    let body = if head {
        Bytes::new()
    } else {
        Bytes::from(text)
    };
    let mut r = Response::new(Full::new(body));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(expose::CONTENT_TYPE),
    );
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// A server on an ephemeral port whose state is one resource, and a
    /// task answering its scrapes.
    fn server() -> (
        MetricsServer,
        std::net::SocketAddr,
        std::thread::JoinHandle<()>,
    ) {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let addr = Addr::parse(&format!("tcp4://127.0.0.1:{port}"), 0).unwrap();
        let l = MetricsListener::bind(&addr).unwrap();
        let at = l.local_addr().unwrap();
        let (tx, mut rx) = mpsc::channel::<ScrapeRequest>(4);
        let answering = std::thread::spawn(move || {
            while let Some(s) = rx.blocking_recv() {
                let m = crate::metrics::ResourceMetrics::new("r0");
                let _ = s.reply.send(vec![ResourceSample {
                    name: "r0".into(),
                    status: crate::control::status::ResourceStatus {
                        role: "init".into(),
                        ..Default::default()
                    },
                    recorded: m.snapshot(),
                }]);
            }
        });
        (l.serve(tx).unwrap(), at, answering)
    }

    fn exchange(at: std::net::SocketAddr, request: &[u8]) -> String {
        let mut s = std::net::TcpStream::connect(at).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // The server may answer and close before all of a huge request is
        // sent: a failed write is expected then.
        let _ = s.write_all(request);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    #[test]
    fn scrapes_and_refusals() {
        let (srv, at, answering) = server();
        let ok = exchange(
            at,
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(
            ok.contains("hast_role{resource=\"r0\",role=\"init\"} 1"),
            "{ok}"
        );
        let garbage = exchange(at, b"\x00\x01 this is not HTTP\r\n\r\n");
        assert!(garbage.starts_with("HTTP/1.1 400"), "{garbage}");
        let mut huge = b"GET /metrics HTTP/1.1\r\nX-Big: ".to_vec();
        huge.extend(std::iter::repeat_n(b'a', 1 << 20));
        huge.extend(b"\r\n\r\n");
        let big = exchange(at, &huge);
        assert!(
            big.starts_with("HTTP/1.1 431"),
            "{}",
            &big[..big.len().min(200)]
        );
        let post = exchange(
            at,
            b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
        );
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        let body = exchange(
            at,
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n",
        );
        assert!(body.starts_with("HTTP/1.1 413"), "{body}");
        let missing = exchange(
            at,
            b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        // Still serving after all that.
        let again = exchange(
            at,
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert!(again.starts_with("HTTP/1.1 200"), "{again}");
        drop(srv);
        // The scrape channel closes with the server's thread.
        answering.join().unwrap();
    }
}
