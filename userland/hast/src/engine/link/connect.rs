//! Dialing the peer (bound to `source`, with TLS when the resource has
//! `security tls`) and the primary's side of the version-2 handshake:
//! hello, welcome, attach with the counters, the secondary's geometry and
//! activemap merged into the sync map; with `security secret`, the
//! challenges and answers of [`crate::security::secret`].

use std::time::Duration;

use tokio::net::TcpStream;

use crate::addr::{Addr, AddrKind};
use crate::config::{ResourceConfig, SecurityMode};
use crate::handshake::{Attach, Geometry, Hello, Welcome};
use crate::proto::{self, Limits, HAST_PROTO_VERSION};
use crate::security::secret::{self, Nonce, Secret, Step, Transcript};
use crate::security::tls::{self, PinnedServerVerifier};
use crate::security::Credentials;

use super::super::transport::{Conn, LinkInfo};
use super::{lock, LinkError, Replicator, SecurityError};

/// The two connections of an established link, the peer's answer and how
/// the link is protected.
pub(super) struct Connected {
    pub(super) out: Conn,
    pub(super) inc: Conn,
    pub(super) geo: Geometry,
    pub(super) info: LinkInfo,
}

impl Replicator {
    /// The handshake; on success the two connections, the peer's answer
    /// and how the link is protected.
    pub(super) async fn connect(
        &self,
        cfg: &ResourceConfig,
        remote: &Addr,
    ) -> Result<Connected, LinkError> {
        let timeout = Duration::from_secs(u64::from(cfg.timeout.max(1)));
        let limits = Limits::HEADERS_ONLY;
        let secret = secret_of(cfg)?;
        let mut out = open(cfg, remote, timeout).await?;
        let primary_nonce = secret.map(|_| secret::nonce());
        let hello = Hello {
            resource: cfg.name.clone(),
            version: HAST_PROTO_VERSION,
            nonce: primary_nonce,
        };
        proto::write_frame_async(&mut out, &hello.to_nv(), &[]).await?;
        let (nv, _) = tokio::time::timeout(timeout, proto::read_frame_async(&mut out, limits))
            .await
            .map_err(|_| LinkError::Timeout(remote.to_string()))??;
        let (token, secondary_nonce) = match Welcome::from_nv(&nv)? {
            Welcome::Accepted { token, nonce, .. } => (token, nonce),
            Welcome::Refused { errmsg, .. } => {
                return Err(crate::handshake::HandshakeError::Refused(errmsg).into())
            }
        };
        // With a shared secret, the secondary must have answered the
        // challenge with its own.
        let exchange = match (secret, primary_nonce, secondary_nonce) {
            (Some(s), Some(p), Some(n)) => Some((s, p, n)),
            (Some(_), _, _) => return Err(SecurityError::NoSecretAnswer.into()),
            (None, _, _) => None,
        };
        let mut inc = open(cfg, remote, timeout).await?;
        let (virgin, resuid, localcnt, remotecnt) = {
            let m = lock(&self.md).clone();
            (m.resuid == 0, m.resuid, m.localcnt, m.remotecnt)
        };
        let resuid = if virgin {
            let id = new_resuid();
            self.persist(move |m| m.resuid = id)
                .await
                .map_err(LinkError::local("recording the new resuid"))?;
            id
        } else {
            resuid
        };
        let mut attach = Attach {
            resource: cfg.name.clone(),
            token,
            virgin,
            resuid,
            localcnt,
            remotecnt,
            synctrack: true,
            mac: None,
        };
        if let Some((s, p, n)) = &exchange {
            let t = transcript(&cfg.name, p, n, &token);
            attach.mac = Some(s.mac(Step::Attach, &t, &attach.auth_fields(), &[]));
        }
        proto::write_frame_async(&mut inc, &attach.to_nv(), &[]).await?;
        let (ours_size, ours_extent, mapsize) = {
            let m = lock(&self.md);
            (m.datasize, m.extentsize, self.dp.map_size())
        };
        let mapsize = mapsize.map_err(LinkError::local("reading the map size"))?;
        let map_limits = Limits::replication(mapsize.saturating_add(crate::handshake::MAP_SLACK));
        let (nv, map) =
            tokio::time::timeout(timeout, proto::read_frame_async(&mut out, map_limits))
                .await
                .map_err(|_| LinkError::Timeout(remote.to_string()))??;
        let geo = Geometry::from_nv(&nv)?;
        if let Some((s, p, n)) = &exchange {
            let t = transcript(&cfg.name, p, n, &token);
            let ok = geo
                .mac
                .is_some_and(|mac| s.verify(Step::Geometry, &t, &geo.auth_fields(), &map, &mac));
            if !ok {
                return Err(SecurityError::BadSecretAnswer.into());
            }
        }
        if u64::try_from(geo.datasize).ok() != Some(ours_size) {
            return Err(LinkError::Mismatch {
                what: "data size",
                local: ours_size,
                remote: geo.datasize,
            });
        }
        if u32::try_from(geo.extentsize).ok() != Some(ours_extent) {
            return Err(LinkError::Mismatch {
                what: "extent size",
                local: u64::from(ours_extent),
                remote: i64::from(geo.extentsize),
            });
        }
        if geo.virgin && localcnt == 0 {
            // The secondary is new: only this node has the data.
            self.persist(|m| m.localcnt = m.localcnt.saturating_add(1))
                .await
                .map_err(LinkError::local("recording localcnt for a new secondary"))?;
        }
        if geo.mapsize > 0 {
            // FreeBSD's secondary sends the map with hast_proto_send.
            let map = crate::handshake::decode_peer_map(&nv, map, geo.mapsize, mapsize).map_err(
                |source| LinkError::Payload {
                    what: "the peer's activemap",
                    source,
                },
            )?;
            self.dp
                .map_merge(&map)
                .map_err(LinkError::local("merging the peer's activemap"))?;
        }
        let info = match &out {
            Conn::Tls(_) => LinkInfo {
                mode: SecurityMode::Tls,
                suite: out.suite(),
                peer: out
                    .peer_certificates()
                    .and_then(|c| c.first().and_then(|c| tls::PeerIdentity::of(c).ok()))
                    .map(|id| id.key),
            },
            Conn::Plain(_) if exchange.is_some() => LinkInfo {
                mode: SecurityMode::Secret,
                suite: None,
                peer: None,
            },
            Conn::Plain(_) => LinkInfo::default(),
        };
        Ok(Connected {
            out,
            inc,
            geo,
            info,
        })
    }
}

