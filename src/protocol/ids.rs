//! Validated identifiers that arrive from the outside: session and document names.
//!
//! PROTOCOL.md fixes their shape as `^[A-Za-z0-9._-]{1,128}$`. Parsing happens once, at the edge
//! (serde or a REST path), so that every other layer can take a [`SessionId`] as already valid.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid name {0:?}: names match ^[A-Za-z0-9._-]{{1,128}}$")]
pub struct InvalidName(pub String);

/// Checks the fixed name grammar shared by sessions and documents.
fn check_name(raw: &str) -> bool {
    (1..=128).contains(&raw.len())
        && raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The name of a session. Cheap to clone: the registry, actors and frames all hold one.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SessionId(Arc<str>);

impl SessionId {
    pub fn parse(raw: &str) -> Result<Self, InvalidName> {
        if check_name(raw) {
            Ok(Self(Arc::from(raw)))
        } else {
            Err(InvalidName(raw.chars().take(140).collect()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for SessionId {
    type Error = InvalidName;
    fn try_from(raw: String) -> Result<Self, Self::Error> {
        Self::parse(&raw)
    }
}

impl From<SessionId> for String {
    fn from(id: SessionId) -> Self {
        id.0.to_string()
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({})", &self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_fixed_grammar_only() {
        assert!(SessionId::parse("design-review_1.2").is_ok());
        assert!(SessionId::parse(&"a".repeat(128)).is_ok());
        assert!(SessionId::parse("").is_err());
        assert!(SessionId::parse(&"a".repeat(129)).is_err());
        assert!(SessionId::parse("has space").is_err());
        assert!(SessionId::parse("slash/no").is_err());
        assert!(SessionId::parse("é").is_err());
    }
}
