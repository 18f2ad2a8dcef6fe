//! The control socket as hastd serves it: the input is what a client sends
//! on one connection. The real per-client handler reads the request
//! (bounded), the request is parsed as the daemon parses it, and a reply
//! built the way the daemon builds one for resources it does not have goes
//! back; the client side must then read a well-formed reply (or nothing,
//! when the request had no `cmd`). The names of a request are read as a
//! lookup per index would read them, and come back in order.
#![no_main]

use hast::control::{self, EHAST_NOENTRY};
use hast::engine::control_server::{handle_client, ControlRequest};
use hast::nv::Nv;
use hast::proto::{self, Limits};
use hast_fuzz::runtime;
use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

/// The reply hastd sends, for a daemon that has only the resource `data`
/// (in role init) and answers every SETROLE with "not found".
fn answer(req: &Nv) -> Option<(Nv, Vec<String>)> {
    let parsed = match control::parse_request(req) {
        Ok(p) => p,
        Err(e) => return e.reply().map(|nv| (nv, Vec::new())),
    };
    let names = parsed.resources.unwrap_or_else(|| vec!["data".to_string()]);
    let mut out = Nv::new();
    for (no, name) in names.iter().enumerate() {
        out.add_string(format!("resource{no}"), name.as_str());
        if name == "data" && parsed.role.is_none() {
            out.add_string(format!("role{no}"), "init");
        } else {
            out.add_i16(format!("error{no}"), EHAST_NOENTRY);
        }
    }
    Some((out, names))
}

/// The names of a request as a lookup per index sees them (what
/// `resource_names` must agree with).
fn names_by_lookup(nv: &Nv) -> Vec<String> {
    (0u32..)
        .map_while(|i| nv.get_string(&format!("resource{i}")).map(str::to_string))
        .collect()
}

fuzz_target!(|data: &[u8]| {
    if let Ok((nv, _)) = proto::read_frame(&mut &data[..], Limits::HEADERS_ONLY) {
        assert_eq!(control::resource_names(&nv), names_by_lookup(&nv));
    }

    runtime().block_on(async {
        let (mut client, server_end) = tokio::io::duplex(64 * 1024);
        let (tx, mut rx) = mpsc::channel::<ControlRequest>(1);
        let server = tokio::spawn(handle_client(server_end, tx));
        let daemon = async {
            let ControlRequest { nv, reply } = rx.recv().await?;
            let (out, names) = answer(&nv)?;
            let _ = reply.send(out.clone());
            Some((out, names))
        };
        let client_side = async {
            let _ = client.write_all(data).await;
            let _ = client.shutdown().await;
            proto::read_frame_async(&mut client, Limits::HEADERS_ONLY).await
        };
        let (sent, got) = tokio::join!(daemon, client_side);
        server.await.expect("the control handler does not panic");
        match (sent, got) {
            (Some((out, names)), Ok((reply, payload))) => {
                assert!(payload.is_empty());
                assert_eq!(reply, out);
                // hastctl reads the names back in order.
                assert_eq!(control::resource_names(&reply), names);
            }
            // A reply too large for a frame is not sent.
            (Some((out, _)), Err(_)) => assert!(out.encode().is_err()),
            (None, Ok(r)) => panic!("a reply nobody sent: {r:?}"),
            (None, Err(_)) => {}
        }
    });
});
