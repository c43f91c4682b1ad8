//! Hand-built frames for BPF_PROG_TEST_RUN: ethernet, IPv4, IPv6, UDP. Checksums stay zero
//! (the programs never check them).

/// An ethernet frame around `payload`.
pub fn eth(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2];
    f.extend(ethertype.to_be_bytes());
    f.extend(payload);
    f
}

/// An IPv4 header from 10.1.0.10 to 10.1.0.11 with `frag` as flags/offset, then `l4`.
pub fn ipv4(proto: u8, frag: u16, l4: &[u8]) -> Vec<u8> {
    let total = 20 + l4.len() as u16;
    let mut h = vec![0x45, 0];
    h.extend(total.to_be_bytes());
    h.extend([0x12, 0x34]);
    h.extend(frag.to_be_bytes());
    h.extend([64, proto, 0, 0, 10, 1, 0, 10, 10, 1, 0, 11]);
    h.extend(l4);
    h
}

/// A UDP header and `payload` zero bytes.
pub fn udp_header(sport: u16, dport: u16, payload: usize) -> Vec<u8> {
    let mut u = Vec::new();
    u.extend(sport.to_be_bytes());
    u.extend(dport.to_be_bytes());
    u.extend((8 + payload as u16).to_be_bytes());
    u.extend([0, 0]);
    u.extend(vec![0u8; payload]);
    u
}

/// An IPv6 header from fd77:1::a to fd77:1::b with next header `next`, then `rest`.
pub fn ipv6(next: u8, rest: &[u8]) -> Vec<u8> {
    let mut h = vec![0x60, 0, 0, 0];
    h.extend((rest.len() as u16).to_be_bytes());
    h.extend([next, 64]);
    h.extend([0xfd, 0x77, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 10]);
    h.extend([0xfd, 0x77, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 11]);
    h.extend(rest);
    h
}
