//! The stream of a replication connection: plain TCP or TLS 1.3 over TCP,
//! one type so that the handshake and the session loops are written once
//! for both. Below TLS, reads go through a large buffer: rustls reads at
//! most 4 KiB at a time, which would otherwise be a system call per 4 KiB
//! of a 1 MiB write.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, BufReader, ReadBuf};
use tokio::net::TcpStream;

use crate::security::{Fingerprint, Mode};

/// Bytes read from the socket at once below TLS.
const TLS_READ_BUFFER: usize = 256 * 1024;

/// The first byte of a TLS handshake record (content type 22); a
/// version-2 frame starts with its version byte (1 or 2).
pub const TLS_HANDSHAKE_BYTE: u8 = 0x16;

type Lower = BufReader<TcpStream>;

/// A replication connection.
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::TlsStream<Lower>>),
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Conn::Plain(_) => f.write_str("Conn::Plain"),
            Conn::Tls(_) => f.write_str("Conn::Tls"),
        }
    }
}

/// How a live link is protected, for logs and `hastctl list`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LinkInfo {
    pub mode: Mode,
    /// The TLS cipher suite.
    pub suite: Option<String>,
    /// The peer's key fingerprint (TLS).
    pub peer: Option<Fingerprint>,
}

impl LinkInfo {
    /// One line for `hastctl list`: what protects the link.
    pub fn describe(&self) -> String {
        match &self.suite {
            Some(s) => format!("{}, {s}", self.mode.describe()),
            None => self.mode.describe().to_string(),
        }
    }
}

impl Conn {
    /// The client side of TLS over `tcp`, within `timeout`.
    pub async fn tls_connect(
        tcp: TcpStream,
        cfg: Arc<rustls::ClientConfig>,
        timeout: Duration,
    ) -> io::Result<Conn> {
        let lower = BufReader::with_capacity(TLS_READ_BUFFER, tcp);
        let connector = tokio_rustls::TlsConnector::from(cfg);
        let s = tokio::time::timeout(
            timeout,
            connector.connect(crate::security::tls::peer_name(), lower),
        )
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
        Ok(Conn::Tls(Box::new(tokio_rustls::TlsStream::Client(s))))
    }

    /// The server side of TLS over `tcp`, within `timeout`.
    pub async fn tls_accept(
        tcp: TcpStream,
        cfg: Arc<rustls::ServerConfig>,
        timeout: Duration,
    ) -> io::Result<Conn> {
        let lower = BufReader::with_capacity(TLS_READ_BUFFER, tcp);
        let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
        let s = tokio::time::timeout(timeout, acceptor.accept(lower))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
        Ok(Conn::Tls(Box::new(tokio_rustls::TlsStream::Server(s))))
    }

    /// Whether this is a TLS connection.
    pub fn is_tls(&self) -> bool {
        matches!(self, Conn::Tls(_))
    }

    fn tcp(&self) -> &TcpStream {
        match self {
            Conn::Plain(s) => s,
            Conn::Tls(t) => t.get_ref().0.get_ref(),
        }
    }

    /// Disable Nagle's algorithm (requests are written whole).
    pub fn set_nodelay(&self) {
        let _ = self.tcp().set_nodelay(true);
    }

    /// The peer's certificate chain (TLS), its own first.
    pub fn peer_certificates(&self) -> Option<Vec<CertificateDer<'static>>> {
        match self {
            Conn::Plain(_) => None,
            Conn::Tls(t) => t
                .get_ref()
                .1
                .peer_certificates()
                .map(|c| c.iter().map(|c| c.clone().into_owned()).collect()),
        }
    }

    /// The negotiated TLS cipher suite.
    pub fn suite(&self) -> Option<String> {
        match self {
            Conn::Plain(_) => None,
            Conn::Tls(t) => t
                .get_ref()
                .1
                .negotiated_cipher_suite()
                .map(crate::security::tls::suite_name),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
