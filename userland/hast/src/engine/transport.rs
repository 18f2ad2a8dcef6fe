//! The stream of a replication connection: plain TCP or TLS 1.3 over TCP,
//! one type so that the handshake and the session loops are written once
//! for both. rustls runs the TLS handshake, fed whole records and stopped
//! as soon as it is complete, so that nothing that follows the handshake is
//! left inside rustls; the traffic keys then go to the record layer of
//! [`crate::security::record`] ([`TlsConn`]), which opens records in place
//! in a large receive buffer and seals them in place in its send buffer.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::security::record::{self, Direction, Opened, RecordError};
use crate::security::{Fingerprint, Mode};

/// Bytes read from the socket at once.
const READ_BUFFER: usize = 256 * 1024;

/// Plaintext sealed per write call, at most; and the amount of sealed
/// bytes that must be sent before more is taken.
const WRITE_CHUNK: usize = 256 * 1024;

/// The first byte of a TLS handshake record (content type 22); a
/// version-2 frame starts with its version byte (1 or 2).
pub const TLS_HANDSHAKE_BYTE: u8 = 0x16;

/// A replication connection.
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<TlsConn>),
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

fn invalid(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Run the TLS handshake of `conn` over `tcp`, reading whole records
/// only and stopping as soon as it is complete: nothing that follows it is
/// read. A handshake error is sent to the peer as rustls' alert before it
/// is returned (as an I/O error holding the [`rustls::Error`]).
async fn handshake<D>(
    tcp: &mut TcpStream,
    conn: &mut rustls::ConnectionCommon<D>,
) -> io::Result<()> {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    loop {
        while conn.wants_write() {
            out.clear();
            conn.write_tls(&mut out)?;
            tcp.write_all(&out).await?;
        }
        if !conn.is_handshaking() {
            return Ok(());
        }
        let mut header = [0u8; record::HEADER];
        tcp.read_exact(&mut header).await?;
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len > record::MAX_CIPHERTEXT + 2048 {
            return Err(invalid(rustls::Error::InvalidMessage(
                rustls::InvalidMessage::MessageTooLarge,
            )));
        }
        let mut whole = vec![0u8; record::HEADER + len];
        whole[..record::HEADER].copy_from_slice(&header);
        tcp.read_exact(&mut whole[record::HEADER..]).await?;
        let mut rest = &whole[..];
        while !rest.is_empty() {
            conn.read_tls(&mut rest)?;
            if let Err(e) = conn.process_new_packets() {
                // Tell the peer why (an alert), then fail.
                while conn.wants_write() {
                    out.clear();
                    if conn.write_tls(&mut out).is_err() {
                        break;
                    }
                    if tcp.write_all(&out).await.is_err() {
                        break;
                    }
                }
                return Err(invalid(e));
            }
        }
    }
}

/// A TLS connection after its handshake: application data through
/// [`crate::security::record`].
pub struct TlsConn {
    tcp: TcpStream,
    rx: Direction,
    tx: Direction,
    /// Received bytes: `rbuf[rstart..rend]` not yet opened, and the
    /// plaintext of the last opened record at `plain`.
    rbuf: Vec<u8>,
    rstart: usize,
    rend: usize,
    plain: std::ops::Range<usize>,
    eof: bool,
    failed: Option<RecordError>,
    /// Sealed records, sent from `wpos`.
    wbuf: Vec<u8>,
    wpos: usize,
    close_sent: bool,
    peer_certificates: Vec<CertificateDer<'static>>,
    suite: String,
}

impl TlsConn {
    /// Take over a connection whose handshake rustls completed over
    /// `io`: its traffic keys, the peer's certificates, the suite.
    fn from_handshake<C>(tcp: TcpStream, conn: C) -> io::Result<TlsConn>
    where
        C: std::ops::DerefMut<Target = rustls::ConnectionCommon<<C as Extract>::Data>> + Extract,
    {
        let mut conn = conn;
        if conn.wants_write() {
            return Err(invalid("TLS handshake data left unsent"));
        }
        match io::Read::read(&mut conn.reader(), &mut [0u8; 1]) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            _ => return Err(invalid("application data arrived inside the TLS handshake")),
        }
        let peer_certificates = conn
            .peer_certificates()
            .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
            .unwrap_or_default();
        let negotiated = conn
            .negotiated_cipher_suite()
            .ok_or_else(|| invalid("no TLS cipher suite was negotiated"))?;
        let suite = crate::security::tls::suite_name(negotiated);
        // What the crypto provider allows one key of this suite, in
        // records of the largest size (see security::record).
        let limit = negotiated
            .tls13()
            .ok_or_else(|| invalid("the TLS connection is not TLS 1.3"))?
            .common
            .confidentiality_limit;
        let send = if crate::failpoint::check(crate::failpoint::TLS_KEY_LIMIT).is_some() {
            record::send_budget(crate::failpoint::TLS_KEY_LIMIT_RECORDS)
        } else {
            record::send_budget(limit)
        };
        let secrets = conn.extract().map_err(invalid)?;
        let (rx_seq, rx) = secrets.rx;
        let (tx_seq, tx) = secrets.tx;
        Ok(TlsConn {
            tcp,
            rx: Direction::new(rx, rx_seq, record::receive_budget(limit)).map_err(invalid)?,
            tx: Direction::new(tx, tx_seq, send).map_err(invalid)?,
            rbuf: vec![0u8; READ_BUFFER + record::HEADER + record::MAX_CIPHERTEXT],
            rstart: 0,
            rend: 0,
            plain: 0..0,
            eof: false,
            failed: None,
            wbuf: Vec::with_capacity(WRITE_CHUNK + WRITE_CHUNK / 8),
            wpos: 0,
            close_sent: false,
            peer_certificates,
            suite,
        })
    }

    /// Send what is sealed.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.wpos < self.wbuf.len() {
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.wbuf[self.wpos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.wpos += n;
        }
        self.wbuf.clear();
        self.wpos = 0;
        Poll::Ready(Ok(()))
    }
}

