//! kube-proxy's iptables mode on a lab node: the `iptables-restore` input that
//! `pkg/proxy/iptables/proxier.go` (`syncProxyRules`) writes for ClusterIP services, and the
//! jump rules it ensures from the built-in chains, applied inside the node namespace. Tests
//! then see ClusterIP traffic DNATed to backend pods exactly as on a real node.
//!
//! Reproduced with kube-proxy's defaults: no `--masquerade-all`, local traffic detected by
//! cluster CIDR (`! -s CIDR -j KUBE-MARK-MASQ`), masquerade bit 14, `MASQUERADE
//! --random-fully` (iptables >= 1.6.2), localhost NodePorts on IPv4 (with kubelet's
//! `KUBE-FIREWALL` rule), NodePorts on every local address, and the `KUBE-FORWARD` rule that
//! drops conntrack-INVALID packets in FORWARD (`nf_conntrack_tcp_be_liberal` unset): a
//! forged ICMP error about no flow the node's conntrack knows dies there, as on a real node.
//! NodePorts, external IPs and load-balancer addresses with the default external traffic
//! policy (`Cluster`: masqueraded, so the backend sees the node as the source). Left out:
//! session affinity, the `Local` traffic policies,
//! the canary chains, nfacct counters, and the conntrack cleanup kube-proxy does when a UDP
//! endpoint goes away (an existing UDP flow keeps its old backend here).
//!
//! Rules come in kube-proxy's write order; services by name (kube-proxy walks a map, so any
//! order is its own), endpoints by `ip:port` text as its endpoints cache sorts them.

use std::{
    collections::BTreeSet,
    io::Write as _,
    net::{IpAddr, SocketAddr},
    process::{Command, Stdio},
};

use sha2::{Digest as _, Sha256};

use crate::run;

/// Transport protocol of a service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Proto {
    /// kube-proxy's spelling: `strings.ToLower(string(v1.Protocol))`.
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// One port of a ClusterIP service in one IP family, with its ready endpoints. A dual-stack
/// service is two of these with the same names, one per cluster IP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    /// Namespace of the service.
    pub namespace: String,
    /// Name of the service.
    pub service: String,
    /// Name of the port in the service spec; empty for a single unnamed port.
    pub port_name: String,
    /// Protocol of the port.
    pub protocol: Proto,
    /// The cluster IP; its family selects `iptables` or `ip6tables`.
    pub cluster_ip: IpAddr,
    /// The service port.
    pub port: u16,
    /// Endpoint addresses and target ports. Endpoints of the other family are ignored, as
    /// each family's kube-proxy only sees its own; none at all means REJECT.
    pub endpoints: Vec<(IpAddr, u16)>,
    /// The NodePort of a NodePort Service, opened on every local address.
    pub node_port: Option<u16>,
    /// External IPs and load-balancer addresses of the cluster IP's family, DNATed inside
    /// the node like the cluster IP (and masqueraded).
    pub external_ips: Vec<IpAddr>,
}

impl ServicePort {
    /// kube-proxy's `ServicePortName.String()`: `ns/svc:port`, or `ns/svc` for an unnamed
    /// port.
    pub fn name(&self) -> String {
        if self.port_name.is_empty() {
            format!("{}/{}", self.namespace, self.service)
        } else {
            format!("{}/{}:{}", self.namespace, self.service, self.port_name)
        }
    }

    /// The service chain, `KUBE-SVC-` and 16 characters of base32(sha256(name + protocol)).
    pub fn svc_chain(&self) -> String {
        format!(
            "KUBE-SVC-{}",
            hash16(&format!("{}{}", self.name(), self.protocol.as_str()))
        )
    }

    /// The external traffic chain of a NodePort, `KUBE-EXT-` and the hash of the service
    /// chain.
    pub fn ext_chain(&self) -> String {
        format!(
            "KUBE-EXT-{}",
            hash16(&format!("{}{}", self.name(), self.protocol.as_str()))
        )
    }

