//! The handshake messages of protocol version 2 as they arrive: a stream of
//! frames, each parsed as every handshake message (hello, its answer, the
//! second connection's attach, the geometry answer with the activemap
//! payload that follows it) and as a promotion probe's answer. Whatever
//! parses re-encodes to the same message; the peer's map decodes to
//! exactly this node's map size without allocating more than that bound.
#![no_main]

use hast::engine::probe;
use hast::handshake::{decode_peer_map, Attach, Geometry, Hello, Welcome, MAP_SLACK, TOKEN_SIZE};
use hast::proto::{self, Limits};
use hast_fuzz::OUR_MAPSIZE;
use libfuzzer_sys::fuzz_target;

/// What the primary accepts for the map frame (link.rs).
const MAP_LIMITS: Limits = Limits::replication(OUR_MAPSIZE + MAP_SLACK);

fuzz_target!(|data: &[u8]| {
    let mut r = data;
    while let Ok((nv, payload)) = proto::read_frame(&mut r, MAP_LIMITS) {
        if let Ok(h) = Hello::from_nv(&nv) {
            assert_ne!(h.version, 0);
            assert_eq!(Hello::from_nv(&h.to_nv()), Ok(h));
        }
        if let Ok(w) = Welcome::from_nv(&nv) {
            if let Welcome::Accepted { version, token } = &w {
                assert!((1..=proto::HAST_PROTO_VERSION).contains(version));
                assert_eq!(token.len(), TOKEN_SIZE);
            }
            assert_eq!(Welcome::from_nv(&w.to_nv()), Ok(w));
        }
        if let Ok(a) = Attach::from_nv(&nv) {
            assert_eq!(Attach::from_nv(&a.to_nv()), Ok(a));
        }
        if let Ok(g) = Geometry::from_nv(&nv) {
            assert_eq!(Geometry::from_nv(&g.to_nv()), Ok(g.clone()));
            if g.mapsize > 0 {
                if let Ok(map) = decode_peer_map(&nv, payload.clone(), g.mapsize, OUR_MAPSIZE) {
                    assert_eq!(map.len(), OUR_MAPSIZE);
                    assert!(g.mapsize as usize <= OUR_MAPSIZE + MAP_SLACK);
                }
            }
        }
        let peer = probe::parse(&nv);
        if let probe::PeerState::Known { role, counters } = peer {
            if role != hast::role::Role::Undef {
                assert_eq!(
                    probe::parse(&probe::answer(role, counters)),
                    probe::PeerState::Known { role, counters }
                );
            }
        }
    }
});
