//! Safe promotion: before a resource becomes primary, ask the peer what it
//! is. A hello carrying the extension field `probe` is answered by a node
//! of this project with its role and counters, without side effects; a
//! FreeBSD hastd ignores the field and answers as to any hello, which still
//! tells when it is primary. Promotion is refused when the peer is primary
//! or holds newer data; an unreachable peer does not stop it.
//!
//! The probe goes over the link the resource's `security` requires (TLS
//! with the peer's key checked; with a shared secret, the answer carries
//! a MAC over the prober's challenge, and one without it counts as no
//! answer).

use crate::config::ResourceConfig;
use crate::handshake::{Hello, MAC_FIELD, NONCE_FIELD};
use crate::nv::Nv;
use crate::proto::{self, Limits, HAST_PROTO_VERSION};
use crate::role::Role;
use crate::security::secret::{self, Nonce, Secret, Step, Transcript, MAC_SIZE, NONCE_SIZE};
use crate::splitbrain::{self, Counters, Decision, SyncSrc};

/// What the peer said about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerState {
    /// Nothing answered (down, unreachable, or `remote none`).
    Unreachable(String),
    /// The peer is primary for the resource.
    Primary,
    /// A node of this project answered with its role and counters.
    Known { role: Role, counters: Counters },
    /// A peer that does not know the probe answered a plain hello (it is
    /// secondary, or refused for another reason).
    Unknown(String),
}

/// Why promotion is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the peer {0} is primary for this resource; demote it first (or force: hastctl role --force primary)")]
    PeerPrimary(String),
    #[error("the peer {peer} holds newer data (peer localcnt {peer_local} > our remotecnt {our_remote}); promote the peer instead (or force: hastctl role --force primary)")]
    PeerNewer {
        peer: String,
        peer_local: u64,
        our_remote: u64,
    },
    #[error("this node's copy is inconsistent: a synchronization from the peer did not finish, so it mixes old and new blocks; promote the peer and let it synchronize this node, or force: hastctl role --force primary (the copy is used as it is)")]
    Inconsistent,
    #[error("this node and the peer {0} both hold changes the other lacks (split-brain); recover first (see hastctl(8)) or force: hastctl role --force primary")]
    SplitBrain(String),
}

/// The answer of this node to a probe for a resource (role and counters).
pub fn answer(role: Role, counters: Counters) -> Nv {
    let mut nv = Nv::new();
    nv.add_u8("probe", 1)
        .add_string("role", role.as_str())
        .add_u64("resuid", counters.resuid)
        .add_u64("localcnt", counters.localcnt)
        .add_u64("remotecnt", counters.remotecnt);
    nv
}

/// The answer to a probe for resource `cfg` whose hello carried the
/// prober's challenge `nonce`: with a shared secret, [`answer`] with this
/// node's nonce and a MAC over both and what it says.
pub fn answer_for(
    cfg: &ResourceConfig,
    nonce: Option<Nonce>,
    role: Role,
    counters: Counters,
) -> Nv {
    let mut nv = answer(role, counters);
    if let (Ok(Some(s)), Some(theirs)) = (super::link::secret_of(cfg), nonce) {
        let ours = secret::nonce();
        let mac = s.mac(
            Step::Probe,
            &probe_transcript(&cfg.name, &theirs, &ours),
            &probe_fields(counters),
            role.as_str().as_bytes(),
        );
        nv.add_u8_array(NONCE_FIELD, ours.to_vec())
            .add_u8_array(MAC_FIELD, mac.to_vec());
    }
    nv
}

fn probe_transcript<'a>(resource: &'a str, prober: &'a Nonce, answer: &'a Nonce) -> Transcript<'a> {
    Transcript {
        resource,
        primary_nonce: prober,
        secondary_nonce: answer,
        token: &[],
    }
}

fn probe_fields(c: Counters) -> [u64; 3] {
    [c.resuid, c.localcnt, c.remotecnt]
}

/// Whether a probe answer carries the right MAC for our challenge `ours`
/// (over the role and counters it states).
fn authentic(nv: &Nv, s: &Secret, resource: &str, ours: &Nonce) -> bool {
    let (Some(theirs), Some(mac)) = (nv.get_u8_array(NONCE_FIELD), nv.get_u8_array(MAC_FIELD))
    else {
        return false;
    };
    let Ok(theirs) = <[u8; NONCE_SIZE]>::try_from(theirs) else {
        return false;
    };
    let get = |n| nv.get_u64(n).unwrap_or(0);
    let counters = Counters {
        resuid: get("resuid"),
        localcnt: get("localcnt"),
        remotecnt: get("remotecnt"),
    };
    mac.len() == MAC_SIZE
        && s.verify(
            Step::Probe,
            &probe_transcript(resource, ours, &theirs),
            &probe_fields(counters),
            nv.get_string("role").unwrap_or("").as_bytes(),
            mac,
        )
}

