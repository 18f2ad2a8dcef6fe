//! Message framing of protocol version 2 on a replication connection: the
//! sync and async frame readers over the same in-memory stream agree frame
//! by frame, sizes are bounded by the limits, every frame read re-encodes
//! to one that reads back the same, and the replication requests and
//! replies parse (or are refused) as the secondary and primary would, a
//! write's data included.
#![no_main]

use hast::nv::Value;
use hast::payload;
use hast::proto::{self, Limits, ProtoError};
use hast::wire::{Cmd, RequestLimits as WireLimits, Reply, Request};
use hast_fuzz::{runtime, FRAME_MAX_PAYLOAD};
use libfuzzer_sys::fuzz_target;

const LIMITS: Limits = Limits::replication(FRAME_MAX_PAYLOAD);

const SECONDARY: WireLimits = WireLimits {
    sectorsize: 512,
    datasize: 1 << 30,
    max_length: FRAME_MAX_PAYLOAD as u64,
};

/// Whether the two readers' outcomes are the same frame or the same error.
fn same(
    a: &Result<(hast::nv::Nv, Vec<u8>), ProtoError>,
    b: &Result<(hast::nv::Nv, Vec<u8>), ProtoError>,
) -> bool {
    match (a, b) {
        (Ok(x), Ok(y)) => x == y,
        (Err(x), Err(y)) => x.to_string() == y.to_string(),
        _ => false,
    }
}

fn check_request(nv: &hast::nv::Nv) {
    match Request::from_nv(nv, &SECONDARY) {
        Ok(req) => {
            if matches!(req.cmd, Cmd::Read | Cmd::Write | Cmd::Delete) {
                assert!(req.length > 0);
                assert_eq!(req.offset % 512, 0);
                assert_eq!(req.length % 512, 0);
                assert!(req.offset + req.length <= SECONDARY.datasize);
            }
            if req.cmd != Cmd::Delete {
                assert!(req.length <= SECONDARY.max_length);
            }
            // What the primary would send for it parses to the same request
            // (a keepalive carries no seq).
            let again = Request::from_nv(&req.to_nv(), &SECONDARY).expect("own request parses");
            let want = if req.cmd == Cmd::Keepalive {
                Request { seq: 0, ..req }
            } else {
                req
            };
            assert_eq!(again, want);
        }
        Err((seq, _)) => {
            // The error carries the request's seq when it had one.
            assert!(seq == 0 || nv.get_u64("seq") == Some(seq));
        }
    }
    if let Some(reply) = Reply::from_nv(nv) {
        assert_ne!(reply.seq, 0);
        assert_eq!(Reply::from_nv(&reply.to_nv()), Some(reply));
    }
}

fuzz_target!(|data: &[u8]| {
    let mut sync_reader = data;
    let mut async_reader = data;
    runtime().block_on(async {
        loop {
            let s = proto::read_frame(&mut sync_reader, LIMITS);
            let a = proto::read_frame_async(&mut async_reader, LIMITS).await;
            assert!(same(&s, &a), "sync reader: {s:?}, async reader: {a:?}");
            assert_eq!(sync_reader.len(), async_reader.len());
            let Ok((nv, payload)) = s else { break };
            assert!(payload.len() <= FRAME_MAX_PAYLOAD);
            match nv.get(proto::SIZE_FIELD) {
                Some(Value::Uint32(n)) => assert_eq!(*n as usize, payload.len()),
                None => assert!(payload.is_empty()),
                Some(other) => panic!("frame read with a {} size", other.type_name()),
            }
            check_request(&nv);
            // A write's data as the secondary decodes it.
            if let Ok(req) = Request::from_nv(&nv, &SECONDARY) {
                if req.cmd == Cmd::Write {
                    let len = req.length as usize;
                    if let Ok(block) = payload::decode(&nv, payload.clone(), len, FRAME_MAX_PAYLOAD)
                    {
                        assert_eq!(block.len(), len);
                    }
                }
            }
            // Re-encoded, it reads back as itself (names that were not
            // UTF-8 may no longer fit: those are skipped).
            if let Ok(bytes) = proto::encode_frame(&nv, &payload) {
                let (nv2, p2) =
                    proto::read_frame(&mut &bytes[..], LIMITS).expect("own frame reads back");
                assert_eq!((nv2, p2), (nv, payload));
            }
        }
    });
});
