//! Allow rules to map entries: the last step of the policy compiler, pure and deterministic.
//!
//! A ruleset is the list of rules that allow traffic of one workload in one direction. Each
//! rule names a peer (a workload identity, or an ipBlock) and the ports it allows. The
//! datapath answers "is (peer, protocol, port) allowed?" with one LPM lookup in `POLICY`,
//! plus, for ipBlocks, one LPM lookup in `CIDR_RULES` that maps the peer address to the
//! ipBlock set it falls in.

use std::collections::{BTreeMap, BTreeSet};

use agent_common::{
    FAMILY_IPV4, FAMILY_IPV6, LPM_ADDR_FIXED_BITS, LpmAddr, PEER_CIDR_SET_BASE,
    POLICY_PREFIX_ANY_PORT, POLICY_PREFIX_ANY_PROTO, PolicyKey,
};
use ipnet::IpNet;

/// Ports a rule allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PortMatch {
    /// Every protocol and port (a NetworkPolicy rule without `ports`).
    Any,
    /// Every port of one IP protocol.
    Protocol(u8),
    /// Ports `first..=last` of one IP protocol.
    Range { proto: u8, first: u16, last: u16 },
}

/// Who a rule allows.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Peer {
    /// Workloads of one identity (namespace + labels).
    Identity(u32),
    /// Addresses in `net` but in none of `except` (NetworkPolicy `ipBlock`).
    Cidr { net: IpNet, except: Vec<IpNet> },
}

impl Peer {
    /// Every address, IPv4 and IPv6: a rule without peers.
    pub fn everyone() -> [Peer; 2] {
        [
            Peer::Cidr {
                net: "0.0.0.0/0".parse().expect("literal"),
                except: vec![],
            },
            Peer::Cidr {
                net: "::/0".parse().expect("literal"),
                except: vec![],
            },
        ]
    }
}

/// One allow rule of a ruleset.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AllowRule {
    pub peer: Peer,
    pub ports: PortMatch,
    /// Carried into the map value, so a decision can be traced back to its policy.
    pub rule_id: u32,
}

/// An LPM key as (prefix length, data): the form both the kernel and user side agree on.
pub type LpmKey<K> = (u32, K);

/// Map entries of one ruleset.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RulesetEntries {
    /// `POLICY` entries: key to rule id.
    pub policy: BTreeMap<LpmKeyOrd<PolicyKey>, u32>,
    /// `CIDR_RULES` entries: address prefix to ipBlock set (a `POLICY` peer).
    pub cidr: BTreeMap<LpmKeyOrd<LpmAddr>, u32>,
}

/// An LPM key with an order, so entry sets diff deterministically.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LpmKeyOrd<K>(pub u32, pub K);

impl Ord for LpmKeyOrd<PolicyKey> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        let k = |x: &Self| (x.1.ruleset, x.1.peer, x.1.proto, x.1.port, x.0);
        k(self).cmp(&k(other))
    }
}
impl PartialOrd for LpmKeyOrd<PolicyKey> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for LpmKeyOrd<LpmAddr> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        let k = |x: &Self| (x.1.scope, x.1.family, x.1.addr, x.0);
        k(self).cmp(&k(other))
    }
}
impl PartialOrd for LpmKeyOrd<LpmAddr> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// Rules that cannot be compiled.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RuleError {
    #[error("except {except} is not inside ipBlock {net}")]
    ExceptOutside { net: IpNet, except: IpNet },
    #[error("except {except} is a different address family from ipBlock {net}")]
    ExceptFamily { net: IpNet, except: IpNet },
    #[error("port range {first}-{last} is empty")]
    EmptyRange { first: u16, last: u16 },
}

/// Stable numbering of ipBlock sets per ruleset: the same set of ports keeps its number
/// across recompiles, so an update never points an address at a set whose meaning changed.
#[derive(Clone, Debug, Default)]
pub struct CidrSetIds {
    ids: BTreeMap<u32, BTreeMap<Vec<(PortMatch, u32)>, u32>>,
}

impl CidrSetIds {
    fn id(&mut self, ruleset: u32, ports: &[(PortMatch, u32)]) -> u32 {
        // Set 0 of every ruleset is the empty set: it never has POLICY entries.
        if ports.is_empty() {
            return 0;
        }
        let sets = self.ids.entry(ruleset).or_default();
        if let Some(id) = sets.get(ports) {
            return *id;
        }
        let used: BTreeSet<u32> = sets.values().copied().collect();
        let id = (1..).find(|n| !used.contains(n)).expect("free id");
        sets.insert(ports.to_vec(), id);
        id
    }

