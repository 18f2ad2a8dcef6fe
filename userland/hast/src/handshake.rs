//! The connection handshake of protocol version 2, as nv messages: what
//! each side sends and the checks on what it receives. The primary opens
//! connection 1 (requests and handshake replies) and connection 2 (replies
//! from the secondary); the token proves both come from the same node.

use crate::nv::Nv;
use crate::payload::PayloadError;
use crate::splitbrain::SyncSrc;

/// Size of the token the secondary hands out.
pub const TOKEN_SIZE: usize = 16;

/// A handshake message that does not say what it must.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("handshake header has no '{0}' field (or it has the wrong type)")]
    Missing(&'static str),
    #[error("handshake header carries a token of {0} bytes, expected {TOKEN_SIZE}")]
    TokenSize(usize),
    #[error("peer speaks protocol version {0}, this node at most {max}", max = crate::proto::HAST_PROTO_VERSION)]
    Version(u8),
    #[error("peer refused: {0}")]
    Refused(String),
    /// The secondary found that both copies were written while apart
    /// (its refusal carries the reference's split-brain message).
    #[error("peer refused: {SPLIT_BRAIN_MSG} (both nodes were written while apart; see hastctl(8) for the recovery)", SPLIT_BRAIN_MSG = crate::splitbrain::SPLIT_BRAIN_MSG)]
    SplitBrain,
    #[error("invalid syncsrc {0} in handshake reply")]
    SyncSrc(u8),
}

/// Step 1, primary -> secondary on connection 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub resource: String,
    pub version: u8,
}

impl Hello {
    pub fn to_nv(&self) -> Nv {
        let mut nv = Nv::new();
        nv.add_string("resource", self.resource.as_str())
            .add_u8("version", self.version);
        nv
    }

    /// Parse a step-1 header. A first connection carries no token; a header
    /// with a token is step 2 ([`Attach`]).
    pub fn from_nv(nv: &Nv) -> Result<Hello, HandshakeError> {
        let resource = nv
            .get_string("resource")
            .ok_or(HandshakeError::Missing("resource"))?
            .to_string();
        // A peer that sends no version speaks version 1.
        let version = nv.get_u8("version").filter(|&v| v != 0).unwrap_or(1);
        Ok(Hello { resource, version })
    }
}

/// Step 1 answer, secondary -> primary on connection 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Welcome {
    Accepted {
        version: u8,
        token: [u8; TOKEN_SIZE],
    },
    /// Refused; `wait` when the secondary is (still) primary itself.
    Refused { errmsg: String, wait: bool },
}

impl Welcome {
    pub fn to_nv(&self) -> Nv {
        let mut nv = Nv::new();
        match self {
            Welcome::Accepted { version, token } => {
                nv.add_u8("version", *version)
                    .add_u8_array("token", token.to_vec());
            }
            Welcome::Refused { errmsg, wait } => {
                nv.add_string("errmsg", errmsg.as_str());
                if *wait {
                    nv.add_u8("wait", 1);
                }
            }
        }
        nv
    }

    pub fn from_nv(nv: &Nv) -> Result<Welcome, HandshakeError> {
        if let Some(msg) = nv.get_string("errmsg") {
            return Ok(Welcome::Refused {
                errmsg: msg.to_string(),
                wait: nv.get("wait").is_some(),
            });
        }
        let version = nv.get_u8("version").filter(|&v| v != 0).unwrap_or(1);
        if version > crate::proto::HAST_PROTO_VERSION {
            return Err(HandshakeError::Version(version));
        }
        let raw = nv
            .get_u8_array("token")
            .ok_or(HandshakeError::Missing("token"))?;
        let token: [u8; TOKEN_SIZE] = raw
            .try_into()
            .map_err(|_| HandshakeError::TokenSize(raw.len()))?;
        Ok(Welcome::Accepted { version, token })
    }
}

