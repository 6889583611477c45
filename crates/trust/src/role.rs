//! The four roles of a remote client and their order: each role can do everything the ones
//! below it can (admin ⊇ operator ⊇ user ⊇ auditor), as in LXD's RBAC roles.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::Error;

/// What a trusted client may do. The order of the variants is the order of privilege.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read only: list and show sandboxes, networks, policies, logs of decisions.
    Auditor,
    /// Auditor, plus exec in sandboxes and reading their logs.
    User,
    /// User, plus creating and deleting sandboxes and networks and setting policies.
    Operator,
    /// Everything, including the trust store and the daemon's configuration.
    Admin,
}

impl Role {
    /// Every role, least privileged first.
    pub const ALL: [Role; 4] = [Role::Auditor, Role::User, Role::Operator, Role::Admin];

    /// Whether a client with this role may do something that needs `needed`.
    pub fn allows(self, needed: Role) -> bool {
        self >= needed
    }

    /// The lowercase name used in the CLI, the API and the trust store.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Auditor => "auditor",
            Role::User => "user",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| Error::UnknownRole {
                given: s.to_owned(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_of_privilege() {
        assert!(Role::Admin.allows(Role::Admin));
        assert!(Role::Admin.allows(Role::Auditor));
        assert!(Role::Operator.allows(Role::User));
        assert!(!Role::Operator.allows(Role::Admin));
        assert!(Role::User.allows(Role::Auditor));
        assert!(!Role::User.allows(Role::Operator));
        assert!(Role::Auditor.allows(Role::Auditor));
        assert!(!Role::Auditor.allows(Role::User));
    }

    #[test]
    fn parse_display_serde() {
        for r in Role::ALL {
            assert_eq!(r.to_string().parse::<Role>().unwrap(), r);
            assert_eq!(serde_json::to_string(&r).unwrap(), format!("\"{r}\""));
        }
        let err = "Admin".parse::<Role>().unwrap_err().to_string();
        assert_eq!(
            err,
            "unknown role \"Admin\": the roles are auditor, user, operator and admin"
        );
    }
}