/// What a peer's answer to a probe says about it.
pub fn parse(nv: &Nv) -> PeerState {
    if nv.get_u8("probe") == Some(1) {
        let role = nv
            .get_string("role")
            .and_then(|r| r.parse::<Role>().ok())
            .unwrap_or(Role::Undef);
        if role == Role::Primary {
            return PeerState::Primary;
        }
        let get = |n| nv.get_u64(n).unwrap_or(0);
        return PeerState::Known {
            role,
            counters: Counters {
                resuid: get("resuid"),
                localcnt: get("localcnt"),
                remotecnt: get("remotecnt"),
            },
        };
    }
    match nv.get_string("errmsg") {
        // The reference's refusal when it is primary itself.
        Some(m) if nv.get("wait").is_some() || m.contains("acts as primary") => PeerState::Primary,
        Some(m) => PeerState::Unknown(m.to_string()),
        None => PeerState::Unknown("peer accepted a plain hello (secondary)".into()),
    }
}

/// Ask the peer of `cfg` what it is.
pub async fn probe(cfg: &ResourceConfig) -> PeerState {
    let Some(remote) = &cfg.remote_addr else {
        return PeerState::Unreachable("remote none".into());
    };
    let secret = match super::link::secret_of(cfg) {
        Ok(s) => s,
        Err(e) => return PeerState::Unreachable(e.to_string()),
    };
    // `probe_timeout` (5 s by default) to connect, and again for the answer.
    let wait = cfg.probe_wait();
    let mut s = match super::link::open(cfg, remote, wait).await {
        Ok(s) => s,
        Err(e) => return PeerState::Unreachable(e.to_string()),
    };
    let nonce = secret.map(|_| secret::nonce());
    let mut hello = Hello {
        resource: cfg.name.clone(),
        version: HAST_PROTO_VERSION,
        nonce,
    }
    .to_nv();
    hello.add_u8("probe", 1);
    let limits = Limits::HEADERS_ONLY;
    let exchange = async {
        proto::write_frame_async(&mut s, &hello, &[]).await?;
        proto::read_frame_async(&mut s, limits).await
    };
    match tokio::time::timeout(wait, exchange).await {
        Ok(Ok((nv, _))) => match (secret, &nonce) {
            (Some(s), Some(ours))
                if nv.get_u8("probe") == Some(1) && !authentic(&nv, s, &cfg.name, ours) =>
            {
                PeerState::Unknown(
                    "the peer's answer failed the shared-secret check (the secretfiles differ?)"
                        .into(),
                )
            }
            _ => parse(&nv),
        },
        Ok(Err(e)) => PeerState::Unreachable(e.to_string()),
        Err(_) => PeerState::Unreachable("no answer".into()),
    }
}

/// Whether this node (counters `ours`) may become primary given the peer.
pub fn decide(peer: &PeerState, ours: Counters, remote: &str) -> Result<(), Refusal> {
    match peer {
        PeerState::Primary => Err(Refusal::PeerPrimary(remote.to_string())),
        PeerState::Known { counters, .. } => {
            // As if the peer were our secondary: who would be out of date?
            match splitbrain::decide(*counters, ours, false) {
                Decision::Sync {
                    src: SyncSrc::Secondary,
                    unexpected: false,
                    ..
                } => Err(Refusal::PeerNewer {
                    peer: remote.to_string(),
                    peer_local: counters.localcnt,
                    our_remote: ours.remotecnt,
                }),
                Decision::SplitBrain => Err(Refusal::SplitBrain(remote.to_string())),
                _ => Ok(()),
            }
        }
        PeerState::Unreachable(_) | PeerState::Unknown(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(l: u64, r: u64) -> Counters {
        Counters {
            resuid: 5,
            localcnt: l,
            remotecnt: r,
        }
    }

    #[test]
    fn decisions() {
        let known = |counters| PeerState::Known {
            role: Role::Init,
            counters,
        };
        assert!(matches!(
            decide(&PeerState::Primary, c(0, 0), "p"),
            Err(Refusal::PeerPrimary(_))
        ));
        // Peer wrote alone after we were in sync: it is newer.
        assert!(matches!(
            decide(&known(c(1, 0)), c(0, 0), "p"),
            Err(Refusal::PeerNewer { .. })
        ));
        // We wrote alone: we are newer.
        assert_eq!(decide(&known(c(0, 0)), c(1, 0), "p"), Ok(()));
        // In sync.
        assert_eq!(decide(&known(c(0, 1)), c(1, 0), "p"), Ok(()));
        // Both wrote.
        assert!(matches!(
            decide(&known(c(1, 0)), c(1, 0), "p"),
            Err(Refusal::SplitBrain(_))
        ));
        assert_eq!(
            decide(&PeerState::Unreachable("down".into()), c(0, 0), "p"),
            Ok(())
        );
    }

    #[test]
    fn answers_parse() {
        assert_eq!(
            parse(&answer(Role::Secondary, c(2, 3))),
            PeerState::Known {
                role: Role::Secondary,
                counters: c(2, 3)
            }
        );
        assert_eq!(parse(&answer(Role::Primary, c(0, 0))), PeerState::Primary);
        let mut nv = Nv::new();
        nv.add_string(
            "errmsg",
            "Remote node acts as primary for the resource and not as secondary.",
        );
        assert_eq!(parse(&nv), PeerState::Primary);
    }
}
