//! Who a client is, and what it may touch: JWT checking, roles and session scopes.
//!
//! Tokens are JWTs (HS256 with the configured secret, or RS256 with a public key file). Every
//! door calls [`Authenticator::authenticate`] once and then asks the resulting [`Principal`]
//! before each action. Failures never echo the token; they are counted by door and reason.

use std::path::Path;
use std::sync::Arc;

use chrono::{DateTime, TimeZone, Utc};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::protocol::{ErrorCode, Refusal, Role, SessionId, UserInfo};

/// The largest token accepted. Real tokens are a few hundred bytes; this bounds the work a
/// forged one can cause.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// Seconds of clock skew tolerated on `exp`.
pub const LEEWAY_S: u64 = 30;

/// The claims Conclave reads and writes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub role: Role,
    /// Session ids, or prefixes ending in `*`. Absent: every session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sessions: Option<Vec<String>>,
    pub exp: u64,
}

/// Which sessions a principal may enter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    All,
    /// Exact ids and `prefix*` patterns.
    Only(Vec<String>),
}

impl Scope {
    pub fn allows(&self, session: &SessionId) -> bool {
        match self {
            Self::All => true,
            Self::Only(patterns) => patterns.iter().any(|p| match p.strip_suffix('*') {
                Some(prefix) => session.as_str().starts_with(prefix),
                None => p == session.as_str(),
            }),
        }
    }
}

/// An authenticated client.
#[derive(Debug, Clone)]
pub struct Principal {
    /// Shared with the sessions the connection joins, so an idle member holds one copy.
    pub user: Arc<UserInfo>,
    pub scope: Scope,
    /// When the token stops being valid; `None` for anonymous users.
    pub expires_at: Option<DateTime<Utc>>,
    /// Admitted without a token.
    pub anonymous: bool,
}

impl Principal {
    /// Refuses a session outside the token's scope.
    pub fn check_session(&self, session: &SessionId) -> Result<(), Refusal> {
        if self.scope.allows(session) {
            Ok(())
        } else {
            Err(Refusal::new(
                ErrorCode::Forbidden,
                format!("your token does not cover session {session}"),
            ))
        }
    }

    /// Refuses a role that may not write (chat, edit, tasks, councils, creating sessions).
    pub fn check_write(&self) -> Result<(), Refusal> {
        if self.user.role.may_write() {
            Ok(())
        } else {
            Err(Refusal::new(
                ErrorCode::Forbidden,
                format!("the role {:?} may not change sessions", self.user.role),
            ))
        }
    }

    /// Refuses anyone but an admin.
    pub fn check_admin(&self) -> Result<(), Refusal> {
        if self.user.role == Role::Admin {
            Ok(())
        } else {
            Err(Refusal::new(
                ErrorCode::Forbidden,
                "only an admin may do this",
            ))
        }
    }

    /// How long until the token runs out, leeway included; `None` for anonymous users.
    pub fn time_left(&self) -> Option<std::time::Duration> {
        let deadline = self.expires_at? + chrono::Duration::seconds(LEEWAY_S as i64);
        Some((deadline - Utc::now()).to_std().unwrap_or_default())
    }

    /// Whether the token has run out (with the same leeway as at connect time).
    pub fn expired(&self) -> bool {
        self.expires_at
            .is_some_and(|at| at + chrono::Duration::seconds(LEEWAY_S as i64) <= Utc::now())
    }
}

/// Why an authenticator could not be built.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read the JWT public key {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("the JWT public key {path} is not an RSA PEM key: {source}")]
    Parse {
        path: String,
        source: jsonwebtoken::errors::Error,
    },
}

/// Checks tokens (and issues them for `conclave token`).
pub struct Authenticator {
    verify: Option<(DecodingKey, Validation)>,
    sign: Option<EncodingKey>,
    anonymous: bool,
}

impl Authenticator {
    /// `secret` selects HS256; `public_key` (a PEM file) selects RS256 for checking. Anonymous
    /// users are admitted as editors when `anonymous` is set.
    pub fn new(
        secret: Option<&str>,
        public_key: Option<&Path>,
        anonymous: bool,
    ) -> Result<Self, KeyError> {
        let verify = match (public_key, secret) {
            (Some(path), _) => {
                let pem = std::fs::read(path).map_err(|source| KeyError::Read {
                    path: path.display().to_string(),
                    source,
                })?;
                let key = DecodingKey::from_rsa_pem(&pem).map_err(|source| KeyError::Parse {
                    path: path.display().to_string(),
                    source,
                })?;
                Some((key, validation(Algorithm::RS256)))
            }
            (None, Some(secret)) => Some((
                DecodingKey::from_secret(secret.as_bytes()),
                validation(Algorithm::HS256),
            )),
            (None, None) => None,
        };
        Ok(Self {
            verify,
            sign: secret.map(|s| EncodingKey::from_secret(s.as_bytes())),
            anonymous,
        })
    }