/// Step 2, primary -> secondary on connection 2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attach {
    pub resource: String,
    pub token: [u8; TOKEN_SIZE],
    /// The primary's provider was never written (its resuid was just made).
    pub virgin: bool,
    pub resuid: u64,
    pub localcnt: u64,
    pub remotecnt: u64,
    /// Extension (nv `synctrack`, ignored by the reference): this primary
    /// sends synchronization marks ([`SYNC_MARK_FIELD`]) to a secondary
    /// that announces [`Geometry::synctrack`]; such a secondary keeps its
    /// activemap until the first `done` mark instead of clearing it at the
    /// first request.
    pub synctrack: bool,
}

/// The nv field announcing [`Attach::synctrack`] / [`Geometry::synctrack`].
pub const SYNCTRACK_FIELD: &str = "synctrack";

/// Extension: a KEEPALIVE carrying this string field marks the start
/// ([`SYNC_MARK_START`]) of a synchronization toward the secondary, before
/// its first write, and the point ([`SYNC_MARK_DONE`]) where everything
/// synchronized is flushed on both sides and nothing is left to
/// synchronize. The secondary records the first durably (its copy is
/// inconsistent until the second) before it reads the next request.
pub const SYNC_MARK_FIELD: &str = "sync";
/// See [`SYNC_MARK_FIELD`].
pub const SYNC_MARK_START: &str = "start";
/// See [`SYNC_MARK_FIELD`].
pub const SYNC_MARK_DONE: &str = "done";

impl Attach {
    pub fn to_nv(&self) -> Nv {
        let mut nv = Nv::new();
        nv.add_string("resource", self.resource.as_str())
            .add_u8_array("token", self.token.to_vec());
        if self.virgin {
            nv.add_i8("virgin", 1);
        }
        nv.add_u64("resuid", self.resuid)
            .add_u64("localcnt", self.localcnt)
            .add_u64("remotecnt", self.remotecnt);
        if self.synctrack {
            nv.add_u8(SYNCTRACK_FIELD, 1);
        }
        nv
    }

    pub fn from_nv(nv: &Nv) -> Result<Attach, HandshakeError> {
        let resource = nv
            .get_string("resource")
            .ok_or(HandshakeError::Missing("resource"))?
            .to_string();
        let raw = nv
            .get_u8_array("token")
            .ok_or(HandshakeError::Missing("token"))?;
        let token: [u8; TOKEN_SIZE] = raw
            .try_into()
            .map_err(|_| HandshakeError::TokenSize(raw.len()))?;
        let get = |name: &'static str| nv.get_u64(name).ok_or(HandshakeError::Missing(name));
        Ok(Attach {
            resource,
            token,
            virgin: nv.get("virgin").is_some(),
            resuid: get("resuid")?,
            localcnt: get("localcnt")?,
            remotecnt: get("remotecnt")?,
            synctrack: nv.get_u8(SYNCTRACK_FIELD) == Some(1),
        })
    }
}

/// Step 2 answer, secondary -> primary on connection 1, followed by
/// `mapsize` bytes of the secondary's activemap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Geometry {
    pub datasize: i64,
    pub extentsize: i32,
    pub localcnt: u64,
    pub remotecnt: u64,
    /// The secondary adopted the primary's resource id just now.
    pub virgin: bool,
    pub syncsrc: SyncSrc,
    pub mapsize: u32,
    /// Extension: the largest READ/WRITE the secondary accepts (`maxio`,
    /// ignored by the reference, which accepts its MAXPHYS).
    pub maxio: Option<u32>,
    /// Extension: the secondary understands the synchronization marks
    /// ([`SYNC_MARK_FIELD`]; see [`Attach::synctrack`]).
    pub synctrack: bool,
}

/// What a peer that does not announce `maxio` accepts: FreeBSD 12's MAXPHYS
/// (13 and later accept 1 MiB).
pub const DEFAULT_MAXIO: u32 = 128 * 1024;

