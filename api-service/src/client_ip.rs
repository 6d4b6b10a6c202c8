//! The mini-program's IP address, for auth-service's per-IP login rate limit.
//!
//! With `API_TRUSTED_PROXY_HOPS = 0` it is the TCP peer. Behind N proxies that each append
//! to `X-Forwarded-For`, it is the N-th address from the right: anything further left was
//! written by the client and cannot be trusted.

use std::net::{IpAddr, SocketAddr};

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
        .and_then(|s| s.parse().ok())
        .or(peer)
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
}
