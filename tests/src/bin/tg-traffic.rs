//! Traffic helper run inside test pods: TCP and UDP echo servers, clients that report what
//! got through as one JSON object, and a raw sender of whole IP packets.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    time::Duration,
};

use clap::{Parser, Subcommand};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Echo servers on [::] (IPv4 and IPv6); prints "ready" once all are bound.
    Serve {
        #[arg(long)]
        tcp: Vec<u16>,
        #[arg(long)]
        udp: Vec<u16>,
    },
    /// Connects and exchanges echoes of 64 bytes.
    Tcp {
        #[arg(long)]
        to: IpAddr,
        #[arg(long)]
        port: u16,
        #[arg(long, default_value_t = 1)]
        messages: u32,
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
        /// Keeps the connection open this long after the last echo.
        #[arg(long, default_value_t = 0)]
        hold_ms: u64,
        /// Pause between messages: one long-lived connection that keeps talking.
        #[arg(long, default_value_t = 0)]
        interval_ms: u64,
        /// Source address (bound before connecting).
        #[arg(long)]
        bind: Option<IpAddr>,
    },
    /// Sends datagrams one by one, each waiting for its echo.
    Udp {
        #[arg(long)]
        to: IpAddr,
        #[arg(long)]
        port: u16,
        #[arg(long, default_value_t = 1)]
        count: u32,
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
        #[arg(long)]
        source_port: Option<u16>,
        /// Source address (bound before connecting).
        #[arg(long)]
        bind: Option<IpAddr>,
        /// Connect the socket here instead, and `sendto` the target past it (what a
        /// connected socket allows): echoes are then not received.
        #[arg(long)]
        connected_to: Option<SocketAddr>,
    },
    /// Probes many targets at once (`IP:PORT/tcp|udp`): a TCP connect and echo, or a UDP
    /// datagram and its echo. Prints a JSON array of booleans in target order.
    Probe {
        #[arg(long = "target")]
        targets: Vec<String>,
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
        /// Source address for targets of its family (bound before connecting); once per
        /// family at most.
        #[arg(long)]
        bind: Vec<IpAddr>,
    },
    /// New TCP connections back to back for `seconds` (connect, 1-byte request and echo,
    /// close); prints how many completed.
    Crr {
        #[arg(long)]
        to: IpAddr,
        #[arg(long)]
        port: u16,
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
        /// Stop after this many connections (completed or failed), if sooner.
        #[arg(long)]
        count: Option<u64>,
        /// Open them from this source port and the next `source-ports - 1`, in turn (a
        /// client reusing its ports), instead of ephemeral ones.
        #[arg(long)]
        source_port: Option<u16>,
        #[arg(long, default_value_t = 1)]
        source_ports: u16,
    },
    /// One datagram to each of `flows` consecutive ports, no waiting; the whole round
    /// `rounds` times (so each flow sees that many packets).
    Burst {
        #[arg(long)]
        to: IpAddr,
        #[arg(long)]
        port: u16,
        #[arg(long)]
        flows: u32,
        #[arg(long, default_value_t = 1)]
        rounds: u32,
    },
    /// Sends whole IP packets (hex) through a raw socket, IPv4 or IPv6 after the version
    /// nibble, each `count` times, to the destination in its own header. Prints
    /// `{"sent": N, "error": ...}`; stops at the first error.
    Raw {
        #[arg(long = "packet", value_parser = parse_hex, required = true)]
        packets: Vec<Packet>,
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// Connect the raw socket here first and `send` (its peer then says otherwise
        /// than the header).
        #[arg(long)]
        connect: Option<SocketAddr>,
    },
    /// Sends whole Ethernet frames (hex) out of `iface` through a packet socket, each
    /// `count` times: what a pod with CAP_NET_RAW can put on its link (ARP, neighbour
    /// discovery with any addresses). Prints `{"sent": N, "error": ...}`; stops at the
    /// first error.
    Frame {
        #[arg(long)]
        iface: String,
        #[arg(long = "frame", value_parser = parse_frame, required = true)]
        frames: Vec<Vec<u8>>,
        #[arg(long, default_value_t = 1)]
        count: u32,
    },
    /// Looks `name` up at `server` (UDP, or TCP with --tcp) and, with --port, connects at
    /// once to the first address of the answer and exchanges a 1-byte echo; `times` rounds
    /// back to back. Prints `{"resolved": N, "connected": N, "addresses": [...],
    /// "errors": [...]}`.
    Resolve {
        #[arg(long)]
        server: IpAddr,
        #[arg(long)]
        name: String,
        #[arg(long)]
        tcp: bool,
        #[arg(long)]
        aaaa: bool,
        #[arg(long)]
        port: Option<u16>,
        #[arg(long, default_value_t = 1)]
        times: u32,
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
    },
    /// A DNS server on UDP 53 that answers every query with a hostile message chosen by the
    /// first label of the name asked (see `hostile_answer`), each carrying `--address`.
    /// Prints "ready" once bound.
    DnsHostile {
        #[arg(long)]
        address: std::net::Ipv4Addr,
    },
}

