//! The mini-program's IP address, for auth-service's per-IP login rate limit.
//!
//! With `API_TRUSTED_PROXY_HOPS = 0` it is the TCP peer. Behind N proxies that each append
//! to `X-Forwarded-For`, it is the N-th address from the right: anything further left was
//! written by the client and cannot be trusted.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::HeaderMap;
use axum::http::request::Parts;

/// The TCP peer of a request, when the server records it (always, outside unit tests).
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub Option<SocketAddr>);

impl<S: Send + Sync> FromRequestParts<S> for PeerAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(Self(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0),
        ))
    }
}

/// The client's address as far as the trusted proxies vouch for it.
pub fn client_ip(
    headers: &HeaderMap,
    peer: Option<SocketAddr>,
    trusted_hops: usize,
) -> Option<IpAddr> {
    let peer = peer.map(|p| p.ip());
    if trusted_hops == 0 {
        return peer;
    }
    let forwarded: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    forwarded
        .len()
        .checked_sub(trusted_hops)
        .and_then(|i| forwarded.get(i))
        .and_then(|s| {
            let ip = forwarded_ip(s);
            if ip.is_none() && !UNREADABLE_SEEN.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    trusted_hops,
                    "a trusted X-Forwarded-For entry is not an IP address; using the TCP peer \
                     (said once)"
                );
            }
            ip
        })
        .or(peer)
}

/// Whether [`client_ip`] has warned of an entry it cannot read (once per process: a proxy
/// that writes such entries writes them on every request).
static UNREADABLE_SEEN: AtomicBool = AtomicBool::new(false);

/// One `X-Forwarded-For` entry as an address: `203.0.113.9` or `2001:db8::1`, and as some
/// proxies write them, with a port (`203.0.113.9:54321`, `[2001:db8::1]:443`) or in brackets
/// (`[2001:db8::1]`).
fn forwarded_ip(entry: &str) -> Option<IpAddr> {
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|a| a.ip()))
        .or_else(|| {
            entry
                .strip_prefix('[')
                .and_then(|e| e.strip_suffix(']'))
                .and_then(|e| e.parse::<std::net::Ipv6Addr>().ok())
                .map(IpAddr::V6)
        })
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    #[test]
    fn trusts_only_the_configured_hops() {
        let peer: SocketAddr = "10.0.0.2:5555".parse().expect("addr");
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("6.6.6.6, 203.0.113.9"),
        );
        assert_eq!(client_ip(&h, Some(peer), 0), Some(peer.ip()));
        assert_eq!(client_ip(&h, Some(peer), 1), "203.0.113.9".parse().ok());
        assert_eq!(client_ip(&h, Some(peer), 2), "6.6.6.6".parse().ok());
        // More hops than entries: fall back to the peer.
        assert_eq!(client_ip(&h, Some(peer), 3), Some(peer.ip()));
        assert_eq!(client_ip(&HeaderMap::new(), None, 1), None);
    }

    #[test]
    fn reads_entries_that_carry_a_port_or_brackets() {
        let peer: SocketAddr = "10.0.0.2:5555".parse().expect("addr");
        for (entry, want) in [
            ("203.0.113.9:54321", "203.0.113.9"),
            ("[2001:db8::1]:443", "2001:db8::1"),
            ("[2001:db8::1]", "2001:db8::1"),
            ("2001:db8::1", "2001:db8::1"),
        ] {
            let mut h = HeaderMap::new();
            let value = format!("6.6.6.6, {entry}");
            h.insert(
                "x-forwarded-for",
                HeaderValue::from_str(&value).expect("header"),
            );
            assert_eq!(client_ip(&h, Some(peer), 1), want.parse().ok(), "{entry}");
        }
        // What is no address at all still falls back to the peer.
        for entry in ["unknown", "_hidden", "[203.0.113.9]", "2001:db8::1]:443"] {
            let mut h = HeaderMap::new();
            h.insert(
                "x-forwarded-for",
                HeaderValue::from_str(entry).expect("header"),
            );
            assert_eq!(client_ip(&h, Some(peer), 1), Some(peer.ip()), "{entry}");
        }
    }
}
