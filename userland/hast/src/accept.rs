//! The one accept loop of every listening socket (the control socket, the
//! replication listeners, the NBD export): connections go to a handler as
//! they come; a failed accept (out of descriptors, say) is logged and
//! retried after a short pause instead of spinning or ending the loop.

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;

/// The pause after a failed accept.
const RETRY: Duration = Duration::from_millis(50);

/// A socket connections are accepted from: TCP or Unix.
pub trait Listener: Send + 'static {
    type Stream: Send + 'static;
    type Peer: Send + 'static;
    fn accept_one(
        &self,
    ) -> impl Future<Output = std::io::Result<(Self::Stream, Self::Peer)>> + Send;
}

impl Listener for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    type Peer = std::net::SocketAddr;
    fn accept_one(
        &self,
    ) -> impl Future<Output = std::io::Result<(Self::Stream, Self::Peer)>> + Send {
        self.accept()
    }
}

impl Listener for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    type Peer = tokio::net::unix::SocketAddr;
    fn accept_one(
        &self,
    ) -> impl Future<Output = std::io::Result<(Self::Stream, Self::Peer)>> + Send {
        self.accept()
    }
}

/// Accept on `listener` (described as `what` in logs) and give each
/// connection to `each`, until `stop` turns true (never, without one).
/// Returns the listener so the caller can close it where it must.
pub async fn serve<L: Listener>(
    listener: L,
    what: &str,
    mut stop: Option<watch::Receiver<bool>>,
    mut each: impl FnMut(L::Stream, L::Peer) + Send,
) -> L {
    loop {
        let accepted = match stop.as_mut() {
            Some(stop) => tokio::select! {
                _ = stopped(stop) => return listener,
                a = listener.accept_one() => a,
            },
            None => listener.accept_one().await,
        };
        match accepted {
            Ok((stream, peer)) => each(stream, peer),
            Err(e) => {
                tracing::warn!("unable to accept a connection on {what}: {e}");
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}

/// Completes when the watched flag becomes true; never if its sender is
/// gone without having set it.
pub async fn stopped(rx: &mut watch::Receiver<bool>) {
    if rx.wait_for(|v| *v).await.is_err() {
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every connection reaches the handler; the loop ends on `stop` and
    /// gives the listener back.
    #[tokio::test]
    async fn connections_reach_the_handler_until_stopped() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (stop_tx, stop_rx) = watch::channel(false);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(serve(l, "test", Some(stop_rx), move |_s, peer| {
            let _ = tx.send(peer);
        }));
        for _ in 0..3 {
            let _c = tokio::net::TcpStream::connect(addr).await.unwrap();
            assert!(rx.recv().await.is_some());
        }
        stop_tx.send_replace(true);
        let l = task.await.unwrap();
        assert_eq!(l.local_addr().unwrap(), addr);
    }
}