fn main() {
    match Cli::parse().command {
        Cmd::Serve { tcp, udp } => serve(&tcp, &udp),
        Cmd::Tcp {
            to,
            port,
            messages,
            timeout_ms,
            hold_ms,
            interval_ms,
            bind,
        } => tcp_client(
            to,
            port,
            messages,
            Duration::from_millis(timeout_ms),
            Duration::from_millis(hold_ms),
            Duration::from_millis(interval_ms),
            bind,
        ),
        Cmd::Udp {
            to,
            port,
            count,
            size,
            timeout_ms,
            source_port,
            bind,
            connected_to,
        } => udp_client(
            to,
            port,
            count,
            size,
            Duration::from_millis(timeout_ms),
            source_port,
            bind,
            connected_to,
        ),
        Cmd::Burst {
            to,
            port,
            flows,
            rounds,
        } => burst(to, port, flows, rounds),
        Cmd::Probe {
            targets,
            timeout_ms,
            bind,
        } => probe(&targets, Duration::from_millis(timeout_ms), &bind),
        Cmd::Crr {
            to,
            port,
            seconds,
            count,
            source_port,
            source_ports,
        } => {
            let sources = source_port.map(|first| (first, source_ports.max(1)));
            crr(to, port, Duration::from_secs_f64(seconds), count, sources)
        }
        Cmd::Raw {
            packets,
            count,
            connect,
        } => raw(&packets, count, connect),
        Cmd::Frame {
            iface,
            frames,
            count,
        } => frame(&iface, &frames, count),
        Cmd::Resolve {
            server,
            name,
            tcp,
            aaaa,
            port,
            times,
            timeout_ms,
        } => resolve(
            server,
            &name,
            tcp,
            aaaa,
            port,
            times,
            Duration::from_millis(timeout_ms),
        ),
        Cmd::DnsHostile { address } => dns_hostile(address),
    }
}

/// One query and its answer's addresses.
fn lookup(
    server: IpAddr,
    name: &str,
    tcp: bool,
    qtype: u16,
    id: u16,
    timeout: Duration,
) -> Result<Vec<IpAddr>, String> {
    use tollgate::dns::wire;
    let query = wire::build::query(id, name, qtype);
    let reply = if tcp {
        let mut s = TcpStream::connect_timeout(&SocketAddr::new(server, 53), timeout)
            .map_err(|e| format!("connect to the resolver: {e}"))?;
        s.set_read_timeout(Some(timeout)).ok();
        let mut framed = (query.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&query);
        s.write_all(&framed).map_err(|e| e.to_string())?;
        let mut len = [0u8; 2];
        s.read_exact(&mut len).map_err(|e| format!("read: {e}"))?;
        let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
        s.read_exact(&mut buf).map_err(|e| format!("read: {e}"))?;
        buf
    } else {
        let any: SocketAddr = if server.is_ipv4() {
            "0.0.0.0:0".parse().unwrap()
        } else {
            "[::]:0".parse().unwrap()
        };
        let s = UdpSocket::bind(any).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(timeout)).ok();
        s.send_to(&query, SocketAddr::new(server, 53))
            .map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 4096];
        let n = s.recv(&mut buf).map_err(|e| format!("no answer: {e}"))?;
        buf.truncate(n);
        buf
    };
    // The client reads what a stub resolver would: records about the name asked, or the
    // name its CNAMEs lead to. Hostile answers may not parse: that is the point.
    let answer = wire::parse_answer(&reply).map_err(|e| format!("answer: {e}"))?;
    Ok(answer.addresses.into_iter().map(|(ip, _)| ip).collect())
}

