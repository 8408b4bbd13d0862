//! Source-address allow-lists for providers whose notifications are not signed (Omron signs
//! nothing and calls a URL it allow-lists by hand): beside the secret token in the URL, a
//! provider's webhooks may be limited to its published address ranges
//! (`OHX_WEBHOOK_ALLOWED_SOURCES=omron=203.0.113.0/24 198.51.100.7;withings=…`).
//!
//! Behind a load balancer the peer is the proxy: when it is one of `OHX_TRUSTED_PROXIES`, the
//! client is the last `X-Forwarded-For` hop that is not a trusted proxy (hops added by the
//! client itself are never believed).

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use ipnet::IpNet;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};

/// The peer address of a request, when the server recorded it.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub Option<IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for PeerAddr {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Infallible> {
        Ok(Self(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0.ip()),
        ))
    }
}

/// The allow-lists, by provider, and the trusted proxies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceRules {
    allowed: BTreeMap<String, Vec<IpNet>>,
    trusted_proxies: Vec<IpNet>,
}

/// An address or a network (`203.0.113.7` is `203.0.113.7/32`).
fn net(text: &str) -> Result<IpNet, String> {
    let t = text.trim();
    t.parse::<IpNet>()
        .or_else(|_| t.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| format!("{t:?} is not an address or a network"))
}

fn nets(text: &str) -> Result<Vec<IpNet>, String> {
    text.split([' ', ','])
        .filter(|s| !s.trim().is_empty())
        .map(net)
        .collect()
}

impl SourceRules {
    /// Rules from `provider=net net;provider=net` and a list of trusted proxy networks.
    ///
    /// # Errors
    /// A text naming what does not parse.
    pub fn parse(allowed: &str, trusted_proxies: &str) -> Result<Self, String> {
        let mut rules = Self {
            allowed: BTreeMap::new(),
            trusted_proxies: nets(trusted_proxies)?,
        };
        for entry in allowed.split(';').filter(|e| !e.trim().is_empty()) {
            let (provider, list) = entry
                .split_once('=')
                .ok_or_else(|| format!("{entry:?}: expected provider=networks"))?;
            let list = nets(list)?;
            if list.is_empty() {
                return Err(format!("{entry:?}: no network"));
            }
            rules.allowed.insert(provider.trim().to_owned(), list);
        }
        Ok(rules)
    }

    /// Rules from `OHX_WEBHOOK_ALLOWED_SOURCES` and `OHX_TRUSTED_PROXIES` (both optional).
    ///
    /// # Errors
    /// When a variable does not parse.
    pub fn from_env() -> Result<Self, String> {
        let var = |n: &str| std::env::var(n).unwrap_or_default();
        Self::parse(
            &var("OHX_WEBHOOK_ALLOWED_SOURCES"),
            &var("OHX_TRUSTED_PROXIES"),
        )
        .map_err(|e| format!("OHX_WEBHOOK_ALLOWED_SOURCES / OHX_TRUSTED_PROXIES: {e}"))
    }

    fn trusted(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|n| n.contains(&ip))
    }

    /// The client's address: the peer, or, when the peer is a trusted proxy, the last
    /// `X-Forwarded-For` hop that is not one (`None` when it cannot be told).
    #[must_use]
    pub fn client(&self, peer: Option<IpAddr>, forwarded_for: Option<&str>) -> Option<IpAddr> {
        let peer = peer?;
        if !self.trusted(peer) {
            return Some(peer);
        }
        let hops: Vec<IpAddr> = forwarded_for?
            .split(',')
            .map(|h| h.trim().parse::<IpAddr>())
            .collect::<Result<_, _>>()
            .ok()?;
        hops.into_iter().rev().find(|ip| !self.trusted(*ip))
    }

    /// Whether a webhook of `provider` from `client` is allowed: always when the provider has
    /// no list; with a list, only from an address in it.
    #[must_use]
    pub fn allows(&self, provider: &str, client: Option<IpAddr>) -> bool {
        match self.allowed.get(provider) {
            None => true,
            Some(list) => client.is_some_and(|ip| list.iter().any(|n| n.contains(&ip))),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn test_a_provider_without_a_list_is_open_and_one_with_a_list_is_not() {
        let r = SourceRules::parse("omron=203.0.113.0/24 198.51.100.7", "").unwrap();
        assert!(r.allows("withings", Some(ip("192.0.2.1"))));
        assert!(r.allows("withings", None));
        assert!(r.allows("omron", Some(ip("203.0.113.200"))));
        assert!(r.allows("omron", Some(ip("198.51.100.7"))));
        assert!(!r.allows("omron", Some(ip("198.51.100.8"))));
        assert!(
            !r.allows("omron", None),
            "an unknown address is not in the list"
        );
    }

    #[test]
    fn test_forwarded_for_is_believed_only_from_trusted_proxies() {
        let r = SourceRules::parse("omron=203.0.113.0/24", "10.0.0.0/8").unwrap();
        // Directly connected: the peer, whatever the header says.
        assert_eq!(
            r.client(Some(ip("192.0.2.9")), Some("203.0.113.5")),
            Some(ip("192.0.2.9"))
        );
        // Through the ingress: the last hop before it; a hop the client wrote is ignored.
        assert_eq!(
            r.client(
                Some(ip("10.1.2.3")),
                Some("203.0.113.66, 192.0.2.9, 10.9.9.9")
            ),
            Some(ip("192.0.2.9"))
        );
        assert_eq!(
            r.client(Some(ip("10.1.2.3")), Some("203.0.113.5")),
            Some(ip("203.0.113.5"))
        );
        assert_eq!(r.client(Some(ip("10.1.2.3")), None), None);
        assert_eq!(r.client(Some(ip("10.1.2.3")), Some("junk")), None);
        assert_eq!(r.client(None, Some("203.0.113.5")), None);
    }

    #[test]
    fn test_malformed_rules_are_refused() {
        assert!(SourceRules::parse("omron", "").is_err());
        assert!(SourceRules::parse("omron=", "").is_err());
        assert!(SourceRules::parse("omron=300.1.1.1", "").is_err());
        assert!(SourceRules::parse("", "10.0.0.0/33").is_err());
        assert_eq!(SourceRules::parse("", "").unwrap(), SourceRules::default());
        assert!(SourceRules::parse("omron=2001:db8::/32;google-health=::1", "").is_ok());
    }
}