/// rustls connections whose traffic keys can be taken.
pub trait Extract {
    type Data;
    fn extract(self) -> Result<rustls::ExtractedSecrets, rustls::Error>;
}

impl Extract for rustls::ClientConnection {
    type Data = rustls::client::ClientConnectionData;
    fn extract(self) -> Result<rustls::ExtractedSecrets, rustls::Error> {
        self.dangerous_extract_secrets()
    }
}

impl Extract for rustls::ServerConnection {
    type Data = rustls::server::ServerConnectionData;
    fn extract(self) -> Result<rustls::ExtractedSecrets, rustls::Error> {
        self.dangerous_extract_secrets()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        loop {
            if me.plain.start < me.plain.end {
                let n = me.plain.len().min(buf.remaining());
                buf.put_slice(&me.rbuf[me.plain.start..me.plain.start + n]);
                me.plain.start += n;
                return Poll::Ready(Ok(()));
            }
            if let Some(e) = &me.failed {
                return Poll::Ready(Err(invalid(e.clone())));
            }
            if me.eof {
                return Poll::Ready(Ok(()));
            }
            let pending = &me.rbuf[me.rstart..me.rend];
            match record::record_len(pending) {
                Err(e) => me.failed = Some(e),
                Ok(Some(n)) if pending.len() >= n => {
                    let at = me.rstart;
                    me.rstart += n;
                    match me.rx.open(&mut me.rbuf[at..at + n]) {
                        Ok(Opened::Data(r)) => me.plain = at + r.start..at + r.end,
                        Ok(Opened::Closed) => me.eof = true,
                        Err(e) => me.failed = Some(e),
                    }
                }
                Ok(_) => {
                    // More bytes needed: make room for a whole record.
                    if me.rstart == me.rend {
                        me.rstart = 0;
                        me.rend = 0;
                    } else if me.rbuf.len() - me.rend < record::HEADER + record::MAX_CIPHERTEXT {
                        me.rbuf.copy_within(me.rstart..me.rend, 0);
                        me.rend -= me.rstart;
                        me.rstart = 0;
                    }
                    let mut rb = ReadBuf::new(&mut me.rbuf[me.rend..]);
                    ready!(Pin::new(&mut me.tcp).poll_read(cx, &mut rb))?;
                    let got = rb.filled().len();
                    if got == 0 {
                        if me.rstart == me.rend {
                            // The peer closed at a record boundary.
                            me.eof = true;
                        } else {
                            return Poll::Ready(Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "the connection ended inside a TLS record",
                            )));
                        }
                    }
                    me.rend += got;
                }
            }
        }
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        if me.wbuf.len() - me.wpos >= WRITE_CHUNK {
            ready!(me.poll_drain(cx))?;
        }
        if me.wpos == me.wbuf.len() {
            me.wbuf.clear();
            me.wpos = 0;
        }
        let n = buf.len().min(WRITE_CHUNK);
        me.tx
            .seal(&buf[..n], &mut me.wbuf)
            .map_err(io::Error::other)?;
        // A frame's header and payload go out together at the caller's
        // flush; a large write starts going out now.
        if me.wbuf.len() - me.wpos >= WRITE_CHUNK {
            if let Poll::Ready(Err(e)) = me.poll_drain(cx) {
                return Poll::Ready(Err(e));
            }
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        ready!(me.poll_drain(cx))?;
        Pin::new(&mut me.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if !me.close_sent {
            me.tx.close_notify(&mut me.wbuf).map_err(io::Error::other)?;
            me.close_sent = true;
        }
        ready!(me.poll_drain(cx))?;
        Pin::new(&mut me.tcp).poll_shutdown(cx)
    }
}