fn resolve(
    server: IpAddr,
    name: &str,
    tcp: bool,
    aaaa: bool,
    port: Option<u16>,
    times: u32,
    timeout: Duration,
) {
    let qtype = if aaaa { 28 } else { 1 };
    let (mut resolved, mut connected) = (0, 0);
    let mut addresses = Vec::new();
    let mut errors = Vec::new();
    // Microseconds of each lookup, and of each lookup with the connection and echo after it.
    let (mut lookup_us, mut first_connection_us) = (Vec::new(), Vec::new());
    for i in 0..times {
        let started = std::time::Instant::now();
        let addrs = match lookup(
            server,
            name,
            tcp,
            qtype,
            (std::process::id() as u16) ^ (i as u16),
            timeout,
        ) {
            Ok(a) if !a.is_empty() => a,
            Ok(_) => {
                errors.push("no address".to_string());
                continue;
            }
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        resolved += 1;
        lookup_us.push(started.elapsed().as_secs_f64() * 1e6);
        if !addresses.contains(&addrs[0].to_string()) {
            addresses.push(addrs[0].to_string());
        }
        let Some(port) = port else { continue };
        // At once: the first packet leaves right after the answer arrived.
        let echoed = TcpStream::connect_timeout(&SocketAddr::new(addrs[0], port), timeout)
            .and_then(|mut s| {
                s.set_read_timeout(Some(timeout))?;
                s.write_all(b"x")?;
                let mut b = [0u8; 1];
                s.read_exact(&mut b)
            });
        match echoed {
            Ok(()) => {
                connected += 1;
                first_connection_us.push(started.elapsed().as_secs_f64() * 1e6);
            }
            Err(e) => errors.push(format!("connect {}: {e}", addrs[0])),
        }
    }
    let percentile = |v: &mut Vec<f64>, p: f64| {
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(((v.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };
    print_json(serde_json::json!({
        "resolved": resolved,
        "connected": connected,
        "addresses": addresses,
        "errors": errors,
        "lookup_p50_us": percentile(&mut lookup_us, 0.5),
        "lookup_p99_us": percentile(&mut lookup_us, 0.99),
        "first_connection_p50_us": percentile(&mut first_connection_us, 0.5),
        "first_connection_p99_us": percentile(&mut first_connection_us, 0.99),
    }));
}

/// The hostile answer for a query: by the first label of the name asked.
/// - `loop`: an answer record whose owner is a compression pointer to itself;
/// - `forward`: a pointer past the end of the message;
/// - `long`: an owner name of more than 255 bytes;
/// - `short`: three records announced, one carried;
/// - `extra`: one announced, a second (for the address) beyond the count;
/// - `wrongid`: a good answer with another id;
/// - `othername`: a good answer for another name;
/// - `unrelated`: the address on a record of another name;
/// - anything else: a good answer.
fn hostile_answer(query: &[u8], address: std::net::Ipv4Addr) -> Option<Vec<u8>> {
    use tollgate::dns::wire::{self, build};
    let q = wire::parse_question(query).ok()?;
    let first = q.name.split('.').next().unwrap_or("").to_string();
    let a = address.octets();
    let good = |id: u16, name: &str| {
        build::answer(
            id,
            name,
            wire::TYPE_A,
            1,
            &[build::record(&build::QNAME, wire::TYPE_A, 60, &a)],
        )
    };
    Some(match first.as_str() {
        "loop" => {
            let mut m = build::answer(q.id, &q.name, wire::TYPE_A, 1, &[]);
            let at = m.len();
            m.extend(build::record(
                &[0xc0 | (at >> 8) as u8, at as u8],
                wire::TYPE_A,
                60,
                &a,
            ));
            m
        }
        "forward" => {
            let mut m = build::answer(q.id, &q.name, wire::TYPE_A, 1, &[]);
            m.extend(build::record(&[0xc0, 0xff], wire::TYPE_A, 60, &a));
            m
        }
        "long" => {
            let long = format!("{}.{}", vec!["a".repeat(63); 4].join("."), q.name);
            build::answer(
                q.id,
                &q.name,
                wire::TYPE_A,
                1,
                &[build::record(&build::name(&long), wire::TYPE_A, 60, &a)],
            )
        }
        "short" => build::answer(
            q.id,
            &q.name,
            wire::TYPE_A,
            3,
            &[build::record(&build::QNAME, wire::TYPE_A, 60, &a)],
        ),
        "extra" => build::answer(
            q.id,
            &q.name,
            wire::TYPE_A,
            1,
            &[
                build::record(
                    &build::QNAME,
                    wire::TYPE_CNAME,
                    60,
                    &build::name("nowhere.invalid"),
                ),
                build::record(&build::QNAME, wire::TYPE_A, 60, &a),
            ],
        ),
        // Too big for one datagram: it leaves in IP fragments.
        "big" => {
            let records: Vec<Vec<u8>> = (0..120)
                .map(|_| build::record(&build::QNAME, wire::TYPE_A, 60, &a))
                .collect();
            build::answer(q.id, &q.name, wire::TYPE_A, 120, &records)
        }
        "wrongid" => good(q.id.wrapping_add(1), &q.name),
        "othername" => good(q.id, &format!("x{}", q.name)),
        "unrelated" => build::answer(
            q.id,
            &q.name,
            wire::TYPE_A,
            1,
            &[build::record(
                &build::name("unrelated.invalid"),
                wire::TYPE_A,
                60,
                &a,
            )],
        ),
        _ => good(q.id, &q.name),
    })
}

fn dns_hostile(address: std::net::Ipv4Addr) {
    let socket = UdpSocket::bind("0.0.0.0:53").expect("bind udp 53");
    // The same answers over TCP (length-prefixed), one connection at a time.
    let listener = TcpListener::bind("0.0.0.0:53").expect("bind tcp 53");
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let mut len = [0u8; 2];
            if stream.read_exact(&mut len).is_err() {
                continue;
            }
            let mut query = vec![0u8; u16::from_be_bytes(len) as usize];
            if stream.read_exact(&mut query).is_err() {
                continue;
            }
            if let Some(answer) = hostile_answer(&query, address) {
                let mut framed = (answer.len() as u16).to_be_bytes().to_vec();
                framed.extend_from_slice(&answer);
                let _ = stream.write_all(&framed);
            }
        }
    });
    println!("ready");
    std::io::stdout().flush().ok();
    let mut buf = vec![0u8; 4096];
    while let Ok((n, from)) = socket.recv_from(&mut buf) {
        if let Some(answer) = hostile_answer(&buf[..n], address) {
            let _ = socket.send_to(&answer, from);
        }
    }
}

fn serve(tcp: &[u16], udp: &[u16]) {
    let any = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
    let mut threads = Vec::new();
    for &port in tcp {
        let listener = TcpListener::bind(SocketAddr::new(any, port)).expect("bind tcp");
        threads.push(std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                std::thread::spawn(move || echo_stream(stream));
            }
        }));
    }
    for &port in udp {
        let socket = UdpSocket::bind(SocketAddr::new(any, port)).expect("bind udp");
        threads.push(std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(&buf[..n], from);
            }
        }));
    }
    println!("ready");
    std::io::stdout().flush().ok();
    for t in threads {
        let _ = t.join();
    }
}

