//! Dialing the peer (bound to `source`) and the primary's side of the
//! version-2 handshake: hello, welcome, attach with the counters, the
//! secondary's geometry and activemap merged into the sync map.

use std::time::Duration;

use tokio::net::TcpStream;

use crate::addr::{Addr, AddrKind};
use crate::config::ResourceConfig;
use crate::handshake::{Attach, Geometry, Hello, Welcome};
use crate::proto::{self, Limits, HAST_PROTO_VERSION};

use super::{lock, LinkError, Replicator};

impl Replicator {
    /// The handshake; on success the two connections and the peer's answer.
    pub(super) async fn connect(
        &self,
        cfg: &ResourceConfig,
        remote: &Addr,
    ) -> Result<(TcpStream, TcpStream, Geometry), LinkError> {
        let timeout = Duration::from_secs(u64::from(cfg.timeout.max(1)));
        let limits = Limits::HEADERS_ONLY;
        let mut out = dial(cfg, remote, timeout).await?;
        let hello = Hello {
            resource: cfg.name.clone(),
            version: HAST_PROTO_VERSION,
        };
        proto::write_frame_async(&mut out, &hello.to_nv(), &[]).await?;
        let (nv, _) = tokio::time::timeout(timeout, proto::read_frame_async(&mut out, limits))
            .await
            .map_err(|_| LinkError::Timeout(remote.to_string()))??;
        let token = match Welcome::from_nv(&nv)? {
            Welcome::Accepted { token, .. } => token,
            Welcome::Refused { errmsg, .. } => {
                return Err(crate::handshake::HandshakeError::Refused(errmsg).into())
            }
        };
        let mut inc = dial(cfg, remote, timeout).await?;
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
        let attach = Attach {
            resource: cfg.name.clone(),
            token,
            virgin,
            resuid,
            localcnt,
            remotecnt,
            synctrack: true,
        };
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
        Ok((out, inc, geo))
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
pub(crate) async fn dial(
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