    /// The chain of one endpoint, `KUBE-SEP-` and 16 characters of
    /// base32(sha256(name + protocol + "ip:port")).
    pub fn sep_chain(&self, endpoint: (IpAddr, u16)) -> String {
        format!(
            "KUBE-SEP-{}",
            hash16(&format!(
                "{}{}{}",
                self.name(),
                self.protocol.as_str(),
                endpoint_string(endpoint)
            ))
        )
    }

    /// Endpoints of the cluster IP's family, in kube-proxy's order (by `ip:port` text).
    fn family_endpoints(&self) -> Vec<(IpAddr, u16)> {
        let mut eps: Vec<_> = self
            .endpoints
            .iter()
            .copied()
            .filter(|(ip, _)| ip.is_ipv6() == self.cluster_ip.is_ipv6())
            .collect();
        eps.sort_by_key(|&e| endpoint_string(e));
        eps.dedup();
        eps
    }
}

/// `net.JoinHostPort`: `ip:port`, IPv6 as `[ip]:port`.
fn endpoint_string((ip, port): (IpAddr, u16)) -> String {
    SocketAddr::new(ip, port).to_string()
}

/// First 16 characters of Go's `base32.StdEncoding` of sha256(`s`): 80 bits, exactly the
/// first 10 bytes, so no padding is involved.
fn hash16(s: &str) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let digest = Sha256::digest(s.as_bytes());
    let bits = digest[..10]
        .iter()
        .fold(0u128, |acc, &b| (acc << 8) | u128::from(b));
    (0..16)
        .map(|i| ALPHABET[((bits >> (75 - 5 * i)) & 31) as usize] as char)
        .collect()
}

/// kube-proxy's `computeProbability`: `%0.10f` of 1/n.
fn probability(n: usize) -> String {
    format!("{:.10}", 1.0 / n as f64)
}

/// kube-proxy's masquerade mark (bit 14), spelled as in its tests' expected output (the
/// binary writes `0x00004000`: the same value).
const MASQ_MARK: &str = "0x4000";

/// Chain prefixes kube-proxy owns per service; stale ones are flushed and deleted.
const SERVICE_CHAIN_PREFIXES: [&str; 5] = [
    "KUBE-SVC-",
    "KUBE-SVL-",
    "KUBE-EXT-",
    "KUBE-FW-",
    "KUBE-SEP-",
];

/// The `iptables-restore` input kube-proxy writes for one family (`*filter` then `*nat`),
/// meant for `iptables-restore --noflush`: each chain line flushes that chain. `ports` of
/// the other family are skipped; `cluster_cidr` is the pod CIDR of this family (rules mark
/// traffic from outside it for masquerading). The jumps from the built-in chains are not
/// part of it: kube-proxy ensures them with `iptables -I` (see [`apply`]).
pub fn render(ports: &[ServicePort], cluster_cidr: &str, ipv6: bool) -> String {
    render_with_stale(ports, cluster_cidr, ipv6, &[])
}