fn echo_stream(mut stream: TcpStream) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 || stream.write_all(&buf[..n]).is_err() {
            break;
        }
    }
}

fn print_json(v: serde_json::Value) {
    println!("{v}");
}

/// A TCP connection to `addr`, from `bind` when given (port 0: any; a port of its own is
/// taken again at once, as a client reusing its ports does).
fn tcp_connect(
    addr: SocketAddr,
    bind: Option<SocketAddr>,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    let Some(bind) = bind else {
        return TcpStream::connect_timeout(&addr, timeout);
    };
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if bind.port() != 0 {
        socket.set_reuse_address(true)?;
    }
    socket.bind(&bind.into())?;
    socket.connect_timeout(&addr.into(), timeout)?;
    Ok(socket.into())
}

/// The unspecified address of `to`'s family.
fn any_address_for(to: IpAddr) -> IpAddr {
    match to {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    }
}

fn tcp_client(
    to: IpAddr,
    port: u16,
    messages: u32,
    timeout: Duration,
    hold: Duration,
    interval: Duration,
    bind: Option<IpAddr>,
) {
    let addr = SocketAddr::new(to, port);
    let from = bind.map(|ip| SocketAddr::new(ip, 0));
    let mut stream = match tcp_connect(addr, from, timeout) {
        Ok(s) => s,
        Err(e) => {
            print_json(
                serde_json::json!({"connected": false, "echoed": 0, "error": e.to_string()}),
            );
            return;
        }
    };
    stream.set_read_timeout(Some(timeout)).ok();
    stream.set_nodelay(true).ok();
    let msg = [0x42u8; 64];
    let mut echoed = 0;
    let mut error = None;
    for i in 0..messages {
        if i > 0 {
            std::thread::sleep(interval);
        }
        let mut back = [0u8; 64];
        match stream
            .write_all(&msg)
            .and_then(|_| stream.read_exact(&mut back))
        {
            Ok(()) => echoed += 1,
            Err(e) => {
                error = Some(e.to_string());
                break;
            }
        }
    }
    std::thread::sleep(hold);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    // Wait for the server's FIN, so the connection is closed on both sides when we exit.
    let mut rest = [0u8; 64];
    let _ = stream.read(&mut rest);
    print_json(serde_json::json!({"connected": true, "echoed": echoed, "error": error}));
}