impl Conn {
    /// The client side of TLS over `tcp`, within `timeout`.
    pub async fn tls_connect(
        tcp: TcpStream,
        cfg: Arc<rustls::ClientConfig>,
        timeout: Duration,
    ) -> io::Result<Conn> {
        let handshake = async {
            let mut tcp = tcp;
            let mut conn = rustls::ClientConnection::new(cfg, crate::security::tls::peer_name())
                .map_err(invalid)?;
            handshake(&mut tcp, &mut conn).await?;
            TlsConn::from_handshake(tcp, conn)
        };
        let c = tokio::time::timeout(timeout, handshake)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
        Ok(Conn::Tls(Box::new(c)))
    }

    /// The server side of TLS over `tcp`, within `timeout`.
    pub async fn tls_accept(
        tcp: TcpStream,
        cfg: Arc<rustls::ServerConfig>,
        timeout: Duration,
    ) -> io::Result<Conn> {
        let handshake = async {
            let mut tcp = tcp;
            let mut conn = rustls::ServerConnection::new(cfg).map_err(invalid)?;
            handshake(&mut tcp, &mut conn).await?;
            TlsConn::from_handshake(tcp, conn)
        };
        let c = tokio::time::timeout(timeout, handshake)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
        Ok(Conn::Tls(Box::new(c)))
    }

    /// Whether this is a TLS connection.
    pub fn is_tls(&self) -> bool {
        matches!(self, Conn::Tls(_))
    }

    fn tcp(&self) -> &TcpStream {
        match self {
            Conn::Plain(s) => s,
            Conn::Tls(t) => &t.tcp,
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
            Conn::Tls(t) => Some(t.peer_certificates.clone()),
        }
    }