/// [`render`], also flushing and deleting `stale` service and endpoint chains, as kube-proxy
/// does for the chains `iptables-save` shows but the new state no longer uses.
fn render_with_stale(
    ports: &[ServicePort],
    cluster_cidr: &str,
    ipv6: bool,
    stale: &[String],
) -> String {
    let mut ports: Vec<&ServicePort> = ports
        .iter()
        .filter(|p| p.cluster_ip.is_ipv6() == ipv6)
        .collect();
    ports.sort_by_key(|p| (p.name(), p.protocol));
    // kube-proxy on IPv4 defaults to localhost NodePorts, guarded by kubelet's rule.
    let localhost_nodeports = !ipv6;

    let chain = |name: &str| format!(":{name} - [0:0]");
    let mut filter_chains: Vec<String> = [
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FORWARD",
        "KUBE-NODEPORTS",
        "KUBE-PROXY-FIREWALL",
    ]
    .iter()
    .map(|c| chain(c))
    .collect();
    let mut filter_rules = Vec::new();
    let mut nat_chains: Vec<String> = [
        "KUBE-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
    ]
    .iter()
    .map(|c| chain(c))
    .collect();
    let mut nat_rules = vec![
        format!("-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN"),
        // Clear the mark so a packet that traverses the stack again is not masqueraded twice.
        format!("-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}"),
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully".to_string(),
        format!("-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}"),
    ];
    if localhost_nodeports {
        filter_chains.push(chain("KUBE-FIREWALL"));
        filter_rules.push(
            "-A KUBE-FIREWALL -m comment --comment \"block incoming localnet connections\" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP"
                .to_string(),
        );
    }

    // A NodePort with no endpoints is rejected on the node's addresses.
    let local_dst = "-m addrtype --dst-type LOCAL";
    for sp in ports {
        let name = sp.name();
        let proto = sp.protocol.as_str();
        let dest = format!(
            "-m {proto} -p {proto} -d {} --dport {}",
            sp.cluster_ip, sp.port
        );
        let endpoints = sp.family_endpoints();
        if endpoints.is_empty() {
            // No endpoints: no nat chains, the filter table rejects the cluster IP.
            filter_rules.push(format!(
                "-A KUBE-SERVICES -m comment --comment \"{name} has no endpoints\" {dest} -j REJECT"
            ));
            if let Some(node_port) = sp.node_port {
                filter_rules.push(format!(
                    "-A KUBE-EXTERNAL-SERVICES -m comment --comment \"{name} has no endpoints\" {local_dst} -m {proto} -p {proto} --dport {node_port} -j REJECT"
                ));
            }
            continue;
        }
        let svc_chain = sp.svc_chain();
        let external: Vec<IpAddr> = sp
            .external_ips
            .iter()
            .copied()
            .filter(|ip| ip.is_ipv6() == ipv6)
            .collect();
        if sp.node_port.is_some() || !external.is_empty() {
            // Traffic policy Cluster: masqueraded, as a backend may be on another node.
            let ext = sp.ext_chain();
            nat_chains.push(chain(&ext));
            nat_rules.push(format!(
                "-A {ext} -m comment --comment \"masquerade traffic for {name} external destinations\" -j KUBE-MARK-MASQ"
            ));
            nat_rules.push(format!("-A {ext} -j {svc_chain}"));
            for ip in &external {
                nat_rules.push(format!(
                    "-A KUBE-SERVICES -m comment --comment \"{name} external IP\" -m {proto} -p {proto} -d {ip} --dport {} -j {ext}",
                    sp.port
                ));
            }
            if let Some(node_port) = sp.node_port {
                nat_rules.push(format!(
                    "-A KUBE-NODEPORTS -m comment --comment {name} -m {proto} -p {proto} --dport {node_port} -j {ext}"
                ));
            }
        }
        nat_rules.push(format!(
            "-A KUBE-SERVICES -m comment --comment \"{name} cluster IP\" {dest} -j {svc_chain}"
        ));
        nat_chains.push(chain(&svc_chain));
        // Off-cluster sources reaching a cluster IP get masqueraded (they may be routed
        // to any node and must come back through it).
        nat_rules.push(format!(
            "-A {svc_chain} -m comment --comment \"{name} cluster IP\" {dest} ! -s {cluster_cidr} -j KUBE-MARK-MASQ"
        ));
        let n = endpoints.len();
        for (i, &ep) in endpoints.iter().enumerate() {
            // Endpoint i of n is taken with probability 1/(n-i): uniform overall.
            let statistic = if i + 1 < n {
                format!(
                    " -m statistic --mode random --probability {}",
                    probability(n - i)
                )
            } else {
                String::new()
            };
            nat_rules.push(format!(
                "-A {svc_chain} -m comment --comment \"{name} -> {}\"{statistic} -j {}",
                endpoint_string(ep),
                sp.sep_chain(ep)
            ));
        }
        for &ep in &endpoints {
            let sep = sp.sep_chain(ep);
            nat_chains.push(chain(&sep));
            // Hairpin: a pod reaching itself through the service must be masqueraded.
            nat_rules.push(format!(
                "-A {sep} -m comment --comment {name} -s {} -j KUBE-MARK-MASQ",
                ep.0
            ));
            nat_rules.push(format!(
                "-A {sep} -m comment --comment {name} -m {proto} -p {proto} -j DNAT --to-destination {}",
                endpoint_string(ep)
            ));
        }
    }

    for c in stale {
        nat_chains.push(chain(c));
        nat_rules.push(format!("-X {c}"));
    }
    let local = if ipv6 {
        "-m addrtype --dst-type LOCAL ! -d ::1/128"
    } else if localhost_nodeports {
        "-m addrtype --dst-type LOCAL"
    } else {
        "-m addrtype --dst-type LOCAL ! -d 127.0.0.0/8"
    };
    nat_rules.push(format!(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" {local} -j KUBE-NODEPORTS"
    ));

    filter_rules.push("-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP".to_string());
    filter_rules.push(format!(
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT"
    ));
    filter_rules.push(
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
            .to_string(),
    );

    let mut out = String::from("*filter\n");
    for line in filter_chains.iter().chain(&filter_rules) {
        out.push_str(line);
        out.push('\n');
    }
    out.push_str("COMMIT\n*nat\n");
    for line in nat_chains.iter().chain(&nat_rules) {
        out.push_str(line);
        out.push('\n');
    }
    out.push_str("COMMIT\n");
    out
}

