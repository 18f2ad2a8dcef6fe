//! The typed reply to a SETROLE request: per resource its role before the
//! request (`role%u`) and the error, if any (`error%u`, `errmsg%u`).

use super::status::EntryError;
use crate::nv::Nv;

/// A SETROLE reply: one entry per resource named, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoleReply {
    pub entries: Vec<RoleEntry>,
}

/// One resource of a SETROLE reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleEntry {
    pub name: String,
    /// The role before the request; absent for an unknown resource.
    pub old_role: Option<String>,
    pub error: Option<EntryError>,
}

impl RoleReply {
    /// Append every entry (`resource%u` first) to `nv`.
    pub fn to_nv(&self, nv: &mut Nv) {
        for (no, e) in self.entries.iter().enumerate() {
            nv.add_string(format!("resource{no}"), e.name.as_str());
            if let Some(r) = &e.old_role {
                nv.add_string(format!("role{no}"), r.as_str());
            }
            if let Some(err) = &e.error {
                err.to_nv(nv, no);
            }
        }
    }

    /// Every `resource%u` of `nv` with its old role and error.
    pub fn from_nv(nv: &Nv) -> RoleReply {
        let entries = super::resource_names(nv)
            .into_iter()
            .enumerate()
            .map(|(no, name)| RoleEntry {
                name,
                old_role: nv.get_string(&format!("role{no}")).map(str::to_string),
                error: EntryError::from_nv(nv, no),
            })
            .collect();
        RoleReply { entries }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_round_trip() {
        let reply = RoleReply {
            entries: vec![
                RoleEntry {
                    name: "data".into(),
                    old_role: Some("secondary".into()),
                    error: None,
                },
                RoleEntry {
                    name: "logs".into(),
                    old_role: Some("init".into()),
                    error: Some(EntryError {
                        code: 75,
                        message: Some("the peer is primary".into()),
                    }),
                },
                RoleEntry {
                    name: "gone".into(),
                    old_role: None,
                    error: Some(EntryError {
                        code: 1,
                        message: None,
                    }),
                },
            ],
        };
        let mut nv = Nv::new();
        reply.to_nv(&mut nv);
        let back = RoleReply::from_nv(&Nv::decode(&nv.encode().unwrap()).unwrap());
        assert_eq!(back, reply);
    }
}