    /// Forgets numbers no longer in use by the ruleset.
    fn retain(&mut self, ruleset: u32, in_use: &BTreeSet<u32>) {
        if let Some(sets) = self.ids.get_mut(&ruleset) {
            sets.retain(|_, id| in_use.contains(id));
        }
    }

    /// Forgets a ruleset entirely.
    pub fn forget(&mut self, ruleset: u32) {
        self.ids.remove(&ruleset);
    }
}

/// Key data and family of an IP prefix in an `LpmAddr` of `scope`.
pub fn lpm_addr(scope: u32, net: &IpNet) -> LpmKeyOrd<LpmAddr> {
    let mut addr = [0u8; 16];
    let family = match net {
        IpNet::V4(n) => {
            addr[..4].copy_from_slice(&n.network().octets());
            FAMILY_IPV4
        }
        IpNet::V6(n) => {
            addr.copy_from_slice(&n.network().octets());
            FAMILY_IPV6
        }
    };
    LpmKeyOrd(
        LPM_ADDR_FIXED_BITS + net.prefix_len() as u32,
        LpmAddr {
            scope,
            family: family as u32,
            addr,
        },
    )
}

/// Splits `first..=last` into the fewest aligned power-of-two blocks, as (port, bits fixed).
pub fn port_blocks(first: u16, last: u16) -> Vec<(u16, u32)> {
    let mut blocks = Vec::new();
    let (mut lo, hi) = (first as u32, last as u32);
    while lo <= hi {
        // Largest block aligned at `lo` that does not pass `hi`.
        let mut size = if lo == 0 {
            1 << 16
        } else {
            1 << lo.trailing_zeros()
        };
        while lo + size - 1 > hi {
            size >>= 1;
        }
        blocks.push((lo as u16, 16 - size.trailing_zeros()));
        lo += size;
    }
    blocks
}

/// `POLICY` keys of one (peer, ports) pair.
fn policy_keys(ruleset: u32, peer: u32, ports: PortMatch) -> Vec<LpmKeyOrd<PolicyKey>> {
    let key = |proto: u8, port: u16| PolicyKey {
        ruleset,
        peer,
        proto,
        port: port.to_be_bytes(),
        kind: 0,
    };
    match ports {
        PortMatch::Any => vec![LpmKeyOrd(POLICY_PREFIX_ANY_PROTO, key(0, 0))],
        PortMatch::Protocol(proto) => vec![LpmKeyOrd(POLICY_PREFIX_ANY_PORT, key(proto, 0))],
        PortMatch::Range { proto, first, last } => port_blocks(first, last)
            .into_iter()
            .map(|(port, bits)| LpmKeyOrd(POLICY_PREFIX_ANY_PORT + bits, key(proto, port)))
            .collect(),
    }
}

fn validate(rule: &AllowRule) -> Result<(), RuleError> {
    if let PortMatch::Range { first, last, .. } = rule.ports
        && first > last
    {
        return Err(RuleError::EmptyRange { first, last });
    }
    if let Peer::Cidr { net, except } = &rule.peer {
        for e in except {
            let same_family = matches!(
                (net, e),
                (IpNet::V4(_), IpNet::V4(_)) | (IpNet::V6(_), IpNet::V6(_))
            );
            if !same_family {
                return Err(RuleError::ExceptFamily {
                    net: *net,
                    except: *e,
                });
            }
            if !net.trunc().contains(&e.trunc()) {
                return Err(RuleError::ExceptOutside {
                    net: *net,
                    except: *e,
                });
            }
        }
    }
    Ok(())
}

