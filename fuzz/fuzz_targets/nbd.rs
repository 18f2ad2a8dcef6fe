//! The NBD server's option haggling and request parsing, driven through the
//! real server task: the input is what a client sends on one connection
//! (an in-memory duplex stream), then the client half-closes and reads
//! everything the server answers until it closes. The server must finish
//! (no hang), never hand the backend a request outside the export or not
//! aligned, and answer in a well-formed stream: the greeting first, then
//! option replies with their magic until the transmission phase.
#![no_main]

use std::sync::{Arc, OnceLock};

use hast::nbd::proto as nbd;
use hast::nbd::{Registry, Server, ServerConfig};
use hast_fuzz::{runtime, MemBackend, NBD_EXPORT};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Fixture {
    server: Server,
    backend: Arc<MemBackend>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let backend = Arc::new(MemBackend::default());
        let registry = Registry::new();
        registry
            .add(NBD_EXPORT, backend.clone())
            .expect("the export registers");
        let config = ServerConfig {
            max_payload: 64 * 1024,
            preferred_block: 4096,
            inflight_bytes: 1 << 20,
            handshake_timeout: None,
        };
        let server = Server::new(registry, config).expect("a valid server config");
        Fixture { server, backend }
    })
}

/// Checks the start of what the server sent: the greeting, then option
/// replies as long as they parse (the transmission phase, whose start
/// depends on the option, is not followed further).
fn check_stream(out: &[u8]) {
    let greeting = nbd::greeting();
    assert!(out.len() >= greeting.len(), "no greeting: {out:?}");
    assert_eq!(&out[..greeting.len()], &greeting[..]);
    let mut rest = &out[greeting.len()..];
    while let Some((head, tail)) = rest.split_first_chunk::<20>() {
        let magic = u64::from_be_bytes(head[..8].try_into().unwrap_or_default());
        if magic != nbd::REPLY_OPT_MAGIC {
            break;
        }
        let len = u32::from_be_bytes(head[16..20].try_into().unwrap_or_default()) as usize;
        assert!(len <= tail.len(), "option reply of {len} bytes truncated");
        rest = &tail[len..];
    }
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let out = runtime().block_on(async {
        let (mut client, server_end) = tokio::io::duplex(64 * 1024);
        f.server.serve_stream(server_end);
        let (mut rd, mut wr) = tokio::io::split(&mut client);
        let send = async {
            // The server may close before reading everything.
            let _ = wr.write_all(data).await;
            let _ = wr.shutdown().await;
        };
        let mut out = Vec::new();
        let recv = rd.read_to_end(&mut out);
        let ((), got) = tokio::join!(send, recv);
        got.expect("reading the server's answers");
        out
    });
    assert!(
        !f.backend.take_violation(),
        "the backend got an unchecked request"
    );
    check_stream(&out);
});
