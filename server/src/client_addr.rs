//! The client's own address, for logs and any per-address accounting.
//!
//! Behind a gateway every TCP peer is the gateway. It names the client in
//! `X-Forwarded-For` (each proxy appends the address it saw) or `X-Real-IP`,
//! but anyone can send those headers, so they are believed only from a peer
//! in `--trusted-proxies` (none by default). From a trusted peer the client
//! is the rightmost `X-Forwarded-For` entry that is not itself a trusted
//! proxy: entries to its left were written by the client or by proxies we do
//! not know, and could say anything. A header that does not parse is never
//! guessed at: the client is then the TCP peer.
//!
//! [`connections`](crate::connections) puts each connection's TCP peer in
//! its requests' extensions as [`PeerAddr`]; [`TrustedProxies::resolve`]
//! adds the [`ClientAddr`] that the request spans log.

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use http::HeaderMap;
use ipnet::IpNet;

/// The TCP peer of the connection a request came on.
#[derive(Clone, Copy, Debug)]
pub struct PeerAddr(pub SocketAddr);

/// The client's address: the peer, or what a trusted proxy says of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientAddr(pub IpAddr);

/// One `--trusted-proxies` entry: a CIDR range, or one address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProxyRange(IpNet);

impl FromStr for ProxyRange {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        text.parse::<IpNet>()
            .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
            .map(|net| ProxyRange(net.trunc()))
            .map_err(|_| format!("not an address or CIDR range: {text:?}"))
    }
}

/// The proxies whose forwarding headers are believed.
#[derive(Clone, Debug, Default)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    pub fn new(ranges: &[ProxyRange]) -> TrustedProxies {
        TrustedProxies(ranges.iter().map(|range| range.0).collect())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn trusts(&self, addr: IpAddr) -> bool {
        self.0.iter().any(|net| net.contains(&addr))
    }

    /// The client's address for a request from `peer` with `headers`.
    pub fn client_addr(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        // An IPv4 client on a dual-stack socket arrives as ::ffff:a.b.c.d;
        // ranges are written as plain IPv4.
        let peer = peer.to_canonical();
        if !self.trusts(peer) {
            return peer;
        }
        let forwarded: Vec<_> = headers.get_all("x-forwarded-for").iter().collect();
        if !forwarded.is_empty() {
            return self.client_in_forwarded_for(&forwarded).unwrap_or(peer);
        }
        headers
            .get("x-real-ip")
            .and_then(|value| value.to_str().ok())
            .and_then(parse_entry)
            .unwrap_or(peer)
    }

    /// The rightmost untrusted entry; if every entry is a trusted proxy, the
    /// leftmost (the first hop we know of). `None` if an entry that would
    /// have to be read does not parse.
    fn client_in_forwarded_for(&self, values: &[&http::HeaderValue]) -> Option<IpAddr> {
        let mut leftmost = None;
        // Several header lines are one list, in order.
        for value in values.iter().rev() {
            for entry in value.to_str().ok()?.rsplit(',') {
                let addr = parse_entry(entry)?;
                if !self.trusts(addr) {
                    return Some(addr);
                }
                leftmost = Some(addr);
            }
        }
        leftmost
    }

    /// Adds the [`ClientAddr`] of a request that carries a [`PeerAddr`].
    pub fn resolve<B>(&self, mut request: http::Request<B>) -> http::Request<B> {
        if let Some(PeerAddr(peer)) = request.extensions().get::<PeerAddr>().copied() {
            let client = self.client_addr(peer.ip(), request.headers());
            request.extensions_mut().insert(ClientAddr(client));
        }
        request
    }
}

