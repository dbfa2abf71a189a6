//! The server under load: parsing `--url`, refusing targets off loopback, and building the
//! socket and REST URLs from it.
//!
//! A load generator pointed at the wrong host is a denial-of-service tool, so the host is
//! resolved before anything is sent and every address it resolves to must be loopback. One
//! non-loopback address is enough to refuse: the resolver might pick it.

use std::net::{IpAddr, SocketAddr};

use url::{Host, Url};

use super::LoadError;

/// A checked `--url`: a ws:// or wss:// URL whose host is loopback (or `--allow-remote`).
#[derive(Debug, Clone)]
pub struct Target {
    base: Url,
    token: Option<String>,
}

impl Target {
    /// Parses `raw`, resolves its host and refuses anything off loopback unless `allow_remote`.
    pub async fn resolve(
        raw: &str,
        token: Option<String>,
        allow_remote: bool,
    ) -> Result<Self, LoadError> {
        let base = parse_ws_url(raw)?;
        if !allow_remote {
            let host = base.host().ok_or_else(|| invalid(raw, "it has no host"))?;
            let port = base.port_or_known_default().unwrap_or(80);
            let addrs: Vec<SocketAddr> = match host {
                Host::Ipv4(ip) => vec![SocketAddr::new(ip.into(), port)],
                Host::Ipv6(ip) => vec![SocketAddr::new(ip.into(), port)],
                Host::Domain(name) => tokio::net::lookup_host((name, port))
                    .await
                    .map_err(|err| LoadError::Resolve {
                        host: name.to_owned(),
                        reason: err.to_string(),
                    })?
                    .collect(),
            };
            ensure_loopback(&host.to_string(), &addrs)?;
        }
        Ok(Self {
            base,
            token: token.filter(|t| !t.is_empty()),
        })
    }

    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    pub fn url(&self) -> &Url {
        &self.base
    }

    /// A socket URL: `path` appended to the base URL's path (so a server behind a path prefix
    /// works), with the token in the query when `with_token`.
    pub fn socket(&self, path: &str, with_token: bool) -> Url {
        let mut url = self.base.clone();
        let joined = format!(
            "{}/{}",
            url.path().trim_end_matches('/'),
            path.trim_start_matches('/')
        );
        url.set_path(&joined);
        url.set_query(None);
        if with_token && let Some(token) = &self.token {
            url.query_pairs_mut().append_pair("token", token);
        }
        url
    }

    /// The REST URL for `path` on the same host (ws→http, wss→https), ignoring the base path:
    /// REST lives at the server's root (`/v1/…`, `/metrics`).
    pub fn http(&self, path: &str) -> Url {
        let mut url = self.base.clone();
        let scheme = if self.base.scheme() == "wss" {
            "https"
        } else {
            "http"
        };
        // ws↔http are both "special" schemes, so this cannot fail; if it did the URL would
        // keep ws:// and the request would fail with a clear error.
        let _ = url.set_scheme(scheme);
        url.set_path(path);
        url.set_query(None);
        url
    }
}

fn invalid(url: &str, reason: &str) -> LoadError {
    LoadError::InvalidUrl {
        url: url.to_owned(),
        reason: reason.to_owned(),
    }
}

/// Parses a ws:// or wss:// URL; http(s):// is accepted and mapped to ws(s)://.
pub fn parse_ws_url(raw: &str) -> Result<Url, LoadError> {
    let mut url = Url::parse(raw).map_err(|err| invalid(raw, &err.to_string()))?;
    let scheme = match url.scheme() {
        "ws" | "http" => "ws",
        "wss" | "https" => "wss",
        other => return Err(invalid(raw, &format!("scheme {other:?} is not ws or wss"))),
    };
    if url.scheme() != scheme && url.set_scheme(scheme).is_err() {
        return Err(invalid(raw, "cannot use it as a WebSocket URL"));
    }
    if url.host().is_none() {
        return Err(invalid(raw, "it has no host"));
    }
    Ok(url)
}

/// Refuses unless every address is loopback (and there is at least one).
pub fn ensure_loopback(host: &str, addrs: &[SocketAddr]) -> Result<(), LoadError> {
    if addrs.is_empty() {
        return Err(LoadError::Resolve {
            host: host.to_owned(),
            reason: "it resolves to no address".into(),
        });
    }
    match addrs.iter().map(SocketAddr::ip).find(|ip| !is_loopback(ip)) {
        Some(addr) => Err(LoadError::RemoteTarget {
            host: host.to_owned(),
            addr,
        }),
        None => Ok(()),
    }
}

/// 127.0.0.0/8 and ::1, and IPv4-mapped loopback (`::ffff:127.0.0.1`).
fn is_loopback(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn loopback_only() {
        assert!(ensure_loopback("h", &[addr("127.0.0.1:80"), addr("[::1]:80")]).is_ok());
        assert!(ensure_loopback("h", &[addr("127.3.2.1:80")]).is_ok());
        assert!(ensure_loopback("h", &[addr("[::ffff:127.0.0.1]:80")]).is_ok());
        for remote in [
            "10.0.0.1:80",
            "192.168.1.2:80",
            "8.8.8.8:80",
            "[2001:db8::1]:80",
        ] {
            let err = ensure_loopback("h", &[addr("127.0.0.1:80"), addr(remote)]).unwrap_err();
            assert!(matches!(err, LoadError::RemoteTarget { .. }), "{remote}");
            assert!(err.to_string().contains("--allow-remote"));
        }
        assert!(matches!(
            ensure_loopback("h", &[]),
            Err(LoadError::Resolve { .. })
        ));
    }

    #[tokio::test]
    async fn resolve_refuses_remote_literals_and_accepts_localhost() {
        assert!(
            Target::resolve("ws://127.0.0.1:1", None, false)
                .await
                .is_ok()
        );
        assert!(Target::resolve("ws://[::1]:1", None, false).await.is_ok());
        assert!(
            Target::resolve("ws://localhost:1", None, false)
                .await
                .is_ok()
        );
        assert!(matches!(
            Target::resolve("ws://10.1.2.3:8080", None, false).await,
            Err(LoadError::RemoteTarget { .. })
        ));
        // Allowed knowingly: nothing is resolved or sent here.
        assert!(
            Target::resolve("ws://10.1.2.3:8080", None, true)
                .await
                .is_ok()
        );
    }

    #[test]
    fn urls_are_checked_and_mapped() {
        assert_eq!(
            parse_ws_url("http://127.0.0.1:8080").unwrap().scheme(),
            "ws"
        );
        assert_eq!(parse_ws_url("https://localhost").unwrap().scheme(), "wss");
        assert!(parse_ws_url("ftp://127.0.0.1").is_err());
        assert!(parse_ws_url("not a url").is_err());
    }

    #[tokio::test]
    async fn socket_and_rest_urls() {
        let t = Target::resolve("ws://127.0.0.1:8080/v1/yjs/", Some("a.b-c".into()), false)
            .await
            .unwrap();
        assert_eq!(
            t.socket("s-1/load", true).as_str(),
            "ws://127.0.0.1:8080/v1/yjs/s-1/load?token=a.b-c"
        );
        assert_eq!(
            t.http("/v1/sessions/s/docs/d").as_str(),
            "http://127.0.0.1:8080/v1/sessions/s/docs/d"
        );
        let root = Target::resolve("ws://127.0.0.1:8080", None, false)
            .await
            .unwrap();
        assert_eq!(
            root.socket("/v1/ws", true).as_str(),
            "ws://127.0.0.1:8080/v1/ws"
        );
    }
}
