//! Who is calling: the client address behind trusted proxies, and the
//! allow and deny lists.

use std::net::{IpAddr, SocketAddr};

use axum::http::HeaderMap;
use ipnet::IpNet;

/// CIDR lists in force for every request.
#[derive(Debug, Clone, Default)]
pub struct IpPolicy {
    /// Empty: every address is allowed (unless denied).
    pub allow: Vec<IpNet>,
    pub deny: Vec<IpNet>,
    /// Peers whose X-Forwarded-For is believed.
    pub trusted_proxies: Vec<IpNet>,
}

impl IpPolicy {
    /// Denied wins over allowed; an empty allow list allows all.
    pub fn permits(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        if contains(&self.deny, ip) {
            return false;
        }
        self.allow.is_empty() || contains(&self.allow, ip)
    }

    /// The client's address: the socket peer, unless the peer is a trusted
    /// proxy; then the right-most address of X-Forwarded-For that is not a
    /// trusted proxy. Entries left of that were written by the client and
    /// prove nothing, so a forged header from an untrusted peer changes
    /// nothing.
    pub fn client_ip(&self, peer: SocketAddr, headers: &HeaderMap) -> IpAddr {
        let mut client = canonical(peer.ip());
        if !contains(&self.trusted_proxies, client) {
            return client;
        }
        // Split as bytes: a value the client started with a non-ASCII byte
        // is not all garbage, since the proxy appended the real address to
        // it (and dropping the whole value would make the proxy the client).
        let hops: Vec<&[u8]> = headers
            .get_all("x-forwarded-for")
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .collect();
        for hop in hops.iter().rev() {
            match std::str::from_utf8(hop).ok().and_then(parse_hop) {
                Some(ip) => {
                    client = ip;
                    if !contains(&self.trusted_proxies, ip) {
                        return ip;
                    }
                }
                // Garbage written by (or passed through) the nearest hop:
                // stop at the last address we could vouch for.
                None => return client,
            }
        }
        client
    }
}

/// Whether `ip` is in any of `nets`.
pub fn contains(nets: &[IpNet], ip: IpAddr) -> bool {
    let ip = canonical(ip);
    nets.iter().any(|n| n.contains(&ip))
}

/// IPv4-mapped IPv6 (`::ffff:192.0.2.1`, what a dual-stack socket reports)
/// is treated as the IPv4 address it is.
pub(crate) fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// One X-Forwarded-For entry: an address, possibly with a port, possibly
/// bracketed (`[2001:db8::1]:443`).
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    if let Ok(sa) = hop.parse::<SocketAddr>() {
        return Some(canonical(sa.ip()));
    }
    hop.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .and_then(|h| h.parse().ok())
        .map(canonical)
}

/// Parses a CIDR list, accepting bare addresses as /32 or /128.
pub fn parse_nets(items: &[String]) -> Result<Vec<IpNet>, String> {
    items
        .iter()
        .map(|s| {
            let s = s.trim();
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                .map(canonical_net)
                .map_err(|_| format!("{s:?} is not an address or CIDR range (e.g. 203.0.113.0/24, 2001:db8::/32)"))
        })
        .collect()
}

/// An IPv4-mapped range (`::ffff:203.0.113.0/120`) as the IPv4 range it
/// is: client addresses are compared in their IPv4 form ([`canonical`]),
/// so the mapped form of an entry would never match (for `deny`, a list
/// that silently lets everyone through).
fn canonical_net(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.network().to_ipv4_mapped() {
            Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
                .map(IpNet::V4)
                .unwrap_or(net),
            None => net,
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(items: &[&str]) -> Vec<IpNet> {
        parse_nets(&items.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    fn xff(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", value.parse().unwrap());
        h
    }

    #[test]
    fn allow_and_deny_lists_with_ipv4_and_ipv6() {
        let policy = IpPolicy {
            allow: nets(&["203.0.113.0/24", "2001:db8::/32"]),
            deny: nets(&["203.0.113.66", "2001:db8:bad::/48"]),
            ..Default::default()
        };
        assert!(policy.permits("203.0.113.5".parse().unwrap()));
        assert!(
            !policy.permits("203.0.113.66".parse().unwrap()),
            "deny wins"
        );
        assert!(
            !policy.permits("198.51.100.1".parse().unwrap()),
            "not allowed"
        );
        assert!(policy.permits("2001:db8::1".parse().unwrap()));
        assert!(!policy.permits("2001:db8:bad::1".parse().unwrap()));
        assert!(
            policy.permits("::ffff:203.0.113.5".parse().unwrap()),
            "v4-mapped"
        );
        let open = IpPolicy::default();
        assert!(open.permits("198.51.100.1".parse().unwrap()));
    }

    #[test]
    fn forwarded_for_is_ignored_from_untrusted_peers() {
        let policy = IpPolicy {
            trusted_proxies: nets(&["10.0.0.0/8"]),
            ..Default::default()
        };
        let peer: SocketAddr = "198.51.100.7:5000".parse().unwrap();
        assert_eq!(
            policy.client_ip(peer, &xff("203.0.113.1")),
            "198.51.100.7".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn the_rightmost_untrusted_hop_is_the_client() {
        let policy = IpPolicy {
            trusted_proxies: nets(&["10.0.0.0/8", "fd00::/8"]),
            ..Default::default()
        };
        let proxy: SocketAddr = "10.0.0.2:5000".parse().unwrap();
        // The client forged "1.2.3.4"; the proxy appended the real address.
        assert_eq!(
            policy.client_ip(proxy, &xff("1.2.3.4, 198.51.100.9, 10.0.0.1")),
            "198.51.100.9".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            policy.client_ip(proxy, &xff("[2001:db8::5]:443")),
            "2001:db8::5".parse::<IpAddr>().unwrap()
        );
        // No header: the proxy itself.
        assert_eq!(
            policy.client_ip(proxy, &HeaderMap::new()),
            "10.0.0.2".parse::<IpAddr>().unwrap()
        );
        // Garbage: stop at the last hop we can vouch for.
        assert_eq!(
            policy.client_ip(proxy, &xff("198.51.100.9, not-an-ip")),
            "10.0.0.2".parse::<IpAddr>().unwrap()
        );
        // A client that starts the header with a non-ASCII byte does not
        // hide the address the proxy appended after it.
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            axum::http::HeaderValue::from_bytes(b"\xff\xfe, 198.51.100.9").unwrap(),
        );
        assert_eq!(
            policy.client_ip(proxy, &h),
            "198.51.100.9".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn ipv4_mapped_entries_match_ipv4_clients() {
        let policy = IpPolicy {
            deny: nets(&["::ffff:203.0.113.0/120", "::ffff:198.51.100.7"]),
            ..Default::default()
        };
        for client in ["203.0.113.9", "::ffff:203.0.113.9", "198.51.100.7"] {
            assert!(!policy.permits(client.parse().unwrap()), "{client}");
        }
        assert!(policy.permits("198.51.100.8".parse().unwrap()));
    }

    #[test]
    fn bad_cidrs_are_rejected() {
        assert!(parse_nets(&["10.0.0.0/33".into()]).is_err());
        assert!(parse_nets(&["example.com".into()]).is_err());
        assert_eq!(nets(&["192.0.2.1"])[0].to_string(), "192.0.2.1/32");
    }
}