/// Compiles the rules of one ruleset into map entries.
///
/// ipBlocks: every CIDR and except of the ruleset becomes a prefix in `CIDR_RULES`. An
/// address's longest matching prefix P decides which ipBlocks hold it: a block holds every
/// address of P when its CIDR contains P and none of its excepts does. So each prefix maps
/// to the set of (ports) allowed there, and each distinct set gets one peer number in
/// `POLICY`. Excepts map to the sets that remain, possibly the empty set 0.
pub fn compile_ruleset(
    ruleset: u32,
    rules: &[AllowRule],
    set_ids: &mut CidrSetIds,
) -> Result<RulesetEntries, RuleError> {
    let mut entries = RulesetEntries::default();
    for rule in rules {
        validate(rule)?;
    }
    let insert_policy = |entries: &mut RulesetEntries, peer: u32, rule: &AllowRule| {
        for key in policy_keys(ruleset, peer, rule.ports) {
            entries.policy.entry(key).or_insert(rule.rule_id);
        }
    };

    let mut cidr_rules = Vec::new();
    for rule in rules {
        match &rule.peer {
            Peer::Identity(identity) => insert_policy(&mut entries, *identity, rule),
            Peer::Cidr { net, except } => cidr_rules.push((net.trunc(), except, rule)),
        }
    }

    let mut prefixes: BTreeSet<IpNet> = BTreeSet::new();
    for (net, except, _) in &cidr_rules {
        prefixes.insert(*net);
        prefixes.extend(except.iter().map(IpNet::trunc));
    }
    // The rules by CIDR: the rules whose CIDR holds a prefix are found among the prefix's
    // own supernets (at most 33 or 129), not by testing every rule against every prefix,
    // which made a policy of 50,000 ipBlocks take minutes.
    let mut by_net: BTreeMap<IpNet, Vec<usize>> = BTreeMap::new();
    for (i, (net, _, _)) in cidr_rules.iter().enumerate() {
        by_net.entry(*net).or_default().push(i);
    }
    let mut in_use = BTreeSet::new();
    for prefix in prefixes {
        let mut ports: Vec<(PortMatch, u32)> = (0..=prefix.prefix_len())
            .filter_map(|len| IpNet::new(prefix.addr(), len).ok().map(|n| n.trunc()))
            .filter_map(|supernet| by_net.get(&supernet))
            .flatten()
            .map(|&i| &cidr_rules[i])
            .filter(|(_, except, _)| !except.iter().any(|e| e.trunc().contains(&prefix)))
            .map(|(_, _, rule)| (rule.ports, rule.rule_id))
            .collect();
        ports.sort();
        ports.dedup_by_key(|(p, _)| *p);
        let set = set_ids.id(ruleset, &ports);
        in_use.insert(set);
        let peer = PEER_CIDR_SET_BASE | set;
        entries.cidr.insert(lpm_addr(ruleset, &prefix), peer);
        for (port_match, rule_id) in &ports {
            for key in policy_keys(ruleset, peer, *port_match) {
                entries.policy.entry(key).or_insert(*rule_id);
            }
        }
    }
    set_ids.retain(ruleset, &in_use);
    Ok(entries)
}

/// The family of an address as keys and events name it (`FAMILY_IPV4`, `FAMILY_IPV6`).
pub fn family_of(ip: std::net::IpAddr) -> u8 {
    if ip.is_ipv6() {
        FAMILY_IPV6
    } else {
        FAMILY_IPV4
    }
}

/// An IP address as the 16-byte field of keys and events (IPv4 in the first four bytes).
pub fn addr_bytes(ip: std::net::IpAddr) -> [u8; 16] {
    let mut out = [0u8; 16];
    match ip {
        std::net::IpAddr::V4(v4) => out[..4].copy_from_slice(&v4.octets()),
        std::net::IpAddr::V6(v6) => out = v6.octets(),
    }
    out
}