    /// The negotiated TLS cipher suite.
    pub fn suite(&self) -> Option<String> {
        match self {
            Conn::Plain(_) => None,
            Conn::Tls(t) => Some(t.suite.clone()),
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
            Conn::Tls(s) => {
                let first = bufs
                    .iter()
                    .find(|b| !b.is_empty())
                    .map_or(&[][..], |b| &**b);
                Pin::new(s.as_mut()).poll_write(cx, first)
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(_) => false,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::security::keygen;
    use crate::security::tls::{self, NodeKey, PeerPolicy, PinnedServerVerifier};
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    fn key() -> NodeKey {
        let (pem, _) = keygen::generate("test").unwrap();
        NodeKey::from_pem(pem.as_bytes()).unwrap()
    }

    fn configs() -> (Arc<rustls::ClientConfig>, Arc<rustls::ServerConfig>) {
        let (client, server) = (key(), key());
        let policy = PeerPolicy {
            pin: Some(server.identity.key),
            ca: None,
        };
        let cc = tls::client_config(&client, PinnedServerVerifier::new(Arc::new(policy))).unwrap();
        (cc, tls::server_config(&server).unwrap())
    }

    /// Bytes that tell where they were in a stream.
    fn data(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// Write `data` in pieces of uneven sizes, then flush.
    async fn send<W: AsyncWrite + Unpin>(w: &mut W, data: &[u8]) {
        let mut at = 0;
        let mut step = 1;
        while at < data.len() {
            let n = step.min(data.len() - at);
            w.write_all(&data[at..at + n]).await.unwrap();
            at += n;
            step = (step * 7 + 3) % 70_000 + 1;
        }
        w.flush().await.unwrap();
    }

    async fn pair() -> (Conn, Conn) {
        let (cc, sc) = configs();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let t = Duration::from_secs(10);
        let server = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            Conn::tls_accept(s, sc, t).await.unwrap()
        });
        let c = TcpStream::connect(addr).await.unwrap();
        let client = Conn::tls_connect(c, cc, t).await.unwrap();
        (client, server.await.unwrap())
    }

    /// Both directions at once, several MiB in uneven writes; a shutdown
    /// (close_notify) is the end of the stream.
    #[tokio::test]
    async fn data_crosses_both_ways_through_the_record_layer() {
        let (mut c, mut s) = pair().await;
        assert!(c.is_tls() && s.suite().is_some_and(|x| x.contains("AES_128_GCM")));
        let (to_s, to_c) = (data(3 << 20, 1), data(1 << 20, 2));
        let (a, b) = (to_s.clone(), to_c.clone());
        let server = tokio::spawn(async move {
            send(&mut s, &b).await;
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            s.shutdown().await.unwrap();
            got
        });
        send(&mut c, &a).await;
        c.shutdown().await.unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).await.unwrap();
        assert!(got == to_c, "server to client differs");
        assert!(server.await.unwrap() == to_s, "client to server differs");
    }

    /// The record layer agrees with rustls' own: a rustls client (its
    /// complete stream, in a thread) sends to it and reads from it.
    #[tokio::test]
    async fn interoperates_with_rustls_own_record_layer() {
        let (cc, sc) = configs();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let t = Duration::from_secs(10);
        let server = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let mut s = Conn::tls_accept(s, sc, t).await.unwrap();
            let mut got = vec![0u8; 2 << 20];
            s.read_exact(&mut got).await.unwrap();
            send(&mut s, &got[..1 << 20]).await;
            s.shutdown().await.unwrap();
            got
        });
        let sent = data(2 << 20, 5);
        let to_send = sent.clone();
        let back = tokio::task::spawn_blocking(move || {
            use std::io::{Read, Write};
            let tcp = std::net::TcpStream::connect(addr).unwrap();
            let conn = rustls::ClientConnection::new(cc, tls::peer_name()).unwrap();
            let mut s = rustls::StreamOwned::new(conn, tcp);
            for chunk in to_send.chunks(100_000) {
                s.write_all(chunk).unwrap();
            }
            s.flush().unwrap();
            let mut back = Vec::new();
            s.read_to_end(&mut back).unwrap();
            back
        })
        .await
        .unwrap();
        assert!(server.await.unwrap() == sent);
        assert!(back == sent[..1 << 20], "rustls read our records wrong");
    }

    /// A key update from rustls (what a peer that rekeys in band sends)
    /// after some data: the data before it arrives, the read after it
    /// fails with an error that names it, and nothing sent under the new
    /// keys is returned.
    #[tokio::test]
    async fn a_key_update_is_refused_with_an_error_that_names_it() {
        let (cc, sc) = configs();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let t = Duration::from_secs(10);
        let server = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let mut s = Conn::tls_accept(s, sc, t).await.unwrap();
            let mut first = vec![0u8; 100_000];
            s.read_exact(&mut first).await.unwrap();
            let mut rest = Vec::new();
            let err = s.read_to_end(&mut rest).await.unwrap_err();
            (first, rest, err)
        });
        let (before, after) = (data(100_000, 3), data(50_000, 4));
        let (b, a) = (before.clone(), after.clone());
        let client = tokio::task::spawn_blocking(move || {
            use std::io::Write;
            let tcp = std::net::TcpStream::connect(addr).unwrap();
            let conn = rustls::ClientConnection::new(cc, tls::peer_name()).unwrap();
            let mut s = rustls::StreamOwned::new(conn, tcp);
            s.write_all(&b).unwrap();
            s.flush().unwrap();
            s.conn.refresh_traffic_keys().unwrap();
            // The server may already have closed: these may fail.
            let _ = s.write_all(&a);
            let _ = s.flush();
        });
        let (first, rest, err) = server.await.unwrap();
        client.await.unwrap();
        assert!(first == before, "the data before the key update differs");
        assert!(
            rest.is_empty(),
            "{} bytes read after the key update",
            rest.len()
        );
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(
            err.to_string().contains("TLS key update"),
            "the error does not name the key update: {err}"
        );
    }

    /// A changed byte on the wire: the reader fails, it does not return
    /// the altered data.
    #[tokio::test]
    async fn a_changed_byte_fails_the_read() {
        let (mut c, s) = pair().await;
        let Conn::Tls(mut s) = s else { panic!("TLS") };
        let mut wire = Vec::new();
        s.tx.seal(&data(40_000, 9), &mut wire).unwrap();
        wire[20_000] ^= 0x40;
        s.tcp.write_all(&wire).await.unwrap();
        let mut got = vec![0u8; 40_000];
        let err = c.read_exact(&mut got).await.unwrap_err();
        assert!(
            err.to_string().contains("cannot decrypt peer's message"),
            "{err}"
        );
    }
}