/// kube-proxy's `iptablesJumpChains` and kubelet's `KUBE-FIREWALL` jumps, in the order
/// kube-proxy ensures them (each prepended, so a fresh node lists them reversed): table,
/// built-in chain, kube chain, whether only `--ctstate NEW` jumps, comment.
const JUMPS: &[(&str, &str, &str, bool, &str)] = &[
    ("filter", "INPUT", "KUBE-EXTERNAL-SERVICES", true, EXTERNAL),
    (
        "filter",
        "FORWARD",
        "KUBE-EXTERNAL-SERVICES",
        true,
        EXTERNAL,
    ),
    ("filter", "INPUT", "KUBE-NODEPORTS", false, HEALTH),
    ("filter", "FORWARD", "KUBE-SERVICES", true, PORTALS),
    ("filter", "OUTPUT", "KUBE-SERVICES", true, PORTALS),
    ("filter", "FORWARD", "KUBE-FORWARD", false, FORWARDING),
    ("filter", "INPUT", "KUBE-PROXY-FIREWALL", true, LB_FIREWALL),
    ("filter", "OUTPUT", "KUBE-PROXY-FIREWALL", true, LB_FIREWALL),
    (
        "filter",
        "FORWARD",
        "KUBE-PROXY-FIREWALL",
        true,
        LB_FIREWALL,
    ),
    ("nat", "OUTPUT", "KUBE-SERVICES", false, PORTALS),
    ("nat", "PREROUTING", "KUBE-SERVICES", false, PORTALS),
    ("nat", "POSTROUTING", "KUBE-POSTROUTING", false, POSTROUTING),
    ("filter", "INPUT", "KUBE-FIREWALL", false, ""),
    ("filter", "OUTPUT", "KUBE-FIREWALL", false, ""),
];
const EXTERNAL: &str = "kubernetes externally-visible service portals";
const HEALTH: &str = "kubernetes health check service ports";
const PORTALS: &str = "kubernetes service portals";
const FORWARDING: &str = "kubernetes forwarding rules";
const LB_FIREWALL: &str = "kubernetes load balancer firewall";
const POSTROUTING: &str = "kubernetes postrouting rules";