impl Geometry {
    pub fn to_nv(&self) -> Nv {
        let mut nv = Nv::new();
        nv.add_i64("datasize", self.datasize)
            .add_i32("extentsize", self.extentsize)
            .add_u64("localcnt", self.localcnt)
            .add_u64("remotecnt", self.remotecnt);
        if self.virgin {
            nv.add_i8("virgin", 1);
        }
        nv.add_u8("syncsrc", self.syncsrc.to_u8())
            .add_u32("mapsize", self.mapsize);
        if let Some(m) = self.maxio {
            nv.add_u32("maxio", m);
        }
        if self.synctrack {
            nv.add_u8(SYNCTRACK_FIELD, 1);
        }
        nv
    }

    /// Parse the answer; an `errmsg` is returned as [`HandshakeError::SplitBrain`]
    /// or [`HandshakeError::Refused`].
    pub fn from_nv(nv: &Nv) -> Result<Geometry, HandshakeError> {
        if let Some(msg) = nv.get_string("errmsg") {
            if msg == crate::splitbrain::SPLIT_BRAIN_MSG {
                return Err(HandshakeError::SplitBrain);
            }
            return Err(HandshakeError::Refused(msg.to_string()));
        }
        let raw_src = nv
            .get_u8("syncsrc")
            .ok_or(HandshakeError::Missing("syncsrc"))?;
        Ok(Geometry {
            datasize: nv
                .get_i64("datasize")
                .ok_or(HandshakeError::Missing("datasize"))?,
            extentsize: nv
                .get_i32("extentsize")
                .ok_or(HandshakeError::Missing("extentsize"))?,
            localcnt: nv
                .get_u64("localcnt")
                .ok_or(HandshakeError::Missing("localcnt"))?,
            remotecnt: nv
                .get_u64("remotecnt")
                .ok_or(HandshakeError::Missing("remotecnt"))?,
            virgin: nv.get("virgin").is_some(),
            syncsrc: SyncSrc::from_u8(raw_src).ok_or(HandshakeError::SyncSrc(raw_src))?,
            mapsize: nv.get_u32("mapsize").unwrap_or(0),
            maxio: nv.get_u32("maxio"),
            synctrack: nv.get_u8(SYNCTRACK_FIELD) == Some(1),
        })
    }
}

/// How many bytes a peer's activemap may exceed this node's: a peer with a
/// larger sector size rounds its map up further, by less than one 64 KiB
/// sector.
pub const MAP_SLACK: usize = 64 * 1024;