/// The address of a 16-byte key field.
pub fn addr_from_bytes(family: u8, bytes: &[u8; 16]) -> std::net::IpAddr {
    if family == agent_common::FAMILY_IPV4 {
        std::net::IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]])
    } else {
        std::net::IpAddr::from(*bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_common::{PROTO_TCP, PROTO_UDP};

    fn covered(blocks: &[(u16, u32)]) -> Vec<u32> {
        let mut ports = Vec::new();
        for (start, bits) in blocks {
            let size = 1u32 << (16 - bits);
            assert_eq!(
                *start as u32 % size,
                0,
                "block {start}/{bits} is not aligned"
            );
            ports.extend(*start as u32..*start as u32 + size);
        }
        ports
    }

    #[test]
    fn port_ranges_split_into_exact_aligned_blocks() {
        for (first, last) in [
            (80, 80),
            (0, 65535),
            (1, 65535),
            (32000, 32768),
            (1024, 2047),
            (5, 9),
            (65535, 65535),
        ] {
            let blocks = port_blocks(first, last);
            assert_eq!(
                covered(&blocks),
                (first as u32..=last as u32).collect::<Vec<_>>(),
                "{first}-{last}"
            );
        }
        assert_eq!(port_blocks(1024, 2047), vec![(1024, 6)]);
        assert_eq!(port_blocks(0, 65535), vec![(0, 0)]);
        assert!(port_blocks(1, 65535).len() <= 16);
    }

    #[test]
    fn identity_rules_become_policy_keys_of_their_prefix() {
        let rules = [
            AllowRule {
                peer: Peer::Identity(300),
                ports: PortMatch::Range {
                    proto: PROTO_TCP,
                    first: 80,
                    last: 80,
                },
                rule_id: 1,
            },
            AllowRule {
                peer: Peer::Identity(301),
                ports: PortMatch::Any,
                rule_id: 2,
            },
            AllowRule {
                peer: Peer::Identity(302),
                ports: PortMatch::Protocol(PROTO_UDP),
                rule_id: 3,
            },
        ];
        let e = compile_ruleset(7, &rules, &mut CidrSetIds::default()).unwrap();
        let prefixes: Vec<(u32, u32)> = e.policy.keys().map(|k| (k.1.peer, k.0)).collect();
        assert_eq!(prefixes, vec![(300, 88), (301, 64), (302, 72)]);
        assert!(e.cidr.is_empty());
    }

    #[test]
    fn excepts_map_to_what_remains_allowed() {
        let rules = [
            AllowRule {
                peer: Peer::Cidr {
                    net: "10.0.0.0/8".parse().unwrap(),
                    except: vec!["10.1.0.0/16".parse().unwrap()],
                },
                ports: PortMatch::Protocol(PROTO_TCP),
                rule_id: 1,
            },
            AllowRule {
                peer: Peer::Cidr {
                    net: "10.1.2.0/24".parse().unwrap(),
                    except: vec![],
                },
                ports: PortMatch::Protocol(PROTO_UDP),
                rule_id: 2,
            },
        ];
        let mut ids = CidrSetIds::default();
        let e = compile_ruleset(1, &rules, &mut ids).unwrap();
        let set_of = |net: &str| e.cidr[&lpm_addr(1, &net.parse().unwrap())];
        let a = set_of("10.0.0.0/8");
        let except = set_of("10.1.0.0/16");
        let inner = set_of("10.1.2.0/24");
        assert_eq!(
            except, PEER_CIDR_SET_BASE,
            "the except holds nothing: the empty set"
        );
        assert_ne!(a, inner);
        let protos_of = |peer: u32| -> Vec<u8> {
            e.policy
                .keys()
                .filter(|k| k.1.peer == peer)
                .map(|k| k.1.proto)
                .collect()
        };
        assert_eq!(protos_of(a), vec![PROTO_TCP]);
        assert_eq!(
            protos_of(inner),
            vec![PROTO_UDP],
            "10.1.2.0/24 is excepted from rule 1"
        );
        assert!(protos_of(except).is_empty());

        // Recompiling keeps the numbers.
        let again = compile_ruleset(1, &rules, &mut ids).unwrap();
        assert_eq!(again, e);
    }

    #[test]
    fn bad_excepts_are_rejected() {
        let rule = |net: &str, except: &str| AllowRule {
            peer: Peer::Cidr {
                net: net.parse().unwrap(),
                except: vec![except.parse().unwrap()],
            },
            ports: PortMatch::Any,
            rule_id: 0,
        };
        let mut ids = CidrSetIds::default();
        assert!(matches!(
            compile_ruleset(1, &[rule("10.0.0.0/16", "10.2.0.0/24")], &mut ids),
            Err(RuleError::ExceptOutside { .. })
        ));
        assert!(matches!(
            compile_ruleset(1, &[rule("10.0.0.0/16", "fd00::/64")], &mut ids),
            Err(RuleError::ExceptFamily { .. })
        ));
    }

    #[test]
    fn ipv6_everything_does_not_cover_ipv4() {
        let v6 = lpm_addr(0, &"::/0".parse().unwrap());
        let v4 = lpm_addr(0, &"0.0.0.0/0".parse().unwrap());
        assert_ne!(v6.1.family, v4.1.family);
        assert_eq!(v6.0, LPM_ADDR_FIXED_BITS);
    }
}