/// Runs one iptables command inside `netns`; true when it succeeded.
fn iptables_ok(netns: &str, bin: &str, args: &[&str]) -> bool {
    Command::new("ip")
        .args(["netns", "exec", netns, bin, "-w"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("spawn ip netns exec {netns} {bin}: {e}"))
        .success()
}

/// Device of the node namespace that the cluster IPs are routed to (see [`apply`]): a
/// `dummy`, or an `ifb` where the kernel has no dummy driver.
pub const SERVICE_DEVICE: &str = "tg-svc";

/// Programs the node namespace like kube-proxy's sync: for each family, ensures the jumps
/// from the built-in chains (`-C`, else `-I`), finds service chains that are no longer used
/// (`iptables-save -t nat`), then `iptables-restore --noflush` of [`render`]'s text with
/// those stale chains deleted. Calling it again with other endpoints replaces the rules and
/// leaves every rule that is not kube-proxy's alone. Panics (with the restore input) when a
/// command fails; needs `iptables` (iptables-nft on Debian).
///
/// It also routes each cluster IP to the sink device [`SERVICE_DEVICE`], standing in for a
/// real node's default route: a packet for a cluster IP without endpoints must get past
/// routing to reach kube-proxy's REJECT in FORWARD (the lab node has no route to it
/// otherwise, and answers "network unreachable"), and the node itself connects to cluster
/// IPs only if routing finds them before OUTPUT's DNAT. Whatever the rules let through dies
/// in that device: nothing leaves the namespace.
///
/// The lab node has no IPv6 address to send ICMPv6 errors from, so an IPv6 REJECT stays
/// silent (the client times out instead of being refused) until the test gives it one, as
/// a real node has: e.g. `ip -n NODE addr add fd77:ff::1/128 dev lo`.
pub fn apply(
    node_netns: &str,
    ports: &[ServicePort],
    cluster_cidr_v4: &str,
    cluster_cidr_v6: &str,
) {
    assert!(
        Command::new("iptables-restore")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success()),
        "iptables-restore is missing: apt-get install iptables"
    );
    // What kube-proxy sets for localhost NodePorts on IPv4 (its default).
    run(
        "ip",
        &[
            "netns",
            "exec",
            node_netns,
            "sysctl",
            "-qw",
            "net.ipv4.conf.all.route_localnet=1",
        ],
    );
    route_cluster_ips(node_netns, ports);
    for (ipv6, cidr) in [(false, cluster_cidr_v4), (true, cluster_cidr_v6)] {
        let (bin, restore, save) = if ipv6 {
            ("ip6tables", "ip6tables-restore", "ip6tables-save")
        } else {
            ("iptables", "iptables-restore", "iptables-save")
        };
        for &(table, from, to, new_only, comment) in JUMPS {
            // "Chain already exists" is fine: EnsureChain.
            iptables_ok(node_netns, bin, &["-t", table, "-N", to]);
            let mut rule = vec!["-t", table, "-C", from];
            if new_only {
                rule.extend(["-m", "conntrack", "--ctstate", "NEW"]);
            }
            if !comment.is_empty() {
                rule.extend(["-m", "comment", "--comment", comment]);
            }
            rule.extend(["-j", to]);
            if !iptables_ok(node_netns, bin, &rule) {
                rule[2] = "-I";
                run(
                    "ip",
                    &[&["netns", "exec", node_netns, bin, "-w"][..], &rule].concat(),
                );
            }
        }

        let active: BTreeSet<String> = ports
            .iter()
            .filter(|p| p.cluster_ip.is_ipv6() == ipv6)
            .flat_map(|p| {
                let eps = p.family_endpoints();
                let svc = (!eps.is_empty()).then(|| p.svc_chain());
                svc.into_iter()
                    .chain(eps.into_iter().map(|ep| p.sep_chain(ep)))
            })
            .collect();
        let saved = run("ip", &["netns", "exec", node_netns, save, "-t", "nat"]);
        let stale: Vec<String> = saved
            .lines()
            .filter_map(|l| l.strip_prefix(':'))
            .filter_map(|l| l.split_whitespace().next())
            .filter(|c| SERVICE_CHAIN_PREFIXES.iter().any(|p| c.starts_with(p)))
            .filter(|c| !active.contains(*c))
            .map(String::from)
            .collect();

        let input = render_with_stale(ports, cidr, ipv6, &stale);
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                node_netns,
                restore,
                "-w",
                "--noflush",
                "--counters",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {restore} in {node_netns}: {e}"));
        child
            .stdin
            .take()
            .expect("restore stdin")
            .write_all(input.as_bytes())
            .unwrap_or_else(|e| panic!("write {restore} input: {e}"));
        let out = child.wait_with_output().expect("wait for iptables-restore");
        assert!(
            out.status.success(),
            "{restore} in {node_netns}: {}\n{}\ninput:\n{input}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Routes exactly the cluster IPs of `ports` to [`SERVICE_DEVICE`], dropping the routes of
/// services that are gone.
fn route_cluster_ips(netns: &str, ports: &[ServicePort]) {
    let exists = Command::new("ip")
        .args(["-n", netns, "link", "show", "dev", SERVICE_DEVICE])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !exists {
        // Both are NOARP sinks that drop what they are given; some kernels lack `dummy`.
        let added = ["dummy", "ifb"].iter().any(|kind| {
            Command::new("ip")
                .args(["-n", netns, "link", "add", SERVICE_DEVICE, "type", kind])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
        assert!(
            added,
            "ip link add {SERVICE_DEVICE} type dummy (or ifb) in {netns} failed"
        );
        run("ip", &["-n", netns, "link", "set", SERVICE_DEVICE, "up"]);
    }
    for family in ["-4", "-6"] {
        run(
            "ip",
            &["-n", netns, family, "route", "flush", "dev", SERVICE_DEVICE],
        );
    }
    let ips: BTreeSet<IpAddr> = ports.iter().map(|p| p.cluster_ip).collect();
    for ip in ips {
        run(
            "ip",
            &[
                "-n",
                netns,
                "route",
                "replace",
                &ip.to_string(),
                "dev",
                SERVICE_DEVICE,
            ],
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(ns: &str, name: &str, ip: &str, endpoints: &[&str]) -> ServicePort {
        ServicePort {
            namespace: ns.into(),
            service: name.into(),
            port_name: "p80".into(),
            protocol: Proto::Tcp,
            cluster_ip: ip.parse().unwrap(),
            port: 80,
            endpoints: endpoints
                .iter()
                .map(|e| {
                    let a: SocketAddr = e.parse().unwrap();
                    (a.ip(), a.port())
                })
                .collect(),
            node_port: None,
            external_ips: vec![],
        }
    }

    /// Chain names from upstream's proxier_test.go expected outputs.
    #[test]
    fn chain_names_match_upstream() {
        let s1 = svc("ns1", "svc1", "172.30.0.41", &["10.180.0.1:80"]);
        assert_eq!(s1.svc_chain(), "KUBE-SVC-XPGD46QRK7WJZT7O");
        assert_eq!(
            s1.sep_chain(("10.180.0.1".parse().unwrap(), 80)),
            "KUBE-SEP-SXIVWICOYRO3J4NJ"
        );
        let s4 = svc("ns4", "svc4", "172.30.0.44", &[]);
        assert_eq!(s4.svc_chain(), "KUBE-SVC-4SW47YFZTEDKD3PK");
        assert_eq!(
            s4.sep_chain(("10.180.0.4".parse().unwrap(), 80)),
            "KUBE-SEP-UKSFD7AGPMPPLUHC"
        );
        assert_eq!(
            s4.sep_chain(("10.180.0.5".parse().unwrap(), 80)),
            "KUBE-SEP-C6EBXVWJJZMIWKLZ"
        );
        assert_eq!(
            svc("ns2", "svc2", "172.30.0.42", &[]).svc_chain(),
            "KUBE-SVC-GNZBNJ2PO5MGZ6GT"
        );
    }

    /// The ns4/svc4 lines of upstream's TestOverallIPTablesRulesWithMultipleServices.
    #[test]
    fn two_endpoints_render_like_upstream() {
        let s4 = svc(
            "ns4",
            "svc4",
            "172.30.0.44",
            // Given out of order: kube-proxy sorts them.
            &["10.180.0.5:80", "10.180.0.4:80"],
        );
        let text = render(&[s4], "10.0.0.0/8", false);
        let nat = text.split("*nat\n").nth(1).unwrap();
        let expected = r#":KUBE-SERVICES - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-SVC-4SW47YFZTEDKD3PK - [0:0]
:KUBE-SEP-UKSFD7AGPMPPLUHC - [0:0]
:KUBE-SEP-C6EBXVWJJZMIWKLZ - [0:0]
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
-A KUBE-SERVICES -m comment --comment "ns4/svc4:p80 cluster IP" -m tcp -p tcp -d 172.30.0.44 --dport 80 -j KUBE-SVC-4SW47YFZTEDKD3PK
-A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 cluster IP" -m tcp -p tcp -d 172.30.0.44 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 -> 10.180.0.4:80" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-UKSFD7AGPMPPLUHC
-A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 -> 10.180.0.5:80" -j KUBE-SEP-C6EBXVWJJZMIWKLZ
-A KUBE-SEP-UKSFD7AGPMPPLUHC -m comment --comment ns4/svc4:p80 -s 10.180.0.4 -j KUBE-MARK-MASQ
-A KUBE-SEP-UKSFD7AGPMPPLUHC -m comment --comment ns4/svc4:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.4:80
-A KUBE-SEP-C6EBXVWJJZMIWKLZ -m comment --comment ns4/svc4:p80 -s 10.180.0.5 -j KUBE-MARK-MASQ
-A KUBE-SEP-C6EBXVWJJZMIWKLZ -m comment --comment ns4/svc4:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.5:80
-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
COMMIT
"#;
        assert_eq!(nat, expected);
    }

    #[test]
    fn no_endpoints_reject_in_filter_and_nothing_in_nat() {
        let s6 = svc("ns6", "svc6", "172.30.0.46", &[]);
        let text = render(&[s6], "10.0.0.0/8", false);
        let (filter, nat) = text.split_once("*nat\n").unwrap();
        assert!(filter.contains(
            "-A KUBE-SERVICES -m comment --comment \"ns6/svc6:p80 has no endpoints\" -m tcp -p tcp -d 172.30.0.46 --dport 80 -j REJECT\n"
        ));
        assert!(!nat.contains("ns6/svc6"), "{nat}");
    }

    #[test]
    fn probabilities_ipv6_udp_and_family_split() {
        let mut sp = svc(
            "ns",
            "dns",
            "fd77:96::a",
            &[
                "[fd77:1::c]:53",
                "[fd77:1::a]:53",
                "[fd77:1::b]:53",
                "10.1.0.10:53",
            ],
        );
        sp.port_name = String::new();
        sp.protocol = Proto::Udp;
        sp.port = 53;
        let v6 = render(std::slice::from_ref(&sp), "fd77:1::/64", true);
        let lines: Vec<&str> = v6.lines().filter(|l| l.contains("-> ")).collect();
        assert_eq!(lines.len(), 3, "{v6}");
        assert!(lines[0].contains(
            "\"ns/dns -> [fd77:1::a]:53\" -m statistic --mode random --probability 0.3333333333 "
        ));
        assert!(lines[1].contains("--probability 0.5000000000 "));
        assert!(!lines[2].contains("statistic"));
        assert!(
            v6.contains(
                "-m udp -p udp -d fd77:96::a --dport 53 ! -s fd77:1::/64 -j KUBE-MARK-MASQ"
            )
        );
        assert!(v6.contains("-m udp -p udp -j DNAT --to-destination [fd77:1::b]:53\n"));
        assert!(v6.contains("-s fd77:1::b -j KUBE-MARK-MASQ\n"));
        assert!(v6.contains("--dst-type LOCAL ! -d ::1/128 -j KUBE-NODEPORTS"));
        assert!(!v6.contains("KUBE-FIREWALL"));
        // The IPv6 cluster IP has no place in the IPv4 tables.
        assert!(!render(&[sp], "10.0.0.0/8", false).contains("ns/dns"));
    }

    #[test]
    fn stale_chains_are_flushed_and_deleted() {
        let text = render_with_stale(&[], "10.0.0.0/8", false, &["KUBE-SEP-AAAA".into()]);
        assert!(text.contains(":KUBE-SEP-AAAA - [0:0]\n"));
        assert!(text.contains("-X KUBE-SEP-AAAA\n"));
    }
}