    /// Decides who a client is from its token, or admits it anonymously where that is allowed.
    pub fn authenticate(
        &self,
        token: Option<&str>,
        name: Option<&str>,
    ) -> Result<Principal, AuthFailure> {
        match (token.filter(|t| !t.is_empty()), &self.verify) {
            (Some(token), Some((key, validation))) => {
                if token.len() > MAX_TOKEN_BYTES {
                    return Err(AuthFailure::TooLarge);
                }
                let claims = jsonwebtoken::decode::<Claims>(token, key, validation)
                    .map_err(|err| AuthFailure::Invalid(err.to_string()))?
                    .claims;
                let expires_at = i64::try_from(claims.exp)
                    .ok()
                    .and_then(|exp| Utc.timestamp_opt(exp, 0).single());
                Ok(Principal {
                    user: Arc::new(UserInfo {
                        id: claims.sub,
                        name: display_name(claims.name.as_deref().or(name)),
                        role: claims.role,
                    }),
                    scope: claims.sessions.map_or(Scope::All, Scope::Only),
                    expires_at,
                    anonymous: false,
                })
            }
            (Some(_), None) if !self.anonymous => Err(AuthFailure::NoKeys),
            (None, _) if !self.anonymous => Err(AuthFailure::Missing),
            // Anonymous: a token presented to a server with no keys grants nothing more.
            _ => Ok(Principal {
                user: Arc::new(UserInfo {
                    id: uuid::Uuid::now_v7().to_string(),
                    name: display_name(name),
                    role: Role::Editor,
                }),
                scope: Scope::All,
                expires_at: None,
                anonymous: true,
            }),
        }
    }

    /// Signs a token with the configured secret.
    pub fn issue(&self, claims: &Claims) -> Result<String, IssueError> {
        let key = self.sign.as_ref().ok_or(IssueError::NoSecret)?;
        Ok(jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            claims,
            key,
        )?)
    }
}

fn validation(algorithm: Algorithm) -> Validation {
    let mut validation = Validation::new(algorithm);
    validation.leeway = LEEWAY_S;
    validation.validate_exp = true;
    validation.set_required_spec_claims(&["exp", "sub"]);
    validation
}

/// The longest display name kept; longer names are cut, not refused.
const MAX_NAME_CHARS: usize = 64;

/// A display name as shown to others: trimmed, cut to a bounded length, never empty.
pub fn display_name(name: Option<&str>) -> String {
    name.map(str::trim)
        .filter(|n| !n.is_empty())
        .map(|n| n.chars().take(MAX_NAME_CHARS).collect())
        .unwrap_or_else(|| "anonymous".to_owned())
}

/// Why a client was not let in. The message never contains the token.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthFailure {
    #[error("a token is required")]
    Missing,
    #[error("this server checks no tokens and admits no anonymous users")]
    NoKeys,
    #[error("the token is larger than {MAX_TOKEN_BYTES} bytes")]
    TooLarge,
    #[error("invalid token: {0}")]
    Invalid(String),
}

impl AuthFailure {
    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::NoKeys => "no_keys",
            Self::TooLarge => "too_large",
            Self::Invalid(_) => "invalid",
        }
    }

    /// Counts and logs the failure at `door`, and turns it into the refusal the client gets.
    pub fn refusal(&self, door: &'static str) -> Refusal {
        crate::telemetry::auth_failure(door, self.reason());
        tracing::info!(
            door,
            reason = self.reason(),
            "authentication failed: {self}"
        );
        Refusal::new(ErrorCode::Unauthorized, self.to_string())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("no JWT secret is configured: pass --jwt-secret or set CONCLAVE_JWT_SECRET")]
    NoSecret,
    #[error("signing failed: {0}")]
    Sign(#[from] jsonwebtoken::errors::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(role: Role, exp_in: i64, sessions: Option<Vec<&str>>) -> Claims {
        Claims {
            sub: "u1".into(),
            name: Some("Ada".into()),
            role,
            sessions: sessions.map(|s| s.into_iter().map(String::from).collect()),
            exp: (Utc::now().timestamp() + exp_in) as u64,
        }
    }

    #[test]
    fn round_trips_and_scopes() {
        let auth = Authenticator::new(Some("s3cret"), None, false).unwrap();
        let token = auth
            .issue(&claims(Role::Viewer, 60, Some(vec!["a", "team-*"])))
            .unwrap();
        let p = auth.authenticate(Some(&token), None).unwrap();
        assert_eq!(p.user.role, Role::Viewer);
        assert_eq!(p.user.name, "Ada");
        assert!(p.check_session(&SessionId::parse("a").unwrap()).is_ok());
        assert!(
            p.check_session(&SessionId::parse("team-x").unwrap())
                .is_ok()
        );
        assert!(p.check_session(&SessionId::parse("ab").unwrap()).is_err());
        assert!(p.check_write().is_err());
    }

    #[test]
    fn refuses_forged_expired_none_and_oversized() {
        let auth = Authenticator::new(Some("s3cret"), None, false).unwrap();
        let other = Authenticator::new(Some("other"), None, false).unwrap();
        let forged = other.issue(&claims(Role::Admin, 60, None)).unwrap();
        assert!(auth.authenticate(Some(&forged), None).is_err());
        let expired = auth.issue(&claims(Role::Admin, -3600, None)).unwrap();
        assert!(auth.authenticate(Some(&expired), None).is_err());
        // alg "none": header {"alg":"none","typ":"JWT"}, no signature.
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJ1MSIsInJvbGUiOiJhZG1pbiIsImV4cCI6OTk5OTk5OTk5OX0.";
        assert!(auth.authenticate(Some(none), None).is_err());
        assert!(matches!(
            auth.authenticate(Some(&"a".repeat(MAX_TOKEN_BYTES + 1)), None),
            Err(AuthFailure::TooLarge)
        ));
        assert!(auth.authenticate(Some("garbage"), None).is_err());
        assert!(matches!(
            auth.authenticate(None, None),
            Err(AuthFailure::Missing)
        ));
    }
}
