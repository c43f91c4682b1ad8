//! Which local interface a pod's address is routed to: a pod is attached on this node when
//! the route to its IP leaves through a local interface (the routed layout of Calico and
//! most CNIs: a /32 or /128 per pod on its host-side veth).

use std::net::IpAddr;
#[cfg(test)]
use std::net::{Ipv4Addr, Ipv6Addr};

/// The routing tables of this thread's network namespace, parsed once per reconcile.
pub struct RouteTables {
    /// (destination, mask, gateway, interface), host-order u32s.
    ipv4: Vec<(u32, u32, u32, String)>,
    /// (destination, prefix length, next hop, interface).
    ipv6: Vec<(u128, u32, u128, String)>,
}

impl RouteTables {
    /// Reads `/proc/thread-self/net/route` and `ipv6_route`.
    pub fn read() -> RouteTables {
        RouteTables::parse(
            &std::fs::read_to_string("/proc/thread-self/net/route").unwrap_or_default(),
            &std::fs::read_to_string("/proc/thread-self/net/ipv6_route").unwrap_or_default(),
        )
    }

    fn parse(ipv4: &str, ipv6: &str) -> RouteTables {
        // Iface Destination Gateway Flags RefCnt Use Metric Mask ...; little-endian hex.
        let v4 = ipv4
            .lines()
            .skip(1)
            .filter_map(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                if f.len() < 8 {
                    return None;
                }
                Some((
                    u32::from_str_radix(f[1], 16).ok()?,
                    u32::from_str_radix(f[7], 16).ok()?,
                    u32::from_str_radix(f[2], 16).ok()?,
                    f[0].to_string(),
                ))
            })
            .collect();
        // dest prefixlen src srcprefixlen nexthop metric refcnt use flags iface
        let v6 = ipv6
            .lines()
            .filter_map(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                if f.len() < 10 {
                    return None;
                }
                Some((
                    u128::from_str_radix(f[0], 16).ok()?,
                    u32::from_str_radix(f[1], 16).ok()?,
                    u128::from_str_radix(f[4], 16).ok()?,
                    f[9].to_string(),
                ))
            })
            .collect();
        RouteTables { ipv4: v4, ipv6: v6 }
    }

    /// The longest-prefix route for `ip`: (prefix length, has a gateway, interface).
    fn best_route(&self, ip: IpAddr) -> Option<(u32, bool, &str)> {
        match ip {
            IpAddr::V4(v4) => {
                let addr = u32::from_le_bytes(v4.octets());
                self.ipv4
                    .iter()
                    .filter(|(dest, mask, _, _)| addr & mask == *dest)
                    .max_by_key(|(_, mask, _, _)| mask.count_ones())
                    .map(|(_, m, g, i)| (m.count_ones(), *g != 0, i.as_str()))
            }
            IpAddr::V6(v6) => {
                let addr = u128::from(v6);
                self.ipv6
                    .iter()
                    .filter(|(dest, len, _, _)| {
                        let mask = if *len == 0 {
                            0
                        } else {
                            u128::MAX << (128 - (*len).min(128))
                        };
                        addr & mask == *dest
                    })
                    .max_by_key(|(_, len, _, _)| *len)
                    .map(|(_, l, n, i)| (*l, *n != 0, i.as_str()))
            }
        }
    }

    /// The interface a direct (gateway-less, non-default) route for `ip` leaves through.
    /// `None` for addresses reached via a gateway, the default route or loopback.
    pub fn local_interface(&self, ip: IpAddr) -> Option<String> {
        let (len, gateway, iface) = self.best_route(ip)?;
        (len != 0 && !gateway && iface != "lo").then(|| iface.to_string())
    }

    /// The interface holding a host route (/32, /128, no gateway) to `ip`, when that is the
    /// route the node uses for it: the routed per-pod device of Calico-style CNIs.
    pub fn host_route_interface(&self, ip: IpAddr) -> Option<&str> {
        let full = if ip.is_ipv4() { 32 } else { 128 };
        let (len, gateway, iface) = self.best_route(ip)?;
        (len == full && !gateway).then_some(iface)
    }

    /// Interfaces that carry a default route (the node's uplinks).
    pub fn default_route_interfaces(&self) -> std::collections::BTreeSet<&str> {
        self.ipv4
            .iter()
            .filter(|(_, mask, _, _)| *mask == 0)
            .map(|(_, _, _, i)| i.as_str())
            .chain(
                self.ipv6
                    .iter()
                    .filter(|(_, len, _, _)| *len == 0)
                    .map(|(_, _, _, i)| i.as_str()),
            )
            .filter(|i| *i != "lo")
            .collect()
    }
}

/// `RouteTables::read().local_interface(ip)`, for a single lookup.
pub fn local_interface(ip: IpAddr) -> Option<String> {
    RouteTables::read().local_interface(ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipv4_route(table: &str, ip: Ipv4Addr) -> Option<String> {
        RouteTables::parse(table, "").local_interface(IpAddr::V4(ip))
    }

    fn ipv6_route(table: &str, ip: Ipv6Addr) -> Option<String> {
        RouteTables::parse("", table).local_interface(IpAddr::V6(ip))
    }

    #[test]
    fn host_routes_name_the_pod_interface() {
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
            eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
            eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
            cali1\t0A00010A\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n";
        assert_eq!(
            ipv4_route(table, Ipv4Addr::new(10, 1, 0, 10)).as_deref(),
            Some("cali1")
        );
        assert_eq!(
            ipv4_route(table, Ipv4Addr::new(10, 9, 9, 9)),
            None,
            "default route"
        );
        assert_eq!(
            ipv4_route(table, Ipv4Addr::new(192, 0, 2, 7)).as_deref(),
            Some("eth0")
        );
        let v6 = "fd770001000000000000000000000010 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 00000001 cali1\n\
                  00000000000000000000000000000000 00 00000000000000000000000000000000 00 fd000000000000000000000000000001 00000400 00000001 00000000 00000003 eth0\n";
        assert_eq!(
            ipv6_route(v6, "fd77:1::10".parse().unwrap()).as_deref(),
            Some("cali1")
        );
        assert_eq!(ipv6_route(v6, "2001:db8::1".parse().unwrap()), None);

        let tables = RouteTables::parse(table, v6);
        assert_eq!(
            tables.host_route_interface("10.1.0.10".parse().unwrap()),
            Some("cali1")
        );
        assert_eq!(
            tables.host_route_interface("192.0.2.7".parse().unwrap()),
            None,
            "a /24 on the uplink is not a pod's host route"
        );
        assert_eq!(
            tables.host_route_interface("fd77:1::10".parse().unwrap()),
            Some("cali1")
        );
        assert_eq!(
            tables
                .default_route_interfaces()
                .into_iter()
                .collect::<Vec<_>>(),
            vec!["eth0"]
        );
    }
}