/// A UDP socket for sending to `to`, bound to `bind` (default: any address) and
/// `source_port` (0: any).
fn udp_socket(to: IpAddr, bind: Option<IpAddr>, source_port: u16) -> std::io::Result<UdpSocket> {
    let any = any_address_for(to);
    let socket = UdpSocket::bind(SocketAddr::new(bind.unwrap_or(any), source_port))?;
    // Let the kernel fragment datagrams larger than the MTU instead of refusing them.
    let (level, opt, val) = match to {
        IpAddr::V4(_) => (
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_DONT,
        ),
        IpAddr::V6(_) => (
            libc::IPPROTO_IPV6,
            libc::IPV6_MTU_DISCOVER,
            libc::IPV6_PMTUDISC_DONT,
        ),
    };
    // SAFETY: plain setsockopt with an int.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            opt,
            (&val as *const i32).cast(),
            size_of::<i32>() as u32,
        );
    }
    Ok(socket)
}

#[allow(clippy::too_many_arguments)]
fn udp_client(
    to: IpAddr,
    port: u16,
    count: u32,
    size: usize,
    timeout: Duration,
    source_port: Option<u16>,
    bind: Option<IpAddr>,
    connected_to: Option<SocketAddr>,
) {
    let socket = match udp_socket(to, bind, source_port.unwrap_or(0)) {
        Ok(s) => s,
        Err(e) => {
            print_json(serde_json::json!({"sent": 0, "echoed": 0, "error": e.to_string()}));
            return;
        }
    };
    if let Some(peer) = connected_to {
        socket.connect(peer).expect("connect udp");
        let (mut sent, mut error) = (0, None);
        for _ in 0..count {
            match socket.send_to(&vec![0x17u8; size], SocketAddr::new(to, port)) {
                Ok(_) => sent += 1,
                Err(e) => error = Some(e.to_string()),
            }
        }
        print_json(serde_json::json!({"sent": sent, "echoed": 0, "error": error}));
        return;
    }
    socket
        .connect(SocketAddr::new(to, port))
        .expect("connect udp");
    socket.set_read_timeout(Some(timeout)).ok();
    let msg = vec![0x17u8; size];
    let mut buf = vec![0u8; size.max(1) + 1];
    let (mut sent, mut echoed, mut error) = (0, 0, None);
    for _ in 0..count {
        if let Err(e) = socket.send(&msg) {
            error = Some(e.to_string());
            break;
        }
        sent += 1;
        match socket.recv(&mut buf) {
            Ok(n) if n == size => echoed += 1,
            Ok(_) => {}
            Err(e) => error = Some(e.to_string()),
        }
    }
    print_json(serde_json::json!({"sent": sent, "echoed": echoed, "error": error}));
}

fn burst(to: IpAddr, port: u16, flows: u32, rounds: u32) {
    let socket = udp_socket(to, None, 0).expect("bind udp client");
    let mut sent = 0;
    let mut error = None;
    for _ in 0..rounds {
        for i in 0..flows {
            match socket.send_to(b"x", SocketAddr::new(to, port.wrapping_add(i as u16))) {
                Ok(_) => sent += 1,
                Err(e) => error = Some(e.to_string()),
            }
        }
    }
    print_json(serde_json::json!({"sent": sent, "echoed": 0, "error": error}));
}