/// Decodes the activemap a secondary sends after its [`Geometry`] (the
/// payload of that message, through the data pipeline like any data
/// payload: a clean map hole-compressed to 4 bytes, a checksum verified) to
/// exactly `ours` bytes, this node's map size. Only `mapsize` tells its
/// decoded length; bits past our extents (a peer with another sector size
/// rounds the map up differently) are padding. A `mapsize` more than
/// [`MAP_SLACK`] above `ours` is refused before anything is allocated for
/// it.
pub fn decode_peer_map(
    nv: &Nv,
    payload: Vec<u8>,
    mapsize: u32,
    ours: usize,
) -> Result<Vec<u8>, PayloadError> {
    let theirs = usize::try_from(mapsize).unwrap_or(usize::MAX);
    let mut map = crate::payload::decode(nv, payload, theirs, ours.saturating_add(MAP_SLACK))?;
    map.resize(ours, 0);
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(nv: &Nv) -> Nv {
        Nv::decode(&nv.encode().unwrap()).unwrap()
    }

    #[test]
    fn messages_round_trip_with_the_reference_field_types() {
        let hello = Hello {
            resource: "data".into(),
            version: 2,
        };
        assert_eq!(Hello::from_nv(&round(&hello.to_nv())).unwrap(), hello);
        let w = Welcome::Accepted {
            version: 2,
            token: [7; TOKEN_SIZE],
        };
        assert_eq!(Welcome::from_nv(&round(&w.to_nv())).unwrap(), w);
        let a = Attach {
            resource: "data".into(),
            token: [9; TOKEN_SIZE],
            virgin: true,
            resuid: 42,
            localcnt: 3,
            remotecnt: 2,
            synctrack: true,
        };
        let nv = a.to_nv();
        assert!(matches!(nv.get("virgin"), Some(crate::nv::Value::Int8(1))));
        assert_eq!(Attach::from_nv(&round(&nv)).unwrap(), a);
        // Without the extension, nothing of it goes on the wire.
        let plain = Attach {
            synctrack: false,
            ..a.clone()
        };
        assert!(plain.to_nv().get(SYNCTRACK_FIELD).is_none());
        assert_eq!(Attach::from_nv(&round(&plain.to_nv())).unwrap(), plain);
        let g = Geometry {
            datasize: 1 << 30,
            extentsize: 2 << 20,
            localcnt: 1,
            remotecnt: 1,
            virgin: false,
            syncsrc: SyncSrc::Secondary,
            mapsize: 512,
            maxio: Some(1 << 20),
            synctrack: true,
        };
        let nv = g.to_nv();
        assert!(matches!(
            nv.get("datasize"),
            Some(crate::nv::Value::Int64(_))
        ));
        assert!(matches!(
            nv.get("extentsize"),
            Some(crate::nv::Value::Int32(_))
        ));
        assert_eq!(Geometry::from_nv(&round(&nv)).unwrap(), g);
    }

    /// A clean map of `len` bytes as a secondary sends it: hole-compressed
    /// to its length, with the geometry's `mapsize`.
    fn hole_map(len: u32) -> (Nv, Vec<u8>) {
        let mut nv = Nv::new();
        nv.add_u32("mapsize", len).add_string("compression", "hole");
        (nv, len.to_le_bytes().to_vec())
    }

    #[test]
    fn peer_map_is_bounded_by_ours_before_anything_is_allocated() {
        let ours = 512;
        // Up to one 64 KiB sector of rounding is the peer's padding.
        for theirs in [512u32, 4096, 512 + MAP_SLACK as u32] {
            let (nv, payload) = hole_map(theirs);
            let map = decode_peer_map(&nv, payload, theirs, ours).unwrap();
            assert_eq!(map, vec![0u8; ours], "mapsize {theirs}");
        }
        // Found by the handshake fuzz target: a hole-compressed map
        // announced at nearly 4 GiB was allocated (and zeroed) in full.
        for theirs in [512 + MAP_SLACK as u32 + 1, 2 << 20, u32::MAX] {
            let (nv, payload) = hole_map(theirs);
            let err = decode_peer_map(&nv, payload, theirs, ours).unwrap_err();
            assert_eq!(
                err.kind,
                crate::payload::PayloadErrorKind::TooLarge {
                    len: theirs as usize,
                    max: ours + MAP_SLACK
                },
                "mapsize {theirs}"
            );
        }
    }

    #[test]
    fn refusals_and_bad_headers() {
        let r = Welcome::Refused {
            errmsg: "Remote node acts as primary for the resource and not as secondary.".into(),
            wait: true,
        };
        assert_eq!(Welcome::from_nv(&r.to_nv()).unwrap(), r);
        let mut nv = Nv::new();
        nv.add_u8("version", 2).add_u8_array("token", vec![1, 2, 3]);
        assert_eq!(Welcome::from_nv(&nv), Err(HandshakeError::TokenSize(3)));
        let mut nv = Nv::new();
        nv.add_u8("version", 3).add_u8_array("token", vec![0; 16]);
        assert_eq!(Welcome::from_nv(&nv), Err(HandshakeError::Version(3)));
        let mut nv = Nv::new();
        nv.add_string("errmsg", crate::splitbrain::SPLIT_BRAIN_MSG);
        assert_eq!(Geometry::from_nv(&nv), Err(HandshakeError::SplitBrain));
        let mut nv = Nv::new();
        nv.add_string("errmsg", "Resource unique ID mismatch.");
        assert_eq!(
            Geometry::from_nv(&nv),
            Err(HandshakeError::Refused(
                "Resource unique ID mismatch.".into()
            ))
        );
        let mut nv = Nv::new();
        nv.add_string("resource", "r");
        assert_eq!(Attach::from_nv(&nv), Err(HandshakeError::Missing("token")));
        // No version means protocol version 1.
        let mut nv = Nv::new();
        nv.add_string("resource", "r");
        assert_eq!(Hello::from_nv(&nv).unwrap().version, 1);
    }
}