/// One forwarded address: `1.2.3.4`, `2001:db8::1`, or either with a port
/// (`1.2.3.4:5678`, `[2001:db8::1]:443`), as some proxies write them.
fn parse_entry(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    entry
        .parse::<IpAddr>()
        .or_else(|_| entry.parse::<SocketAddr>().map(|addr| addr.ip()))
        .ok()
        .map(|addr| addr.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trusted(ranges: &[&str]) -> TrustedProxies {
        let ranges: Vec<ProxyRange> = ranges.iter().map(|r| r.parse().unwrap()).collect();
        TrustedProxies::new(&ranges)
    }

    fn headers(pairs: &[(&'static str, &[u8])]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, http::HeaderValue::from_bytes(value).unwrap());
        }
        map
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    const GATEWAY: &str = "10.0.0.5";

    #[test]
    fn ranges_parse_as_cidr_or_single_addresses_and_nothing_else() {
        let proxies = trusted(&["10.0.0.0/8", "192.168.1.7", " fd00::/8 ", "::1"]);
        assert!(proxies.trusts(ip("10.200.3.4")));
        assert!(proxies.trusts(ip("192.168.1.7")));
        assert!(!proxies.trusts(ip("192.168.1.8")));
        assert!(proxies.trusts(ip("fd12::1")));
        assert!(proxies.trusts(ip("::1")));
        // Host bits set in a range mean the range.
        assert_eq!(
            "10.1.2.3/8".parse::<ProxyRange>(),
            "10.0.0.0/8".parse::<ProxyRange>()
        );
        for bad in ["", "10.0.0.0/33", "localhost", "10.0.0", "1.2.3.4/8/8", "*"] {
            assert!(bad.parse::<ProxyRange>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn headers_from_an_untrusted_peer_are_ignored() {
        let spoofed = headers(&[
            ("x-forwarded-for", b"203.0.113.9"),
            ("x-real-ip", b"203.0.113.9"),
        ]);
        let none = TrustedProxies::default();
        assert_eq!(
            none.client_addr(ip("198.51.100.2"), &spoofed),
            ip("198.51.100.2")
        );
        let some = trusted(&["10.0.0.0/8"]);
        assert_eq!(
            some.client_addr(ip("198.51.100.2"), &spoofed),
            ip("198.51.100.2")
        );
    }

    #[test]
    fn a_trusted_proxy_names_the_rightmost_untrusted_hop() {
        let proxies = trusted(&["10.0.0.0/8"]);
        let peer = ip(GATEWAY);
        // What nginx's $proxy_add_x_forwarded_for makes of a client that sent
        // its own header: the spoofed entry stays on the left.
        let cases: &[(&[&[u8]], &str)] = &[
            (&[b"198.51.100.2"], "198.51.100.2"),
            (&[b"203.0.113.9, 198.51.100.2"], "198.51.100.2"),
            (&[b"203.0.113.9,198.51.100.2, 10.1.1.1"], "198.51.100.2"),
            // Several header lines are one list.
            (&[b"203.0.113.9", b"198.51.100.2"], "198.51.100.2"),
            // Ports and IPv6 as some proxies write them.
            (&[b"198.51.100.2:5123"], "198.51.100.2"),
            (&[b"[2001:db8::7]:443"], "2001:db8::7"),
            (&[b"2001:db8::7"], "2001:db8::7"),
            (&[b"::ffff:198.51.100.2"], "198.51.100.2"),
            // Only proxies in the chain: the first one we know of.
            (&[b"10.9.9.9, 10.1.1.1"], "10.9.9.9"),
            // Garbage left of the client is never read.
            (&[b"not an address, 198.51.100.2"], "198.51.100.2"),
        ];
        for (values, expected) in cases {
            let pairs: Vec<(&'static str, &[u8])> =
                values.iter().map(|v| ("x-forwarded-for", *v)).collect();
            assert_eq!(
                proxies.client_addr(peer, &headers(&pairs)),
                ip(expected),
                "{values:?}"
            );
        }
    }

    #[test]
    fn malformed_headers_fall_back_to_the_peer() {
        let proxies = trusted(&["10.0.0.0/8"]);
        let peer = ip(GATEWAY);
        let malformed: &[&[u8]] = &[
            b"",
            b" ",
            b",",
            b"198.51.100.2,",
            b"unknown",
            b"198.51.100.2, garbage",
            b"198.51.100.256",
            b"\xff\xfe",
            b"1.2.3.4:99999",
            b"[2001:db8::7",
        ];
        for value in malformed {
            let with = headers(&[("x-forwarded-for", value)]);
            assert_eq!(proxies.client_addr(peer, &with), peer, "{value:?}");
            let with = headers(&[("x-real-ip", value)]);
            assert_eq!(proxies.client_addr(peer, &with), peer, "{value:?}");
        }
        let long = "1.2.3.4, ".repeat(2000) + "x";
        let with = headers(&[("x-forwarded-for", long.as_bytes())]);
        assert_eq!(proxies.client_addr(peer, &with), peer);
    }

    #[test]
    fn x_real_ip_is_read_only_without_x_forwarded_for() {
        let proxies = trusted(&["10.0.0.0/8"]);
        let peer = ip(GATEWAY);
        let real = headers(&[("x-real-ip", b"198.51.100.2")]);
        assert_eq!(proxies.client_addr(peer, &real), ip("198.51.100.2"));
        let both = headers(&[
            ("x-real-ip", b"203.0.113.9"),
            ("x-forwarded-for", b"198.51.100.2"),
        ]);
        assert_eq!(proxies.client_addr(peer, &both), ip("198.51.100.2"));
        assert_eq!(proxies.client_addr(peer, &HeaderMap::new()), peer);
    }

    #[test]
    fn an_ipv4_peer_on_a_dual_stack_socket_matches_ipv4_ranges() {
        let proxies = trusted(&["127.0.0.1"]);
        let with = headers(&[("x-forwarded-for", b"127.0.0.7")]);
        assert_eq!(
            proxies.client_addr(ip("::ffff:127.0.0.1"), &with),
            ip("127.0.0.7")
        );
    }

    #[test]
    fn requests_carry_the_resolved_address() {
        let proxies = trusted(&["10.0.0.0/8"]);
        let mut request = http::Request::builder()
            .header("x-forwarded-for", "198.51.100.2")
            .body(())
            .unwrap();
        request
            .extensions_mut()
            .insert(PeerAddr(SocketAddr::new(ip(GATEWAY), 40000)));
        let request = proxies.resolve(request);
        assert_eq!(
            request.extensions().get::<ClientAddr>(),
            Some(&ClientAddr(ip("198.51.100.2")))
        );
        let without_peer = proxies.resolve(http::Request::new(()));
        assert!(without_peer.extensions().get::<ClientAddr>().is_none());
    }
}