fn probe_one(target: &str, timeout: Duration, bind: &[IpAddr]) -> bool {
    let Some((addr, proto)) = target.rsplit_once('/') else {
        return false;
    };
    let Ok(addr) = addr.parse::<SocketAddr>() else {
        return false;
    };
    let bind = bind.iter().copied().find(|b| b.is_ipv6() == addr.is_ipv6());
    if proto == "udp" {
        let Ok(socket) = udp_socket(addr.ip(), bind, 0) else {
            return false;
        };
        if socket.connect(addr).is_err() || socket.send(b"probe").is_err() {
            return false;
        }
        socket.set_read_timeout(Some(timeout)).ok();
        let mut buf = [0u8; 16];
        matches!(socket.recv(&mut buf), Ok(5))
    } else {
        let from = bind.map(|ip| SocketAddr::new(ip, 0));
        let Ok(mut stream) = tcp_connect(addr, from, timeout) else {
            return false;
        };
        stream.set_read_timeout(Some(timeout)).ok();
        let mut back = [0u8; 5];
        stream.write_all(b"probe").is_ok() && stream.read_exact(&mut back).is_ok()
    }
}

fn probe(targets: &[String], timeout: Duration, bind: &[IpAddr]) {
    let results: Vec<bool> = std::thread::scope(|s| {
        let handles: Vec<_> = targets
            .iter()
            .map(|t| s.spawn(move || probe_one(t, timeout, bind)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(false))
            .collect()
    });
    print_json(serde_json::json!(results));
}

/// `sources`: the first source port and how many to take in turn, else ephemeral ports.
fn crr(to: IpAddr, port: u16, duration: Duration, count: Option<u64>, sources: Option<(u16, u16)>) {
    let addr = SocketAddr::new(to, port);
    let started = std::time::Instant::now();
    let (mut done, mut failed) = (0u64, 0u64);
    let connect = |n: u64| {
        let from = sources.map(|(first, ports)| {
            let source = first.wrapping_add((n % ports as u64) as u16);
            SocketAddr::new(any_address_for(to), source)
        });
        tcp_connect(addr, from, Duration::from_secs(1))
    };
    while started.elapsed() < duration && count.is_none_or(|c| done + failed < c) {
        let ok = connect(done + failed).and_then(|mut s| {
            s.set_nodelay(true)?;
            s.write_all(b"x")?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b)?;
            // RST instead of TIME_WAIT: the client would run out of ports otherwise.
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            // SAFETY: plain setsockopt with a linger struct.
            unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&linger as *const libc::linger).cast(),
                    size_of::<libc::linger>() as u32,
                );
            }
            Ok(())
        });
        match ok {
            Ok(()) => done += 1,
            Err(_) => failed += 1,
        }
    }
    let secs = started.elapsed().as_secs_f64();
    print_json(
        serde_json::json!({"connections": done, "failed": failed, "seconds": secs, "per_second": done as f64 / secs}),
    );
}

/// One packet of `raw`: its bytes and the destination from its header.
#[derive(Clone, Debug)]
struct Packet {
    bytes: Vec<u8>,
    to: IpAddr,
}

/// An Ethernet frame in hex: at least its 14-byte header.
fn parse_frame(s: &str) -> Result<Vec<u8>, String> {
    let bytes = hex_bytes(s)?;
    if bytes.len() < 14 {
        return Err("not an Ethernet frame (14+ bytes)".into());
    }
    Ok(bytes)
}

/// Parses a packet given as hex (whitespace and `:` ignored) and takes its destination from
/// the IPv4 or IPv6 header.
fn parse_hex(s: &str) -> Result<Packet, String> {
    let bytes = hex_bytes(s)?;
    let to = match bytes.first().map(|b| b >> 4) {
        Some(4) if bytes.len() >= 20 => {
            IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(&bytes[16..20]).unwrap()))
        }
        Some(6) if bytes.len() >= 40 => IpAddr::V6(Ipv6Addr::from(
            <[u8; 16]>::try_from(&bytes[24..40]).unwrap(),
        )),
        _ => return Err("not an IPv4 (20+ bytes) or IPv6 (40+ bytes) packet".into()),
    };
    Ok(Packet { bytes, to })
}

