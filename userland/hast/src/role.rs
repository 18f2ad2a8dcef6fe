//! Resource roles and their numbers on the control socket and in metadata.

use std::fmt;
use std::str::FromStr;

/// The role of a resource on this node (`HAST_ROLE_*` of the reference).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Not known (never sent by hastctl; 0 on the wire).
    Undef,
    /// Not serving and not accepting the peer; the local provider is closed.
    Init,
    /// Serves the device and replicates writes to the peer.
    Primary,
    /// Accepts the primary's connection and applies its writes.
    Secondary,
}

impl Role {
    /// The number used on the control socket (`role` uint8).
    pub fn to_u8(self) -> u8 {
        match self {
            Role::Undef => 0,
            Role::Init => 1,
            Role::Primary => 2,
            Role::Secondary => 3,
        }
    }

    /// The role for a control-socket number, if it names one.
    pub fn from_u8(v: u8) -> Option<Role> {
        match v {
            0 => Some(Role::Undef),
            1 => Some(Role::Init),
            2 => Some(Role::Primary),
            3 => Some(Role::Secondary),
            _ => None,
        }
    }

    /// The name printed by hastctl and stored as `prevrole` in metadata.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Undef => "undef",
            Role::Init => "init",
            Role::Primary => "primary",
            Role::Secondary => "secondary",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role name that is not `init`, `primary`, `secondary` or `undef`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown role {0:?} (expected init, primary or secondary)")]
pub struct UnknownRole(pub String);

impl FromStr for Role {
    type Err = UnknownRole;
    fn from_str(s: &str) -> Result<Role, UnknownRole> {
        match s {
            "undef" => Ok(Role::Undef),
            "init" => Ok(Role::Init),
            "primary" => Ok(Role::Primary),
            "secondary" => Ok(Role::Secondary),
            _ => Err(UnknownRole(s.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_names_round_trip() {
        for r in [Role::Undef, Role::Init, Role::Primary, Role::Secondary] {
            assert_eq!(Role::from_u8(r.to_u8()), Some(r));
            assert_eq!(r.as_str().parse::<Role>(), Ok(r));
        }
        assert_eq!(Role::Primary.to_u8(), 2);
        assert_eq!(Role::from_u8(4), None);
        assert!("master".parse::<Role>().is_err());
    }
}
