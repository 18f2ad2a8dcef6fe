//! `hastctl events`: a control connection that asked for EVENTS becomes a
//! watcher. It takes its place on the event bus first, then sends the
//! state of the resources asked for (from the main loop, as for STATUS)
//! as `exists` records and an `end_of_state` frame, then, unless the
//! request said `now`, every event of those resources as it happens.
//!
//! A watcher never slows the daemon: publishing does not wait for it. One
//! that stops reading is dropped once a write has waited
//! [`WRITE_TIMEOUT`] or it fell more than [`crate::events::CAPACITY`]
//! events behind (it is told why, when it can still be told); one that
//! went away is dropped as soon as its connection reads as closed.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::sync::{broadcast, mpsc, oneshot};

use super::control_server::ControlRequest;
use crate::control::status::StatusReply;
use crate::control::{parse_request, Extension};
use crate::events::{self, Record};
use crate::nv::Nv;
use crate::proto;

/// Longest a write to a watcher may wait before the watcher is dropped.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serve the watcher on `stream`, whose request (EVENTS) is `request`;
/// the state comes from the main loop through `requests`.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    request: Nv,
    requests: mpsc::Sender<ControlRequest>,
) {
    let Ok(cmd) = parse_request(&request) else {
        return;
    };
    let Some(Extension::Events { now, statistics }) = cmd.extension else {
        return;
    };
    // On the bus before the state is taken: nothing that happens after
    // the state is missed.
    let mut rx = events::subscribe();
    let (tx, reply) = oneshot::channel();
    if requests
        .send(ControlRequest {
            nv: request,
            reply: tx,
        })
        .await
        .is_err()
    {
        return;
    }
    let Ok(state) = reply.await else {
        return;
    };
    let (mut rd, mut wr) = tokio::io::split(stream);
    let status = StatusReply::from_nv(&state);
    let names = cmd.resources;
    for r in Record::state(&status, statistics, 0) {
        if write(&mut wr, &r.to_nv()).await.is_err() {
            return;
        }
    }
    let mut end = Nv::new();
    end.add_u8(events::END_OF_STATE, 1);
    if write(&mut wr, &end).await.is_err() || now {
        return;
    }
    let mut scratch = [0u8; 256];
    loop {
        let record = tokio::select! {
            r = rx.recv() => r,
            // Anything after the request is ignored; the end of the
            // connection ends the watcher.
            n = rd.read(&mut scratch) => match n {
                Ok(0) | Err(_) => {
                    tracing::debug!("event watcher went away");
                    return;
                }
                Ok(_) => continue,
            },
        };
        let record = match record {
            Ok(r) => r,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                let why = format!(
                    "this watcher fell {n} events behind (more than {} unread); reconnect to go on",
                    events::CAPACITY
                );
                tracing::warn!("event watcher dropped: {why}");
                let mut nv = Nv::new();
                nv.add_string(events::DROPPED, why);
                let _ = write(&mut wr, &nv).await;
                return;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        if names
            .as_ref()
            .is_some_and(|n| !n.iter().any(|n| *n == record.resource))
        {
            continue;
        }
        if let Err(why) = write(&mut wr, &record.to_nv()).await {
            tracing::warn!("event watcher dropped: {why}");
            return;
        }
    }
}

/// Write one frame within [`WRITE_TIMEOUT`].
async fn write<W: AsyncWrite + Unpin>(w: &mut W, nv: &Nv) -> Result<(), String> {
    match tokio::time::timeout(WRITE_TIMEOUT, proto::write_frame_async(w, nv, &[])).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("writing to it failed: {e}")),
        Err(_) => Err(format!(
            "it read nothing for {WRITE_TIMEOUT:?} (a watcher that stops reading is dropped)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Kind;
    use crate::proto::Limits;

    async fn read(c: &mut tokio::io::DuplexStream) -> Result<Nv, proto::ProtoError> {
        proto::read_frame_async(c, Limits::HEADERS_ONLY)
            .await
            .map(|(nv, _)| nv)
    }

    /// A watcher gets the state, then the events of its resources in order;
    /// one that never reads is dropped without holding anyone.
    #[tokio::test]
    // The guard keeps other bulk publishers off the process's bus for the
    // whole test; nothing else takes it, so holding it across awaits is
    // harmless.
    #[allow(clippy::await_holding_lock)]
    async fn state_then_events_and_a_stalled_watcher_is_dropped() {
        let _bulk = events::BULK_TEST.lock().unwrap_or_else(|p| p.into_inner());
        let (tx, mut rx) = mpsc::channel::<ControlRequest>(4);
        tokio::spawn(async move {
            while let Some(req) = rx.recv().await {
                let mut nv = Nv::new();
                nv.add_string("resource0", "watch-a")
                    .add_string("role0", "init");
                let _ = req.reply.send(nv);
            }
        });
        let names = vec!["watch-a".to_string()];
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let watcher = tokio::spawn(serve(
            server,
            crate::control::events_request(&names, false, false),
            tx.clone(),
        ));
        let state = Record::from_nv(&read(&mut client).await.unwrap()).unwrap();
        assert_eq!(
            (state.event.as_str(), state.resource.as_str()),
            ("exists", "watch-a")
        );
        let end = read(&mut client).await.unwrap();
        assert_eq!(end.get_u8(events::END_OF_STATE), Some(1));

        // A stalled watcher of the same resource, on a tiny pipe.
        let (stalled_client, stalled_server) = tokio::io::duplex(64);
        let stalled = tokio::spawn(serve(
            stalled_server,
            crate::control::events_request(&names, false, false),
            tx.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let start = std::time::Instant::now();
        for i in 0..(events::CAPACITY as u64 * 2) {
            events::publish(
                "watch-b",
                Kind::Timeout {
                    what: "other".into(),
                    secs: i,
                },
            );
            events::publish(
                "watch-a",
                Kind::SyncProgress {
                    done: i,
                    total: 0,
                    rate: 0,
                },
            );
            // Read ours as they come.
            let r = Record::from_nv(&read(&mut client).await.unwrap()).unwrap();
            assert_eq!(r.resource, "watch-a", "only the resource asked for");
            assert_eq!(r.fields[0].1, events::Field::U64(i));
        }
        // Publishing never waited for the stalled one.
        assert!(start.elapsed() < WRITE_TIMEOUT);
        // It lagged behind and was dropped (told why if it could be).
        tokio::time::timeout(Duration::from_secs(30), stalled)
            .await
            .expect("the stalled watcher is dropped")
            .unwrap();
        drop(stalled_client);
        // A watcher whose client is gone ends too.
        drop(client);
        tokio::time::timeout(Duration::from_secs(5), watcher)
            .await
            .expect("a watcher whose client left ends")
            .unwrap();
    }
}
