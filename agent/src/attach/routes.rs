//! Which local interface a pod's address is routed to: a pod is attached on this node when
//! the route to its IP leaves through a local interface (the routed layout of Calico and
//! most CNIs: a /32 or /128 per pod on its host-side veth).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The interface a direct (gateway-less, non-default) route for `ip` leaves through, read
/// from this thread's network namespace. `None` for addresses reached via a gateway, the
/// default route or loopback.
pub fn local_interface(ip: IpAddr) -> Option<String> {
    match ip {
        IpAddr::V4(v4) => {
            let table = std::fs::read_to_string("/proc/thread-self/net/route").ok()?;
            ipv4_route(&table, v4)
        }
        IpAddr::V6(v6) => {
            let table = std::fs::read_to_string("/proc/thread-self/net/ipv6_route").ok()?;
            ipv6_route(&table, v6)
        }
    }
}

fn ipv4_route(table: &str, ip: Ipv4Addr) -> Option<String> {
    // Iface Destination Gateway Flags RefCnt Use Metric Mask ...; addresses in host order
    // of a little-endian u32 as hex.
    let addr = u32::from_le_bytes(ip.octets());
    let mut best: Option<(u32, &str, u32)> = None;
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            continue;
        }
        let (Ok(dest), Ok(gateway), Ok(mask)) = (
            u32::from_str_radix(f[1], 16),
            u32::from_str_radix(f[2], 16),
            u32::from_str_radix(f[7], 16),
        ) else {
            continue;
        };
        if addr & mask == dest && best.is_none_or(|(m, _, _)| mask.count_ones() > m.count_ones()) {
            best = Some((mask, f[0], gateway));
        }
    }
    let (mask, iface, gateway) = best?;
    (mask != 0 && gateway == 0 && iface != "lo").then(|| iface.to_string())
}

fn ipv6_route(table: &str, ip: Ipv6Addr) -> Option<String> {
    // dest prefixlen src srcprefixlen nexthop metric refcnt use flags iface
    let addr = u128::from(ip);
    let mut best: Option<(u32, String, u128)> = None;
    for line in table.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 {
            continue;
        }
        let (Ok(dest), Ok(len), Ok(next_hop)) = (
            u128::from_str_radix(f[0], 16),
            u32::from_str_radix(f[1], 16),
            u128::from_str_radix(f[4], 16),
        ) else {
            continue;
        };
        let mask = if len == 0 {
            0
        } else {
            u128::MAX << (128 - len.min(128))
        };
        if addr & mask == dest && best.as_ref().is_none_or(|(l, _, _)| len > *l) {
            best = Some((len, f[9].to_string(), next_hop));
        }
    }
    let (len, iface, next_hop) = best?;
    (len != 0 && next_hop == 0 && iface != "lo").then_some(iface)
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
    }
}