fn transcript<'a>(
    resource: &'a str,
    primary: &'a Nonce,
    secondary: &'a Nonce,
    token: &'a [u8],
) -> Transcript<'a> {
    Transcript {
        resource,
        primary_nonce: primary,
        secondary_nonce: secondary,
        token,
    }
}

/// The shared secret of a resource with `security secret` (an error when
/// it was not loaded), None for the other modes.
pub(crate) fn secret_of(cfg: &ResourceConfig) -> Result<Option<&Secret>, LinkError> {
    match (cfg.security.mode, cfg.security.credentials.as_deref()) {
        (SecurityMode::Secret, Some(Credentials::Secret(s))) => Ok(Some(s)),
        (SecurityMode::Secret, _) => Err(SecurityError::NotLoaded.into()),
        _ => Ok(None),
    }
}

/// A connection to the peer as the resource's `security` requires: plain
/// TCP, or TLS whose peer the resource's policy accepts.
pub(crate) async fn open(
    cfg: &ResourceConfig,
    remote: &Addr,
    timeout: Duration,
) -> Result<Conn, LinkError> {
    let tcp = dial(cfg, remote, timeout).await?;
    if cfg.security.mode != SecurityMode::Tls {
        return Ok(Conn::Plain(tcp));
    }
    let Some(Credentials::Tls { key, peer }) = cfg.security.credentials.as_deref() else {
        return Err(SecurityError::NotLoaded.into());
    };
    let verifier = PinnedServerVerifier::new(peer.clone());
    let client = tls::client_config(key, verifier.clone()).map_err(SecurityError::Config)?;
    match Conn::tls_connect(tcp, client, timeout).await {
        Ok(c) => Ok(c),
        Err(e) => Err(match verifier.refusal() {
            Some(reason) => SecurityError::PeerRefused(reason),
            None => SecurityError::handshake(remote, key.identity.key, e),
        }
        .into()),
    }
}

fn new_resuid() -> u64 {
    loop {
        let id: u64 = rand::random();
        if id != 0 {
            return id;
        }
    }
}

/// Connect to the peer `remote`, bound to the resource's `source` when it
/// has one, within `timeout` per address tried.
async fn dial(
    cfg: &ResourceConfig,
    remote: &Addr,
    timeout: Duration,
) -> Result<TcpStream, LinkError> {
    let err = |source| LinkError::Connect {
        addr: remote.to_string(),
        source,
    };
    let AddrKind::Tcp { .. } = &remote.kind else {
        return Err(err(std::io::Error::other("remote is not a TCP address")));
    };
    let targets = remote.resolve().await.map_err(err)?;
    let mut last = std::io::Error::other("remote resolves to nothing");
    for target in targets {
        let sock = if target.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        }
        .map_err(err)?;
        if let Some(src) = &cfg.source {
            let bind = src
                .resolve()
                .await
                .map_err(err)?
                .into_iter()
                .find(|a| a.is_ipv4() == target.is_ipv4());
            if let Some(b) = bind {
                sock.bind(b).map_err(err)?;
            }
        }
        match tokio::time::timeout(timeout, sock.connect(target)).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Ok(Err(e)) => last = e,
            Err(_) => return Err(LinkError::Timeout(remote.to_string())),
        }
    }
    Err(err(last))
}
