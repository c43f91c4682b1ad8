//! Real traffic from inside pods: the `tg-traffic` helper (TCP/UDP echo clients and
//! servers) and iputils `ping`.

use std::{net::IpAddr, sync::OnceLock, time::Duration};

use serde::Deserialize;

use crate::Pod;

/// Path of the `tg-traffic` binary, built beside the test binaries.
pub fn helper() -> &'static str {
    static PATH: OnceLock<String> = OnceLock::new();
    PATH.get_or_init(|| {
        crate::sibling_binary("tg-traffic", "TG_TRAFFIC", "build the tests package")
    })
}

/// Result of a TCP exchange.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct TcpResult {
    pub connected: bool,
    /// Messages sent and echoed back in full.
    pub echoed: u32,
    pub error: Option<String>,
}

/// Result of a UDP exchange.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct UdpResult {
    pub sent: u32,
    pub echoed: u32,
    pub error: Option<String>,
}

/// Result of sending raw IP packets.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct RawResult {
    /// Packets the kernel accepted for sending.
    pub sent: u32,
    /// The first error, after which nothing more was sent.
    pub error: Option<String>,
}

fn run_helper<T: for<'de> Deserialize<'de>>(pod: &Pod, args: &[String]) -> T {
    let out = pod
        .command(helper())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run tg-traffic in {}: {e}", pod.name));
    assert!(
        out.status.success(),
        "tg-traffic {args:?} in {}: {}",
        pod.name,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "tg-traffic output {:?}: {e}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Connects from `pod` to `to:port` and exchanges `messages` echoes of 64 bytes.
pub fn tcp(pod: &Pod, to: IpAddr, port: u16, messages: u32, timeout: Duration) -> TcpResult {
    tcp_hold(pod, to, port, messages, timeout, Duration::ZERO)
}

/// Like `tcp`, keeping the connection open for `hold` after the last echo.
pub fn tcp_hold(
    pod: &Pod,
    to: IpAddr,
    port: u16,
    messages: u32,
    timeout: Duration,
    hold: Duration,
) -> TcpResult {
    run_helper(
        pod,
        &[
            "tcp".into(),
            "--to".into(),
            to.to_string(),
            "--port".into(),
            port.to_string(),
            "--messages".into(),
            messages.to_string(),
            "--timeout-ms".into(),
            timeout.as_millis().to_string(),
            "--hold-ms".into(),
            hold.as_millis().to_string(),
        ],
    )
}

/// A long-lived TCP connection from `pod` to `to:port` that exchanges one echo every
/// `interval`, `messages` times, in the background: `finish` waits for its result.
pub fn tcp_talking(
    pod: &Pod,
    to: IpAddr,
    port: u16,
    messages: u32,
    interval: Duration,
) -> std::process::Child {
    pod.command(helper())
        .args([
            "tcp",
            "--to",
            &to.to_string(),
            "--port",
            &port.to_string(),
            "--messages",
            &messages.to_string(),
            "--interval-ms",
            &interval.as_millis().to_string(),
            "--timeout-ms",
            "2000",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run tg-traffic in {}: {e}", pod.name))
}

/// The result of a `tcp_talking` connection, once it is done.
pub fn finish(child: std::process::Child) -> TcpResult {
    let out = child.wait_with_output().expect("wait for tg-traffic");
    assert!(out.status.success(), "tg-traffic tcp failed");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "tg-traffic output {:?}: {e}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Sends `count` datagrams of `size` bytes from `pod` to `to:port`, each waiting for its echo.
pub fn udp(
    pod: &Pod,
    to: IpAddr,
    port: u16,
    count: u32,
    size: usize,
    timeout: Duration,
) -> UdpResult {
    udp_from(pod, to, port, count, size, timeout, None)
}

/// Like `udp`, from a fixed source port (so repeated runs are one flow).
pub fn udp_from(
    pod: &Pod,
    to: IpAddr,
    port: u16,
    count: u32,
    size: usize,
    timeout: Duration,
    source_port: Option<u16>,
) -> UdpResult {
    let mut args = udp_args(to, port, count);
    args.extend([
        "--size".into(),
        size.to_string(),
        "--timeout-ms".into(),
        timeout.as_millis().to_string(),
    ]);
    if let Some(p) = source_port {
        args.extend(["--source-port".into(), p.to_string()]);
    }
    run_helper(pod, &args)
}

/// Result of connections opened back to back (`crr`).
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct CrrResult {
    pub connections: u64,
    pub failed: u64,
}

/// Opens `count` TCP connections from `pod` to `to:port` back to back (connect, 1-byte
/// request and echo, close with a RST), from source ports `first_source_port` and the next
/// `source_ports - 1` in turn: a client reusing its ports.
pub fn crr_from_ports(
    pod: &Pod,
    to: IpAddr,
    port: u16,
    count: u64,
    first_source_port: u16,
    source_ports: u16,
) -> CrrResult {
    let args = [
        "crr".to_string(),
        "--to".into(),
        to.to_string(),
        "--port".into(),
        port.to_string(),
        "--seconds".into(),
        "60".into(),
        "--count".into(),
        count.to_string(),
        "--source-port".into(),
        first_source_port.to_string(),
        "--source-ports".into(),
        source_ports.to_string(),
    ];
    run_helper(pod, &args)
}

/// Sends one datagram to each of `flows` consecutive destination ports, not waiting for
/// echoes: a burst of distinct new flows.
pub fn udp_burst(pod: &Pod, to: IpAddr, first_port: u16, flows: u32) -> UdpResult {
    udp_burst_rounds(pod, to, first_port, flows, 1)
}

/// Like `udp_burst`, the whole burst `rounds` times from the same socket: each new flow
/// sees `rounds` packets (what a flood of real connections looks like to a flow table).
pub fn udp_burst_rounds(
    pod: &Pod,
    to: IpAddr,
    first_port: u16,
    flows: u32,
    rounds: u32,
) -> UdpResult {
    run_helper(
        pod,
        &[
            "burst".into(),
            "--to".into(),
            to.to_string(),
            "--port".into(),
            first_port.to_string(),
            "--flows".into(),
            flows.to_string(),
            "--rounds".into(),
            rounds.to_string(),
        ],
    )
}

/// Pings `to` `count` times from `pod`; returns the number of replies.
pub fn ping(pod: &Pod, to: IpAddr, count: u32) -> u32 {
    let out = pod
        .command("ping")
        .args([
            "-n",
            "-q",
            "-c",
            &count.to_string(),
            "-i",
            "0.05",
            "-W",
            "1",
        ])
        .arg(to.to_string())
        .output()
        .expect("run ping (iputils-ping)");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_else(|| {
            panic!(
                "ping output: {text} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let received: u32 = line
        .split(',')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("ping summary: {line}"));
    received
}

/// Probes `targets` (`IP:PORT/tcp|udp`, IPv6 as `[IP]:PORT/...`) concurrently from `pod`.
pub fn probe(pod: &Pod, targets: &[String], timeout: Duration) -> Vec<bool> {
    probe_from(pod, &[], targets, timeout)
}

/// Like `probe`, from source addresses of `pod`'s namespace (at most one per family), as a
/// kubelet probes from its node's address.
pub fn probe_from(pod: &Pod, bind: &[IpAddr], targets: &[String], timeout: Duration) -> Vec<bool> {
    let mut args = vec![
        "probe".to_string(),
        "--timeout-ms".into(),
        timeout.as_millis().to_string(),
    ];
    for b in bind {
        args.extend(["--bind".into(), b.to_string()]);
    }
    for t in targets {
        args.extend(["--target".into(), t.clone()]);
    }
    run_helper(pod, &args)
}

/// Sends `count` datagrams from `pod` to `to`:`port` through a UDP socket connected to
/// `connected_to` (`sendto` past its peer, as a connected socket allows). Echoes are not
/// received (a connected socket takes datagrams from its peer only).
pub fn udp_past_peer(
    pod: &Pod,
    connected_to: std::net::SocketAddr,
    to: IpAddr,
    port: u16,
    count: u32,
) -> UdpResult {
    let mut args = udp_args(to, port, count);
    args.extend(["--connected-to".into(), connected_to.to_string()]);
    run_helper(pod, &args)
}

/// The helper's `udp` arguments every exchange gives.
fn udp_args(to: IpAddr, port: u16, count: u32) -> Vec<String> {
    vec![
        "udp".into(),
        "--to".into(),
        to.to_string(),
        "--port".into(),
        port.to_string(),
        "--count".into(),
        count.to_string(),
    ]
}

/// `raw`, through a raw socket connected to `connect` first (its peer then says otherwise
/// than the packets' headers).
pub fn raw_connected(
    pod: &Pod,
    connect: std::net::SocketAddr,
    packets: &[Vec<u8>],
    count: u32,
) -> RawResult {
    let mut args = raw_args(packets, count);
    args.extend(["--connect".into(), connect.to_string()]);
    run_helper(pod, &args)
}

/// The helper's `raw` arguments: the count and each packet in hex.
fn raw_args(packets: &[Vec<u8>], count: u32) -> Vec<String> {
    let mut args = vec!["raw".to_string(), "--count".into(), count.to_string()];
    for p in packets {
        let hex: String = p.iter().map(|b| format!("{b:02x}")).collect();
        args.extend(["--packet".into(), hex]);
    }
    args
}

/// Sends each of `packets` (whole IPv4 or IPv6 packets, e.g. from `crate::packets`) `count`
/// times from `pod` through a raw socket, to the destination in its header; the source
/// address is whatever the packet says.
pub fn raw(pod: &Pod, packets: &[Vec<u8>], count: u32) -> RawResult {
    run_helper(pod, &raw_args(packets, count))
}

/// Sends each of `frames` (whole Ethernet frames) `count` times out of `iface` inside `pod`
/// through a packet socket: past the pod's IP stack, as a pod with CAP_NET_RAW can.
pub fn frames(pod: &Pod, iface: &str, frames: &[Vec<u8>], count: u32) -> RawResult {
    let mut args = vec![
        "frame".to_string(),
        "--iface".into(),
        iface.into(),
        "--count".into(),
        count.to_string(),
    ];
    for f in frames {
        args.extend([
            "--frame".into(),
            f.iter().map(|b| format!("{b:02x}")).collect(),
        ]);
    }
    run_helper(pod, &args)
}