/// Bytes from hex digits; whitespace and colons between them are ignored.
fn hex_bytes(s: &str) -> Result<Vec<u8>, String> {
    let digits: Vec<u8> = s
        .bytes()
        .filter(|b| !b.is_ascii_whitespace() && *b != b':')
        .collect();
    if !digits.len().is_multiple_of(2) {
        return Err("odd number of hex digits".into());
    }
    digits
        .chunks(2)
        .map(|pair| {
            std::str::from_utf8(pair)
                .ok()
                .and_then(|p| u8::from_str_radix(p, 16).ok())
                .ok_or_else(|| format!("not hex: {}", String::from_utf8_lossy(pair)))
        })
        .collect::<Result<Vec<u8>, String>>()
}

/// Sends each frame `count` times out of `iface` through `socket(AF_PACKET, SOCK_RAW, 0)`
/// (protocol 0: it receives nothing): the kernel puts the frame on the link as given,
/// past the IP stack and its hooks.
fn frame(iface: &str, frames: &[Vec<u8>], count: u32) {
    let (mut sent, mut error) = (0u32, None);
    let name = std::ffi::CString::new(iface).expect("interface name without NUL");
    // SAFETY: a NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    // SAFETY: plain socket call.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if ifindex == 0 {
        error = Some(format!("no interface {iface}"));
    } else if fd < 0 {
        error = Some(format!(
            "packet socket: {}",
            std::io::Error::last_os_error()
        ));
    }
    'out: for f in frames.iter().filter(|_| error.is_none()) {
        // SAFETY: all-zero is a valid sockaddr_ll, filled in below.
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_ifindex = ifindex as i32;
        to.sll_halen = 6;
        to.sll_addr[..6].copy_from_slice(&f[..6]);
        for _ in 0..count {
            // SAFETY: the frame and the address live through the call, with their sizes.
            let n = unsafe {
                libc::sendto(
                    fd,
                    f.as_ptr().cast(),
                    f.len(),
                    0,
                    (&to as *const libc::sockaddr_ll).cast(),
                    size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            if n < 0 {
                error = Some(format!("send: {}", std::io::Error::last_os_error()));
                break 'out;
            }
            sent += 1;
        }
    }
    if fd >= 0 {
        // SAFETY: our own descriptor, closed once.
        unsafe { libc::close(fd) };
    }
    print_json(serde_json::json!({"sent": sent, "error": error}));
}

/// Sends each packet `count` times through `socket(AF_INET[6], SOCK_RAW, IPPROTO_RAW)`:
/// the kernel sends the header as given (IP_HDRINCL is implied for IPPROTO_RAW, on IPv6
/// since Linux 4.5), so any source address goes out; it routes by the destination passed
/// to sendto, taken from the header. IPv4 still gets its header checksum (and a zero id)
/// filled in by the kernel.
fn raw(packets: &[Packet], count: u32, connect: Option<SocketAddr>) {
    let mut sockets: [Option<Socket>; 2] = [None, None];
    let (mut sent, mut error) = (0u32, None);
    'out: for packet in packets {
        let (slot, domain) = match packet.to {
            IpAddr::V4(_) => (0, Domain::IPV4),
            IpAddr::V6(_) => (1, Domain::IPV6),
        };
        if sockets[slot].is_none() {
            match Socket::new(domain, Type::RAW, Some(Protocol::from(libc::IPPROTO_RAW))) {
                Ok(s) => sockets[slot] = Some(s),
                Err(e) => {
                    error = Some(format!("raw socket: {e}"));
                    break;
                }
            }
        }
        let socket = sockets[slot].as_ref().expect("socket just made");
        // Port 0: on an IPPROTO_RAW IPv6 socket a non-zero port would name a protocol.
        let to = SockAddr::from(SocketAddr::new(packet.to, 0));
        let connected = connect.filter(|c| c.is_ipv6() == packet.to.is_ipv6());
        if let Some(peer) = connected
            && let Err(e) = socket.connect(&SockAddr::from(peer))
        {
            error = Some(format!("connect to {peer}: {e}"));
            break;
        }
        for _ in 0..count {
            let result = if connected.is_some() {
                socket.send(&packet.bytes)
            } else {
                socket.send_to(&packet.bytes, &to)
            };
            match result {
                Ok(_) => sent += 1,
                Err(e) => {
                    error = Some(format!("send to {}: {e}", packet.to));
                    break 'out;
                }
            }
        }
    }
    print_json(serde_json::json!({"sent": sent, "error": error}));
}
