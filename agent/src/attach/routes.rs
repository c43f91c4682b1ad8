//! The node's routes: which device holds the host route (a /32 or /128 per pod on its
//! host-side veth, the routed layout of Calico and most CNIs) to a pod's address, and which
//! devices carry the default route (the uplinks).

use std::net::IpAddr;

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

    /// Every host route (/32, /128, no gateway): address to interface. A full-length route is
    /// always the longest match of its address, so the route the node uses for it.
    pub fn host_routes(&self) -> std::collections::BTreeMap<IpAddr, String> {
        let v4 = self
            .ipv4
            .iter()
            .filter(|(_, mask, gateway, _)| *mask == u32::MAX && *gateway == 0)
            .map(|(dest, _, _, iface)| (IpAddr::from(dest.to_le_bytes()), iface.clone()));
        let v6 = self
            .ipv6
            .iter()
            .filter(|(_, len, next_hop, _)| *len == 128 && *next_hop == 0)
            .map(|(dest, _, _, iface)| (IpAddr::from(dest.to_be_bytes()), iface.clone()));
        let mut out = std::collections::BTreeMap::new();
        for (ip, iface) in v4.chain(v6) {
            out.entry(ip).or_insert(iface);
        }
        out
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_routes_name_the_pod_interface() {
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
            eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
            eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
            cali1\t0A00010A\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n";
        let v6 = "fd770001000000000000000000000010 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 00000001 cali1\n\
                  00000000000000000000000000000000 00 00000000000000000000000000000000 00 fd000000000000000000000000000001 00000400 00000001 00000000 00000003 eth0\n";
        let tables = RouteTables::parse(table, v6);
        let host = tables.host_routes();
        let route = |ip: &str| host.get(&ip.parse::<IpAddr>().unwrap()).map(String::as_str);
        assert_eq!(route("10.1.0.10"), Some("cali1"));
        assert_eq!(route("fd77:1::10"), Some("cali1"));
        assert_eq!(
            host.len(),
            2,
            "the uplink's /24 and the default routes are no pod's host route: {host:?}"
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
