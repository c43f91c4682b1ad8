//! Datapath micro-benchmark (`cargo xtask bench`): ns per packet of the real TC program under
//! BPF_PROG_TEST_RUN, next to an empty TC program measured in the same run, at several
//! policy and connection tracking table sizes. Writes `benchmarks.md` and `benchmarks.json`.
//!
//! Nothing here asserts a time: it reports medians with min and max, and ratios to the
//! baseline of the same run, because these machines are shared and noisy.

use std::{fmt::Write as _, path::PathBuf, time::Instant};

use agent_common::{POLICY_PREFIX_FULL, PROTO_UDP, PolicyKey, program_names};
use clap::Parser;
use ipnet::IpNet;
use serde::Serialize;
use tollgate::{Datapath, Mode, WorkloadPolicy, attach::TcMode, compile::PortMatch};
use tollgate_tests::{
    Lab,
    support::{allow, tcp},
};

#[derive(Parser)]
struct Args {
    /// Measurements per figure (the median is reported, with min and max).
    #[arg(long, default_value_t = 5)]
    runs: u32,
    /// Program runs per measurement for the repeat-based figures.
    #[arg(long, default_value_t = 1_000_000)]
    repeat: u32,
    /// Single-packet runs per measurement for the new-flow figures.
    #[arg(long, default_value_t = 3000)]
    calls: u32,
    /// Where to write benchmarks.md and benchmarks.json.
    #[arg(long, default_value = "docs")]
    out: PathBuf,
    /// Pairs of samples (configuration, no program) per configuration and metric in the
    /// traffic benchmark (TCP takes twice as many, new connections four times); about 60 s
    /// per pair count.
    #[arg(long, default_value_t = 6)]
    net_runs: u32,
    /// Sections to run (default: all): datapath, control, net, dns.
    #[arg(long)]
    only: Vec<String>,
}

#[derive(Serialize, Clone)]
struct Figure {
    case: String,
    policy_entries: usize,
    conntrack_entries: usize,
    median_ns: f64,
    min_ns: f64,
    max_ns: f64,
    /// Median of the empty program measured the same way, in the same run.
    baseline_ns: f64,
    /// median / baseline.
    ratio: f64,
}

const SLOT: u32 = 1;
const PEER_IDENTITY: u32 = 301;
/// Pod addresses named in every figure (the reference bank's pods).
const POD_ADDRESSES: u32 = 20_000;

/// An ethernet + IPv4 + UDP frame from 10.1.x.y:sport to 10.1.0.11:dport.
/// A UDP packet from the workload (10.1.0.10) to peer 10.1.`net`.11: the workload may only
/// send from its own address, so new flows differ in the peer and the source port.
fn frame(net: u8, sport: u16, dport: u16) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00];
    f.extend([
        0x45, 0, 0, 36, 0x12, 0x34, 0, 0, 64, PROTO_UDP, 0, 0, 10, 1, 0, 10, 10, 1, net, 11,
    ]);
    f.extend(sport.to_be_bytes());
    f.extend(dport.to_be_bytes());
    f.extend([0, 16, 0, 0]);
    f.extend([0u8; 8]);
    f
}

/// Where `frame`'s UDP payload starts.
const FRAME_PAYLOAD: usize = 14 + 20 + 8;

fn stats(mut samples: Vec<f64>) -> (f64, f64, f64) {
    samples.sort_by(|a, b| a.total_cmp(b));
    (
        samples[samples.len() / 2],
        samples[0],
        samples[samples.len() - 1],
    )
}

struct Bench<'a> {
    lab: &'a Lab,
    dp: Datapath,
    args: &'a Args,
    next_source: u32,
}

impl Bench<'_> {
    fn repeat(&self, prog: &'static str, packet: &[u8]) -> f64 {
        self.lab
            .in_node(|| self.dp.test_run(prog, packet, self.args.repeat))
            .expect("BPF_PROG_TEST_RUN")
            .duration_ns as f64
    }

    /// The program's and the empty program's figure for `packet` repeated, each the fastest
    /// of a few measurements taken in turn: the machine's noise only ever adds.
    fn repeated(&self, packet: &[u8]) -> (f64, f64) {
        let (mut ours, mut base) = (f64::MAX, f64::MAX);
        for _ in 0..REPEATED_TAKES {
            ours = ours.min(self.repeat(program_names::TC_FROM_POD, packet));
            base = base.min(self.repeat(program_names::TC_BASELINE, packet));
        }
        (ours, base)
    }

    /// Mean of `calls` single runs of the same packet: one syscall each, so the program
    /// starts with whatever the syscall path left in the caches.
    fn single_runs(&self, prog: &'static str, packet: &[u8]) -> f64 {
        let calls = self.args.calls;
        let total: u64 = self.lab.in_node(|| {
            (0..calls)
                .map(|_| {
                    self.dp
                        .test_run(prog, packet, 1)
                        .expect("test run")
                        .duration_ns as u64
                })
                .sum()
        });
        total as f64 / calls as f64
    }

    /// Means over single runs of new flows, one run of each program in turn per call, each
    /// on a packet of a flow never seen before: Tollgate's (`tc_from_pod`, tracked in the
    /// table), the table alone inserting (`tc_table_floor`), the table alone looking up
    /// only (the payload's first byte 1), the empty program's (never tracked). Taken in turn,
    /// so that a noisy stretch of the machine weighs on all four alike.
    fn new_flows(&mut self) -> NewFlows {
        let runs = [
            (program_names::TC_FROM_POD, 0u8),
            (program_names::TC_TABLE_FLOOR, 0),
            (program_names::TC_TABLE_FLOOR, 1),
            (program_names::TC_BASELINE, 0),
        ];
        let calls = self.args.calls;
        let packets: Vec<[Vec<u8>; 4]> = (0..calls)
            .map(|_| {
                runs.map(|(_, mark)| {
                    self.next_source += 1;
                    let n = self.next_source;
                    let mut f = frame((n / 60000) as u8, (n % 60000 + 1024) as u16, 5353);
                    f[FRAME_PAYLOAD] = mark;
                    f
                })
            })
            .collect();
        let mut totals = [0u64; 4];
        let mut rng = 0x853c_49e6_748f_ea9bu64 ^ u64::from(self.next_source);
        self.lab.in_node(|| {
            for call in &packets {
                // An order of its own for each call, so that no program always runs after
                // the same one.
                let mut order = [0, 1, 2, 3];
                for i in (1..order.len()).rev() {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    order.swap(i, (rng % (i as u64 + 1)) as usize);
                }
                for i in order {
                    let run = self.dp.test_run(runs[i].0, &call[i], 1).expect("test run");
                    totals[i] += u64::from(run.duration_ns);
                }
            }
        });
        let [ours, table_insert, table_lookup, base] = totals.map(|t| t as f64 / calls as f64);
        NewFlows {
            ours,
            table_insert,
            table_lookup,
            base,
        }
    }

    /// One sample of a case: the program's figure and the empty program's, measured the
    /// same way back to back.
    fn sample(
        &mut self,
        samples: &mut Vec<Sample>,
        case: &'static str,
        policy: usize,
        ct: usize,
        measure: impl FnOnce(&mut Self) -> (f64, f64),
    ) {
        let (ours, base) = measure(self);
        samples.push(Sample {
            case,
            policy,
            ct,
            ours,
            base,
        });
    }
}

/// One measurement of new flows (`Bench::new_flows`), in ns per run.
struct NewFlows {
    ours: f64,
    table_insert: f64,
    table_lookup: f64,
    base: f64,
}

/// One measurement of one row (case and table sizes) in one round.
struct Sample {
    case: &'static str,
    policy: usize,
    ct: usize,
    ours: f64,
    base: f64,
}

/// Rows from the rounds' samples: each round measured the rows in the same order.
fn figures_of(rounds: Vec<Vec<Sample>>) -> Vec<Figure> {
    let rows = rounds.first().map_or(0, Vec::len);
    (0..rows)
        .map(|row| {
            let first = &rounds[0][row];
            let (median, min, max) = stats(rounds.iter().map(|r| r[row].ours).collect());
            let (baseline, _, _) = stats(rounds.iter().map(|r| r[row].base).collect());
            let f = Figure {
                case: first.case.into(),
                policy_entries: first.policy,
                conntrack_entries: first.ct,
                median_ns: median,
                min_ns: min,
                max_ns: max,
                baseline_ns: baseline,
                ratio: median / baseline,
            };
            eprintln!(
                "{:<28} policy {:>7} ct {:>8}: {median:>7.1} ns (min {min:.1}, max {max:.1}), empty program {baseline:.1} ns, x{:.2}",
                f.case, f.policy_entries, f.conntrack_entries, f.ratio
            );
            f
        })
        .collect()
}

fn main() {
    let args = Args::parse();
    let wants = |section: &str| args.only.is_empty() || args.only.iter().any(|s| s == section);
    let (datapath, memory) = if wants("datapath") {
        (datapath_figures(&args), memory_figures(args.runs))
    } else {
        (vec![], vec![])
    };
    let control = if wants("control") {
        tollgate_tests::bench_control::run(args.runs as usize)
    } else {
        vec![]
    };
    let net = if wants("net") {
        tollgate_tests::bench_net::run(args.net_runs as usize)
    } else {
        vec![]
    };
    let dns = if wants("dns") {
        tollgate_tests::bench_dns::run(args.runs as usize)
    } else {
        vec![]
    };
    write_reports(&args, &datapath, &memory, &control, &net, &dns);
}

/// Policy entries and tracked flows of the rows, in the order a round fills them.
const DATAPATH_TABLES: [(usize, u32); 4] = [
    (10, 0),
    (1_000, 10_000),
    (10_000, 100_000),
    (100_000, 300_000),
];
/// Measurements of a repeated packet per row and round, the fastest kept.
const REPEATED_TAKES: usize = 3;
/// The full connection tracking table of the last rows.
const FULL_CONNTRACK: u32 = 1_000_000;

/// The datapath section: `runs` rounds, each loading the datapath afresh and measuring every
/// row once in the same order, so that a noisy minute of this shared machine costs each row
/// at most one of its samples instead of a whole row.
fn datapath_figures(args: &Args) -> Vec<Figure> {
    let lab = Lab::new();
    let mut rounds = Vec::new();
    for round in 0..args.runs {
        let started = Instant::now();
        rounds.push(datapath_round(&lab, args));
        eprintln!(
            "datapath round {} of {} in {:.1}s",
            round + 1,
            args.runs,
            started.elapsed().as_secs_f64()
        );
    }
    figures_of(rounds)
}

/// One round: the datapath loaded with the reference bank's pod addresses, the tables
/// filled step by step, each row measured once (the program and the empty program back to
/// back), the datapath removed.
fn datapath_round(lab: &Lab, args: &Args) -> Vec<Sample> {
    let mut options = tollgate::DatapathOptions::new(&lab.pin_dir);
    options.conntrack_capacity = 1 << 21;
    options.tc_mode = TcMode::Auto;
    let mut dp = Datapath::load(options).expect("load datapath");
    // BPF_PROG_TEST_RUN packets arrive on the node namespace's loopback (ifindex 1).
    dp.maps.set_tc_slot(1, SLOT).unwrap();
    // The reference bank's 20,000 pods, each address named (/32), the peer (10.1.0.11)
    // among them: a new or denied flow looks its peer up among as many as a node of that
    // cluster holds.
    for i in 0..POD_ADDRESSES {
        let identity = if i == 11 { PEER_IDENTITY } else { 1000 + i };
        let pod: IpNet = format!("10.1.{}.{}/32", i >> 8, i & 255).parse().unwrap();
        dp.maps.set_identity(pod, identity).unwrap();
    }
    // Egress-isolated workload in drop mode: UDP 5353 to the peer is allowed, 5354 is not (not 53: DNS to a resolver takes the DNS path, measured in the DNS section).
    let policy = WorkloadPolicy {
        mode: Mode::Drop,
        isolated_ingress: false,
        isolated_egress: true,
        ingress: vec![],
        egress: vec![
            allow(
                tollgate::compile::Peer::Identity(PEER_IDENTITY),
                PortMatch::Range {
                    proto: PROTO_UDP,
                    first: 5353,
                    last: 5353,
                },
            ),
            allow(
                tollgate::compile::Peer::Identity(PEER_IDENTITY + 1),
                tcp(443),
            ),
        ],
        ..WorkloadPolicy::default()
    }
    .sending_from(&["10.1.0.10".parse().unwrap()]);
    dp.maps.set_workload(SLOT, &policy).unwrap();
    // The same workload with a port range and an ipBlock besides: its denied flows look up
    // both tries too.
    let mut wide = policy.clone();
    wide.egress.extend([
        allow(
            tollgate::compile::Peer::Identity(PEER_IDENTITY + 1),
            PortMatch::Range {
                proto: agent_common::PROTO_TCP,
                first: 8000,
                last: 8100,
            },
        ),
        allow(
            tollgate::compile::Peer::Cidr {
                net: "10.9.0.0/16".parse().unwrap(),
                except: vec![],
            },
            PortMatch::Range {
                proto: PROTO_UDP,
                first: 53,
                last: 53,
            },
        ),
    ]);
    let established = frame(0, 40000, 5353);
    let denied = frame(0, 40001, 5354);
    // The agent gives a peer pair it has seen counting a direct-mapped bucket at its next
    // poll (`Observer::poll`); an established flow is measured in that steady state.
    let established_series = agent_common::FlowCounterKey {
        slot: SLOT,
        peer: PEER_IDENTITY,
        port: 5353,
        proto: PROTO_UDP,
        direction: agent_common::DIR_EGRESS,
        verdict: agent_common::VERDICT_ALLOWED,
        origin: agent_common::DIR_EGRESS,
        _pad: [0; 2],
    };
    // So is a denied pair that keeps sending: the agent gives every pair busy in the hash a
    // bucket.
    let denied_series = agent_common::FlowCounterKey {
        port: 5354,
        verdict: agent_common::VERDICT_DROPPED,
        ..established_series
    };
    for series in [established_series, denied_series] {
        dp.maps
            .assign_flow_series(&series, |_| false)
            .unwrap()
            .expect("a free flow series bucket");
    }

    let mut bench = Bench {
        lab,
        dp,
        args,
        next_source: 0,
    };
    // The denied packet with the port range and the ipBlock in the workload's rules.
    let denied_wide = |b: &mut Bench| {
        b.dp.maps.set_workload(SLOT, &wide).unwrap();
        let figures = b.repeated(&denied);
        b.dp.maps.set_workload(SLOT, &policy).unwrap();
        figures
    };
    let mut samples = Vec::new();
    let mut filled = bench.dp.maps.policy_entries().0;
    // Flows in the table, counted as they go in (walking a table of a million is seconds):
    // the bench's own established flow, the new flows of each measurement, the fill.
    let mut tracked = 0u32;
    let mut synthetic = 0u32;
    let mut inserted = std::collections::HashSet::new();
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    for (target, flows) in DATAPATH_TABLES {
        // Other rulesets' entries (the rulesets of slots 2 to 1023): single ports go to the
        // hash, and one in ten is a port range (a shorter prefix, in its ruleset's trie), so
        // both grow.
        while filled < target {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            // A range of 256 ports: the first byte of the port, the rest zero.
            let range = rng.is_multiple_of(10);
            let port = (rng >> 40) as u16;
            let key = PolicyKey {
                ruleset: 4 + (rng % (agent_common::RULESET_CAPACITY as u64 - 4)) as u32,
                peer: 256 + ((rng >> 16) % 20000) as u32,
                proto: PROTO_UDP,
                port: if range { port & 0xff00 } else { port }.to_be_bytes(),
                kind: 0,
            };
            let prefix = if range {
                POLICY_PREFIX_FULL - 8
            } else {
                POLICY_PREFIX_FULL
            };
            if inserted.insert((key.ruleset, key.peer, key.port, prefix)) {
                bench.dp.maps.insert_raw_policy(prefix, key).unwrap();
                filled += 1;
            }
        }
        assert_eq!(filled, bench.dp.maps.policy_entries().0);
        fill_conntrack(&mut bench, &mut synthetic, &mut tracked, flows);
        let ct = tracked as usize;
        bench.sample(&mut samples, "established flow", filled, ct, |b| {
            b.repeated(&established)
        });
        // The first run of the established packet tracked its flow.
        tracked = tracked.max(1);
        new_flow_rows(&mut bench, &mut samples, filled, ct);
        // Tollgate's flows and the table alone's inserts.
        tracked += 2 * args.calls;
        bench.sample(&mut samples, "denied flow (drop mode)", filled, ct, |b| {
            b.repeated(&denied)
        });
        bench.sample(&mut samples, DENIED_WIDE, filled, ct, denied_wide);
    }

    fill_conntrack(&mut bench, &mut synthetic, &mut tracked, FULL_CONNTRACK);
    let ct = tracked as usize;
    bench.sample(&mut samples, "established flow", filled, ct, |b| {
        b.repeated(&established)
    });
    bench.sample(&mut samples, "denied flow (drop mode)", filled, ct, |b| {
        b.repeated(&denied)
    });
    bench.sample(&mut samples, DENIED_WIDE, filled, ct, denied_wide);
    bench.sample(&mut samples, ESTABLISHED_SINGLE, filled, ct, |b| {
        (
            b.single_runs(program_names::TC_FROM_POD, &established),
            b.single_runs(program_names::TC_BASELINE, &established),
        )
    });
    new_flow_rows(&mut bench, &mut samples, filled, ct);
    let Bench { dp, .. } = bench;
    lab.in_node(|| dp.remove()).expect("remove datapath");
    samples
}

/// The new allowed flow's row and, measured with it, the table alone's two rows.
fn new_flow_rows(bench: &mut Bench, samples: &mut Vec<Sample>, filled: usize, ct: usize) {
    let m = bench.new_flows();
    for (case, ours) in [
        (NEW_FLOW, m.ours),
        (TABLE_LOOKUP, m.table_lookup),
        (TABLE_INSERT, m.table_insert),
    ] {
        bench.sample(samples, case, filled, ct, |_| (ours, m.base));
    }
}

/// A random read of this machine's memory, from user space with 4 KiB pages (as the kernel
/// maps a BPF map's memory), in an area of `mib` MiB.
#[derive(Serialize, Clone)]
struct MemoryFigure {
    mib: usize,
    /// Median over the runs of each run's mean.
    read_ns: f64,
}

/// The areas of a connection tracking table of 2^21 entries: its buckets (16 bytes each),
/// where a new flow's lookup reads one at random, and its preallocated elements (about 120
/// bytes each: the kernel's element header, the 44-byte key and the 24-byte entry, each
/// rounded to 8), where an insert into a full table takes the oldest.
const TABLE_AREAS_MIB: [usize; 2] = [32, 240];

fn memory_figures(runs: u32) -> Vec<MemoryFigure> {
    TABLE_AREAS_MIB
        .iter()
        .map(|&mib| {
            let (read_ns, min, max) = stats((0..runs).map(|_| random_read_ns(mib)).collect());
            eprintln!("random read in {mib} MiB: {read_ns:.1} ns (min {min:.1}, max {max:.1})");
            MemoryFigure { mib, read_ns }
        })
        .collect()
}

/// Mean time of a read that depends on the one before, each in a cache line of the area
/// picked at random (one cycle through all lines, so neither the caches nor the prefetcher
/// can know the next). The area is mapped with 4 KiB pages whatever the machine's
/// transparent huge page setting.
fn random_read_ns(mib: usize) -> f64 {
    const LINE: usize = 64 / size_of::<usize>();
    let bytes = mib << 20;
    let lines = bytes / 64;
    let mut order: Vec<usize> = (0..lines).collect();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    for i in (1..lines).rev() {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        order.swap(i, (rng % (i as u64 + 1)) as usize);
    }
    // SAFETY: a fresh private anonymous mapping, checked, used only as `area` below and
    // unmapped at the end.
    let area: &mut [usize] = unsafe {
        let at = libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        assert_ne!(at, libc::MAP_FAILED, "mmap {mib} MiB");
        libc::madvise(at, bytes, libc::MADV_NOHUGEPAGE);
        std::slice::from_raw_parts_mut(at.cast(), lines * LINE)
    };
    for (i, &line) in order.iter().enumerate() {
        area[line * LINE] = order[(i + 1) % lines] * LINE;
    }
    drop(order);
    const READS: usize = 2_000_000;
    let mut at = 0;
    let started = Instant::now();
    for _ in 0..READS {
        at = area[at];
    }
    let elapsed = started.elapsed().as_nanos() as f64;
    std::hint::black_box(at);
    // SAFETY: the mapping made above, no longer used.
    unsafe { libc::munmap(area.as_mut_ptr().cast(), bytes) };
    elapsed / READS as f64
}

/// Other workloads' flows, never expiring, until the table holds `flows`.
fn fill_conntrack(bench: &mut Bench, synthetic: &mut u32, tracked: &mut u32, flows: u32) {
    while *tracked < flows {
        let (key, entry) = tollgate_tests::bench_control::synthetic_flow(*synthetic);
        bench.dp.maps.insert_raw_conntrack(key, entry).unwrap();
        *synthetic += 1;
        *tracked += 1;
    }
}

fn sh(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn write_reports(
    args: &Args,
    figures: &[Figure],
    memory: &[MemoryFigure],
    control: &[tollgate_tests::bench_control::ControlFigure],
    net: &[tollgate_tests::bench_net::NetFigure],
    dns: &[tollgate_tests::bench_dns::DnsFigure],
) {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("unknown")
        .trim()
        .to_string();
    let kernel = sh("uname", &["-r"]);
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let date = sh("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    let mut md = String::new();
    writeln!(md, "# Benchmarks\n").unwrap();
    writeln!(
        md,
        "Written by `cargo xtask bench` (as root); do not edit by hand. Each figure is the median of \
         {} measurements (min and max beside it), next to the median of an empty TC program \
         (`tc_baseline`) measured the same way in the same run. The measurements are taken in \
         rounds: each round loads the datapath afresh, fills the tables step by step and \
         measures every row once, the program and the empty program back to back, so a noisy \
         minute of the machine costs a row one sample, not the row. A repeated packet's \
         measurement is the fastest of {} taken in turn with the empty program's (noise only \
         adds to a loop this short); new flows and single runs are means of their runs. The ratio is what to compare \
         across machines: the absolute numbers include BPF_PROG_TEST_RUN's own cost and move \
         with whatever else the machine is doing.\n",
        args.runs, REPEATED_TAKES
    )
    .unwrap();
    writeln!(
        md,
        "- Machine: {cpu}, {cores} cores; kernel {kernel}; {date}"
    )
    .unwrap();
    writeln!(
        md,
        "- Command: `cargo xtask bench --runs {}` (runs `target/release/tg-bench --runs {} --repeat {} --calls {}`)",
        args.runs, args.runs, args.repeat, args.calls
    )
    .unwrap();
    writeln!(
        md,
        "- Packet: 64-byte Ethernet/IPv4/UDP frame, workload isolated for egress in drop mode, \
         through `tc_from_pod` (the program on the host side of a workload's interface), to a \
         peer pod among {POD_ADDRESSES} named pod addresses (the reference bank's pods).\n"
    )
    .unwrap();
    writeln!(md, "## What each case measures\n").unwrap();
    writeln!(
        md,
        "- **established flow**: the same packet {} times; after the first run it hits its \
         connection tracking entry (parse, the routing cache, one hash lookup, counters; its \
         peer pair counts in a direct-mapped flow series bucket, as the agent arranges at its \
         first poll after seeing the pair).\n\
         - **new allowed flow**: {} single runs, each from a source port never seen before: \
         parse, conntrack miss, identity hash lookup, single-port policy hash lookup, conntrack \
         insert. Its baseline is the empty program run the same way (one syscall per packet), \
         so the timer overhead of single runs cancels out.\n\
         - **denied flow (drop mode)**: a packet no rule allows, {} times. Drop mode records no \
         flow for it, so every run is a full evaluation (identity hash, policy hash; the \
         workload's rules are single ports, so neither the policy trie nor the ipBlock trie is \
         looked up), the event token bucket and a drop. Its peer pair counts in a flow series \
         bucket, as the agent gives every pair busy in the hash.\n\
         - **{}**: the same packet, the workload's rules holding a port range and an ipBlock \
         too, so the policy trie and the ipBlock trie are looked up as well.\n\
         - **{}**: the established flow's packet in {} single runs (one syscall each), beside \
         the empty program run the same way: each run starts with what the syscall path left \
         in the caches, nearer what a packet in real traffic finds than the repeated loop. \
         No goal of its own; measured with the full conntrack table only.\n\
         - **{}** and **{}**: `tc_table_floor`, a program that does nothing but make a \
         connection tracking key of the frame's addresses and ports, look it up in the same \
         table (`CONNTRACK`, 2^21 entries, the rows' flows in it) and, in the second row, \
         insert it when it misses; measured as new flows are, beside them. What the kernel's \
         table costs any program that tracks a new flow in it: the floor under the new \
         allowed flow.\n\
         - policy entries: entries of other workloads' rules (the rulesets of slots 2 to \
         1,023; 9 in 10 single ports, in the hash; 1 in 10 port ranges, in their rulesets' \
         tries); conntrack entries: flows in the table.\n",
        args.repeat,
        args.calls,
        args.repeat,
        DENIED_WIDE,
        ESTABLISHED_SINGLE,
        args.calls,
        TABLE_LOOKUP,
        TABLE_INSERT
    )
    .unwrap();
    writeln!(md, "## Results\n").unwrap();
    writeln!(
        md,
        "| case | policy entries | conntrack entries | ns/packet (median) | min | max | empty program | ratio | added ns | goal (added ns) |"
    )
    .unwrap();
    writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|").unwrap();
    for f in figures {
        let added = f.median_ns - f.baseline_ns;
        writeln!(
            md,
            "| {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {:.1} | {} |",
            f.case,
            f.policy_entries,
            f.conntrack_entries,
            f.median_ns,
            f.min_ns,
            f.max_ns,
            f.baseline_ns,
            f.ratio,
            added,
            datapath_goal(&f.case).map_or("-".into(), |g| format!(
                "at most +{g:.0}: {}",
                if added <= g { "met" } else { "missed" }
            )),
        )
        .unwrap();
    }
    writeln!(
        md,
        "\nFlat within 10% across table sizes (goal), max/min of the medians:\n"
    )
    .unwrap();
    for case in [
        "established flow",
        NEW_FLOW,
        "denied flow (drop mode)",
        DENIED_WIDE,
    ] {
        let added: Vec<f64> = figures
            .iter()
            .filter(|f| f.case == case)
            .map(|f| f.median_ns - f.baseline_ns)
            .collect();
        let (lo, hi) = added
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
        if !added.is_empty() {
            writeln!(
                md,
                "- {case}: added ns from {lo:.0} to {hi:.0}, x{:.2}: {}",
                hi / lo,
                if hi / lo <= 1.10 { "met" } else { "missed" }
            )
            .unwrap();
        }
    }
    let median_of = |case: &str, policy: usize, ct_max: bool| {
        figures
            .iter()
            .filter(|f| f.case == case && f.policy_entries == policy)
            .map(|f| (f.conntrack_entries, f.median_ns))
            .reduce(|a, b| if (b.0 > a.0) == ct_max { b } else { a })
            .map(|(_, m)| m)
            .unwrap_or(f64::NAN)
    };
    let (small, large) = (
        figures.iter().map(|f| f.policy_entries).min().unwrap_or(0),
        figures.iter().map(|f| f.policy_entries).max().unwrap_or(0),
    );
    writeln!(
        md,
        "\n## Reading it\n\n\
         - Established flows cost one hash lookup in connection tracking, flat in the table \
         size: {:.0} ns with a near-empty table, {:.0} ns with {} tracked flows.\n\
         - Denied and new flows add the identity hash and the single-port policy hash, flat in \
         the number of rules: denied flows measured {:.0} ns at {} policy entries and {:.0} ns \
         at {}. Rules with port ranges or with ipBlocks add the workload's \
         own policy trie and ipBlock trie, which hold its own rules only: {:.0} ns and {:.0} \
         ns.\n\
         - {}\n\
         - The absolute cost is in the added ns column; the empty program shows the floor of \
         the hook itself on this machine.",
        median_of("established flow", large, false),
        median_of("established flow", large, true),
        figures
            .iter()
            .map(|f| f.conntrack_entries)
            .max()
            .unwrap_or(0),
        median_of("denied flow (drop mode)", small, false),
        small,
        median_of("denied flow (drop mode)", large, false),
        large,
        median_of(DENIED_WIDE, small, false),
        median_of(DENIED_WIDE, large, false),
        new_flow_floor(figures, memory),
    )
    .unwrap();
    writeln!(
        md,
        "\n## What changed, and where Tollgate still loses\n\n\
         Measured by taking one piece out at a time (`tg-bench --only datapath`, 2026-11-25, \
         established flow at +174 ns before): the per-flow counter hash lookup cost about \
         40 ns, the interface-to-slot hash lookup 25-28 ns, the fine clock 12 ns, the atomic \
         add into the shared conntrack entry 5-10 ns.\n\n\
         - Per-flow counters: a peer pair the agent has seen gets a bucket of a direct-mapped \
         table (`FLOW_SERIES`, the bucket a hash of the pair): counted with two array \
         lookups the verifier inlines, exact (per-CPU), read by the agent per bucket, never \
         by walking connection tracking. Pairs not seen yet, or whose two buckets are taken, \
         stay in the LRU hash; an idle pair goes back to it after 10 minutes.\n\
         - Interface and cgroup to slot: a direct-mapped cache (`TC_SLOT_CACHE`, \
         `CGROUP_SLOT_CACHE`) in front of the hash, filled by the agent.\n\
         - `bpf_ktime_get_coarse_ns` instead of `bpf_ktime_get_ns`: expiry and rate limits \
         need milliseconds, not the clocksource. Then (2026-11-26) jiffies instead of the \
         coarse clock, tied to CLOCK_MONOTONIC_COARSE by the agent at load: one load instead \
         of a seqlock read of the timekeeper. Side by side, alternating builds: established \
         flow 113-115 ns against 123-136 in the loop, and 117-125 ns added against 141-149 in \
         single runs.\n\
         - Single-port rules (most rules) in a hash, `POLICY_EXACT`, looked up first; the \
         policy trie keeps rules without ports, with a protocol only, or with a port range. A \
         workload whose rulesets have none of those, or no ipBlocks, does not look up that \
         trie at all (`workload_flags::PREFIX_RULES_*`, `CIDR_RULES_*`). Denied flows went \
         from +164 ns at 10 entries growing to +218 ns at 100,000 (x1.33) to flat; the same \
         run of the previous build, side by side: +162 to +215 before, +157 to +159 after. \
         The bench now also counts the denied pair in a flow series bucket, as the agent does \
         for every busy pair (the LRU hash lookup it took before was 43 ns of the figure). \
         Then (2026-11-26) rules of every port of a protocol and rules without ports became \
         hash keys of a kind of their own too, each looked up only when the ruleset has such \
         rules, and the trie kept port ranges alone: with 9,300 rules without ports in the \
         workload's ruleset (the traffic section's policy), a denied flow toward a peer whose \
         identity falls among theirs measured +180 to +187 ns through the trie and +130 to \
         +131 through the hash, alternating builds.\n\
         - Conntrack entries hold no packet counts (nothing read them; the per-CPU counters \
         are the exact ones): 24 bytes instead of 40, no write into the shared entry on an \
         established packet unless its state or expiry moves.\n\
         - The pipeline stays inlined in each program (`#[inline(always)]` on the entry \
         points): as it grew, LLVM had moved it into a BPF-to-BPF call, 8 to 10 ns a packet.\n\
         - Established TCP and UDP packets take a fast path (2026-11-26, \
         `agent-ebpf/src/established.rs`; `docs/datapath.md`, \"The fast path of an \
         established flow\"): header words read straight from the packet, the key written a \
         word at a time, one lookup, the counters; a SYN-ACK, FIN or RST moves the flow's \
         TCP state there too (late 2026-11-26; until then each was parsed and looked up a \
         second time by the general pipeline: a tracked FIN-ACK measured 133 ns, now 74, \
         where an ACK is 70-72); anything that could decide otherwise (a bare SYN, which may \
         open a closed connection again, a stale entry, a drop-mode deny, IPv4 options, IPv6 \
         extension headers, fragments, DNS) takes \
         the general pipeline, which then skips the main-table lookup the fast path missed. \
         Found with `perf` over the JIT image (sample addresses mapped to source lines \
         through the program's line info): the general pipeline spent about a third of an \
         established packet's program time parsing and moving bytes (LLVM's BPF backend \
         copies a byte-aligned array a byte at a time), and the fast path's first version \
         22% of its time in `memset`, a BPF-to-BPF call LLVM made of its zero-initialized \
         key. Interleaved runs of both builds, the fastest of 20 x 1,000,000 repeats each: \
         established 76-77 ns against 108-114 before; denied 136-140 against 135-138. Then a \
         packet the fast path finds untracked (a new or denied TCP or UDP flow) goes on \
         with the fields it read instead of being parsed again, and the empty `Packet` the \
         general pipeline starts from is written as 64-bit zero words (LLVM had copied it \
         from read-only data a byte or two at a time): denied 114-116 ns against 137-140, new \
         flows 605-626 against 647-689 in single runs, established 79-80 against 76-77. \
         IPv6 (no extension headers) took the fast path last: established IPv6 packets \
         82-84 ns against 105-107, at 2-5 ns for IPv4 (its flow record is four address words \
         now). The \
         earlier conclusion that byte-wise code did not matter (typed header reads, \
         2026-11-26: 3% fewer instructions, no faster) was drawn from runs whose spread \
         (136-168 ns) was wider than the gain.\n\
         - Kept: the `CONFIG` array lookup (the verifier inlines array lookups: a load-time \
         global would save a few ns and cost a reload to change a timeout) and one \
         connection tracking key for both families: a 16-byte IPv4 key in tables of its own \
         was built and measured (2026-11-26) no faster on established or new flows and a few \
         ns slower on denied ones (the kernel's hash of 44 bytes is not where the lookup's \
         time goes), for a second table's memory. Neither `-C target-cpu=v3` measured \
         faster; LLVM 22's misaligned memory access the verifier rejects (it merges stack \
         accesses too).\n\
         - Where the established flow's time goes now (perf, the same mapping): the kernel's \
         hash lookup and its return, the program's entry and exit, then the counters; the \
         parse is a few word loads. In real traffic the same \
         programs cost several times what this loop shows (the traffic section, from the \
         kernel's own run-time statistics: 182 to 258 ns per run during a TCP transfer on the \
         Intel host, where an empty program costs 42 to 57; 340 to 450 in earlier runs on \
         the EPYC host): \
         the loop runs one packet over and over with everything in the CPU's caches, while a \
         real packet most likely finds the map entries it needs (about ten cache lines: slot \
         cache, workload, `CONFIG`, the conntrack bucket and entry, the counters, the flow \
         series bucket) evicted by the network stack in between. Measured in real \
         traffic (2026-11-27): `perf` sampling the whole machine through a 22 s `iperf3` \
         transfer over both programs (log mode, 9,300 peers), sample addresses mapped to \
         source lines through the programs' line info. The programs and the kernel's hash \
         lookup they call took 2.9% of the samples, about 218 ns a run. No one place \
         dominates: the conntrack lookup (hash and bucket walk) about a quarter, the \
         program's entry about a tenth (its first instruction alone 5%: the code is not in \
         the nearest cache when a packet comes), then the first read of each map entry at 4 \
         to 7% each (workload, slot cache, `CONFIG`, counters, flow series key and value). \
         Measured over the same transfer, alternating builds, ns per run (runs of one build \
         spread by 10% or more): the flow series count left out (three lines fewer; not a \
         change to keep, it is the per-peer metric) 215-235 against 238-270, about 8%. Three \
         changes that keep everything: the fast path and the general pipeline each a \
         function of its own, so the fast path's \
         code lies together (the verifier refuses the general pipeline alone as a call: the \
         two frames need 672 bytes of stack), median 251 against 256; the arrays every \
         packet reads page-aligned (mmapable) and workload entries padded to 64 bytes (a \
         plain array's values start 56 bytes into a line on 6.18, so the `CONFIG` entry and \
         most workload entries spanned two lines), median 232 against 223, and no change in \
         single runs; a per-CPU copy of each slot's last flow in front of the conntrack \
         lookup, median 248 against 237. None was faster beyond the noise, and the aligned \
         arrays would have changed the pinned maps' layout (an upgrade would need \
         `--reset-state`): none kept. The cost is spread over a dozen cache lines and the \
         code, a few percent each; TCP at 0.97 of no program, about two points beyond the \
         empty program's 0.988, needs about half of today's cost a run. Through \
         back-to-back connections (the same profile, 15 s) the largest single cost was the \
         kernel's walk of a conntrack bucket (`lookup_nulls_elem_raw`, 2.3% of the samples, \
         more than both programs' 1.9%): two thirds of it under the fast path's lookup in \
         the main table and a fifth under its lookup in the overflow table (a workload \
         opening 12,000 connections a second holds more than its share), where a \
         connection's first packet at each end misses in buckets and elements no recent \
         packet touched: the new flows' cost below, in real traffic. New flows: about +650 ns where the goal is +250. Taking the \
         conntrack insert out measured 391 ns instead of 630, so the LRU insert (a node \
         popped under the LRU list lock, the bucket lock, the element written) is about \
         240 ns; taking the policy evaluation out changed nothing measurable in single runs \
         (651-727 ns against 620-816); the rest is the conntrack miss in a table of 2^21 \
         buckets and the program's own work on cold caches, as each single run starts \
         cold. A per-CPU LRU (`BPF_F_NO_COMMON_LRU`) would take the list lock away but \
         split the table by possible CPU, and a flood on one CPU would then evict other \
         workloads' flows there, which the fair share below forbids; so the insert stays. \
         A profile of single new-flow runs (2026-11-26, `perf` with call chains, samples \
         under the program): 32-38% in the conntrack lookup that misses, nearly all on its \
         first load, the bucket's head; 37-40% in the insert, most of it popping a free \
         element off the LRU lists and writing it; 19% in the program itself. A new flow's \
         hash picks a bucket no recent packet touched, and the free element is memory \
         untouched since the table was made, so both are cache misses that no program change \
         removes; a table of 2^16 instead of 2^21 measured 30 to 50 ns less. \
         An open-addressing table in place of the LRU hash was built as a prototype and \
         measured (2026-11-26): an mmapable array of 2^21 slots in groups of four, a \
         slot's claim word taken with compare-and-swap, its key and entry on adjacent \
         lines, the victim an empty, expired or soonest-expiring slot of the group. \
         Alternating runs of both builds, new allowed flows: with the bench's 2^21 \
         entries, +514 to +681 ns against +312 to +662 for the LRU hash; with 2^14 \
         entries, which stay in the caches, +217 to +432 against +279 to +653. The \
         insert's bookkeeping goes, but the first touch of a random line of a table this \
         size stays, and it is most of the cost: +250 is within reach only for a table \
         that fits in the caches, which a node tracking a million flows cannot have. Not \
         kept. A plain hash without preallocation (`BPF_F_NO_PREALLOC`, its elements from \
         per-CPU caches of freed memory, the overflow table behind it when full) measured \
         no faster either (2026-11-27), two alternating runs each: +677 to +1,029 and +603 \
         to +949 ns against +740 to +895 and +597 to +1,036 for the LRU hash.\n\
         - The table alone (2026-11-27): `tc_table_floor`, measured with every new flow \
         (the rows above), call by call with Tollgate's program and the empty one, in an \
         order of its own each call. In the run committed with it the table alone, its \
         lookup and insert, added +419 to +738 ns across rows, and its lookup alone +229 to \
         +485; Tollgate's new flow added +155 to +236 ns beyond the table alone, row by row \
         (its parse, identity, policy, share count, event bucket and counters, which take \
         about 100 ns in a warm loop: the denied flow's figure). A first version turned the \
         order round by one each call, which kept each program behind the same one, and \
         showed Tollgate at the table's own cost (-74 to +13 ns row by row): not a figure to \
         keep. The table's cost: the lookup reads a bucket no recent packet touched, in an \
         array of 32 MiB (a random read there, measured beside from user space with the 4 \
         KiB pages the kernel maps a map with: 150-180 ns on this host; with 2 MiB pages \
         143 ns, a C program, 2026-11-27, but the kernel has no flag to give a map's memory \
         larger pages); the insert takes a free element off the LRU's lists (in the order \
         the table was made until it is full, then its oldest, somewhere among 240 MiB), \
         locks the bucket and writes the element. It grows as the table fills (the lookup \
         that misses: +229 ns empty, +485 ns with a million flows in that run), as a missed \
         lookup more often walks an element of its bucket's chain. So +250 ns for a new \
         flow, and flat from 1 to 1,000,000 tracked flows, is below what the kernel's table \
         of that size costs on this machine before the program does anything; it is kept as \
         the goal, and missed. Tollgate's own part could shrink by perhaps half (the warm \
         loop's figure), which would not meet it either.\n\
         - Measured in rounds (2026-11-26): until then each row was measured five times in \
         one stretch, so a noisy minute of this shared host doubled whole rows (the report \
         before: established flows +46 to +103 ns across rows while the empty program held \
         at 7 to 12). Now each round loads the datapath afresh and measures every row once, \
         a repeated packet the fastest of three taken in turn with the empty program. In the \
         first run of the method established flows came out flat at +44 to +46 ns and denied \
         flows at +89 to +97. New allowed flows came out higher than before, +515 to +714 \
         against +318 to +686: a row's new flows now follow other work (the table fills, \
         the loops of other rows), where the earlier method ran five batches back to back and \
         the later ones found the connection tracking table's free elements, and the pages \
         they lie in, warmed by the batch before. A new flow in real traffic also comes \
         between other work. Likely, not measured: the LRU also walks up to 128 elements of \
         its lists each time a CPU's free list is refilled (every 128 inserts), the table's \
         oldest and coldest, which would make the cost grow with the flows tracked, as the \
         rows do.\n\
         - Peer addresses in a hash (2026-11-26): single addresses (pods, Service frontends, \
         the node's) in `IDENTITIES_EXACT`, looked up before the identity trie, which keeps \
         shorter prefixes only. The bench named its peer with one /16 until then, which kept \
         the trie one level deep; it now names the reference bank's 20,000 pods one address \
         each, the peer among them, as a node of that cluster does. Alternating runs with the \
         20,000 addresses: denied flows +110 to +118 ns through the hash against +176 to +193 \
         through the trie (the trie's +93 to +97 with the single /16 is what the figures \
         before this date show).\n\
         - Policy and ipBlock tries per ruleset (2026-11-26): `POLICY` and `CIDR_RULES` \
         became arrays of maps indexed by ruleset, each holding an LPM trie of that \
         ruleset's entries only, as Cilium gives each endpoint a policy map of its own. One \
         shared trie got deeper with every other workload's rules (a lookup walks past the \
         branches that tell the other rulesets apart). Alternating runs of both builds: \
         denied flows with a port range and an ipBlock +114 to +118 ns from 10 to 100,000 \
         other entries, against +113 at 10 and +137 to +145 from 1,000 on before.\n\
         - Fairness: each workload holds at most `--conntrack-share` (25%) of the table; its \
         new flows beyond that go to an overflow table a quarter the size. \
         `tests/tests/fairness.rs` floods one workload until, with the limit off, the LRU \
         evicts another workload's established flow, then floods twice as much with the limit \
         on and finds that flow still tracked and working. Flows tracked in the overflow \
         table take the fast path too (2026-11-26): until then every packet of theirs took the \
         general pipeline, and the traffic section, which had no census to correct the share \
         counts as the agent's does every 30 s, tracked its TCP transfer there after the \
         new-connection load and measured that: 308 to 324 ns per program run during TCP, \
         against 182 to 258 with the fast path and the census, in four runs on the same host. \
         A flow opened again on the key of one of the workload's entries that no longer holds \
         (expired, or a TCP connection opened again on its ports) replaces it and is counted \
         once (2026-11-27): until then each such connection counted again until the next \
         census, and the new-connection load, whose client reuses its ports, sent 19,000 to \
         26,000 flows of each Tollgate configuration to the overflow table (8 pairs of windows \
         per configuration; the traffic section's checks now show 0).\n\
         - Control plane: changes are applied as the Kubernetes source's change log names them \
         (pods, namespaces, Services, EndpointSlices), to persistent identity and frontend maps; \
         a cached pod result is recompiled only when a peer of its policies selects an identity \
         whose pods changed, and egress Service rules are re-decided per changed frontend. The \
         pod and namespace figures below go through that path (a store, as watch events \
         arrive); so do the files since late 2026-11-26: the file source keeps its state and \
         changes only the objects of the files that changed, which it tells from their \
         metadata without reading the others. See `docs/datapath.md`, \"Changes cost what they touch\". \
         What every reconcile paid besides (about 10 ms, measured phase by phase on \
         2026-11-25) went to about 5: a pod's cached result is kept by comparing its inputs \
         and the versions of its policies (a policy is compared with its last copy, its \
         namespaceSelectors matched again only when namespace labels change) instead of \
         hashing them, rule ids follow added and deleted policies only, a pod change \
         recomputes only the Services that name or select it, and compiling a pod matches a \
         peer's namespaceSelector once per namespace instead of once per identity. Then \
         (2026-11-26) the policies selecting a pod are found through an index of its \
         namespace's policies by the first label their podSelector requires, instead of \
         matching all of them (50 a namespace here), and the cgroup scan checks a \
         directory's name at the level it found it instead of building six candidate paths \
         per directory. Measured warm, reconciling two loaded states in turn: the scan went \
         from 1.3 ms to 0.33, the compile's loop over the 250 local pods from about 2.1 to \
         1.3; alternating builds, the fastest reconcile from 4.65-4.70 ms to 4.16-4.44. \
         After a load, the same reconcile measured 6.5 to 8.5 ms (median): the file source \
         built its state afresh from every file, read and hashed in full, which left the \
         caches cold. Keeping the state and reading only changed files (late 2026-11-26) \
         took, in three alternating runs of both builds, the whole-policy change from 7.4-10.0 \
         ms to 6.2-6.7, a single policy change from 7.1-7.7 to 6.2-6.8, and the file written \
         to enforcing from 132-151 ms to 44-48. Then (2026-11-27) a profile of the warm \
         reconciles (`perf`, frame pointers) found 40% of their time in string comparisons \
         down B-trees: each of the 250 local pods was looked up among 20,000 pods five to \
         seven times per reconcile, at about a microsecond a lookup (keys rarely in the \
         caches), and every compile walked all 1,500 policies four times (rule ids, named \
         ports, the selector index, the policy versions). Now each local pod is looked up \
         once, hostPorts are looked for only in pods that have one (that step: 0.77 ms to \
         nothing measurable), the change log names policies and ModeOverrides, and a pod the \
         log does not name, in a namespace none of whose policies it names, keeps its result \
         without a look at its policies; a namespace's policies are indexed only when one of \
         its pods is compiled. Two alternating runs of both builds (`tg-bench --only control \
         --runs 10`, a noisy hour): a single policy change 10.5 and 11.8 ms before, 7.3 and \
         7.6 after; a whole policy 11.1 and 12.7 against 7.7 and 7.7; a pod 8.5 and 10.3 \
         against 6.9 and 5.3; a namespace (every pod compiled again, as before) 7.6 and 9.8 \
         against 6.9 and 8.1."
    )
    .unwrap();
    if !net.is_empty() {
        net_section(&mut md, net, args);
    }
    if !control.is_empty() {
        control_section(&mut md, control, args);
    }
    if !dns.is_empty() {
        writeln!(
            md,
            "\n## DNS: holding answers for EgressAllowlists\n\n\
             A pod an EgressAllowlist selects looks `api.example.com` up at dnsmasq (another pod) \
             and, at once, connects to the address over TCP and echoes one byte; {} times per \
             run, median over {} runs of each run's percentile, without Tollgate and with the \
             agent attached (answers held in the datapath until the agent has written what they \
             taught, then handed back: `docs/egress-allowlists.md`).\n\n\
             | case | without p50 | with p50 | added p50 | without p99 | with p99 |\n\
             | --- | --- | --- | --- | --- | --- |",
            dns[0].lookups, args.runs
        )
        .unwrap();
        for f in dns {
            writeln!(
                md,
                "| {} | {:.0} us | {:.0} us | +{:.0} us | {:.0} us | {:.0} us |",
                f.case,
                f.without_p50_us,
                f.with_p50_us,
                f.with_p50_us - f.without_p50_us,
                f.without_p99_us,
                f.with_p99_us
            )
            .unwrap();
        }
    }
    std::fs::create_dir_all(&args.out).expect("create output dir");
    std::fs::write(args.out.join("benchmarks.md"), md).expect("write benchmarks.md");
    let json = serde_json::json!({
        "machine": {"cpu": cpu, "cores": cores, "kernel": kernel, "date": date},
        "runs": args.runs, "repeat": args.repeat, "calls": args.calls, "net_runs": args.net_runs,
        "figures": figures,
        "memory": memory,
        "traffic": net,
        "control_plane": control,
        "dns": dns,
    });
    std::fs::write(
        args.out.join("benchmarks.json"),
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .expect("write benchmarks.json");
    eprintln!(
        "wrote {}/benchmarks.md and benchmarks.json",
        args.out.display()
    );
}

/// The denied flow of a workload whose rules also hold a port range and an ipBlock.
const DENIED_WIDE: &str = "denied, ranges and ipBlocks";
/// The established flow in single runs, as new flows are measured.
const ESTABLISHED_SINGLE: &str = "established flow, single runs";
const NEW_FLOW: &str = "new allowed flow";
/// The connection tracking table alone (`tc_table_floor`): what any program that tracks
/// flows in it pays for a new one.
const TABLE_LOOKUP: &str = "table alone: lookup that misses";
const TABLE_INSERT: &str = "table alone: lookup and insert";

/// What the rows say of a new flow's cost: the table's own part (`tc_table_floor`), what
/// Tollgate adds beyond it, and the memory reads behind the first.
fn new_flow_floor(figures: &[Figure], memory: &[MemoryFigure]) -> String {
    let added = |f: &Figure| f.median_ns - f.baseline_ns;
    let rows: Vec<(f64, f64, f64)> = figures
        .iter()
        .filter(|f| f.case == NEW_FLOW)
        .filter_map(|f| {
            let at = |case: &str| {
                figures.iter().find(|g| {
                    g.case == case
                        && g.policy_entries == f.policy_entries
                        && g.conntrack_entries == f.conntrack_entries
                })
            };
            Some((added(f), added(at(TABLE_INSERT)?), added(at(TABLE_LOOKUP)?)))
        })
        .collect();
    if rows.is_empty() {
        return "New flows against the table alone: not measured in this run.".into();
    }
    let range = |pick: fn(&(f64, f64, f64)) -> f64| {
        let (lo, hi) = rows
            .iter()
            .map(pick)
            .fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
        format!("{lo:+.0} to {hi:+.0} ns")
    };
    let reads = memory
        .iter()
        .map(|m| format!("{:.0} ns in {} MiB", m.read_ns, m.mib))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "A new allowed flow added {} over the empty program; the table alone, in the same \
         rows, {} for its lookup and insert ({} for the lookup that misses). So the goal of \
         +250 ns lies below what the kernel's table of 2^21 entries costs a new flow on this \
         machine before any policy is looked at, and Tollgate's own part of a new flow (parse, \
         identity, policy, share count, event bucket, counters) is the difference: {} (row by \
         row). The lookup's cost is memory: a new flow's hash picks a bucket no recent packet \
         touched, in an array of 32 MiB; the insert then takes a free element off the LRU's \
         lists, locks the bucket and writes the element. Random reads measured from user \
         space in this run, with the 4 KiB pages the kernel maps a map with: {reads} (the \
         table's buckets take 32 MiB, its elements {} MiB, among which an insert into a full \
         table takes the oldest).",
        range(|r| r.0),
        range(|r| r.1),
        range(|r| r.2),
        range(|r| r.0 - r.1),
        TABLE_AREAS_MIB[1],
    )
}

/// Issue 11's goal for a datapath case: the most it may add over the empty program, in ns.
fn datapath_goal(case: &str) -> Option<f64> {
    match case {
        "established flow" => Some(60.0),
        NEW_FLOW => Some(250.0),
        "denied flow (drop mode)" | DENIED_WIDE => Some(150.0),
        _ => None,
    }
}

/// The goal of a control-plane figure, as text, and whether `median` meets it.
fn control_goal(what: &str, median: f64) -> String {
    let (goal, met) = if what.contains("compile and apply (reconcile)") {
        ("under 10 ms", median < 10.0)
    } else if what.contains("/metrics scrape") {
        ("under 50 ms", median < 50.0)
    } else {
        return "-".into();
    };
    format!("{goal}: {}", if met { "met" } else { "missed" })
}

fn net_section(md: &mut String, net: &[tollgate_tests::bench_net::NetFigure], args: &Args) {
    let fmt = tollgate_tests::bench_net::fmt_opt;
    let seconds = tollgate_tests::bench_net::SAMPLE_SECONDS;
    writeln!(
        md,
        "\n## Traffic between two workloads over veth\n\n\
         Client pod to server pod through the lab's node namespace (veth, routed), the \
         client's processes on CPU 0 and the server's on CPU 1 (`taskset`), so the scheduler's \
         placement is the same in every sample. TCP throughput and new connections are measured \
         in windows of one running load: one `iperf3` stream, or TCP connect, 1-byte request \
         and reply, close, back to back (the cost of a new flow: where a linear rule chain \
         shows). The configuration is set up and taken down in turn: {tcp_pairs} pairs of \
         {window_ms} ms windows ({crr_pairs} for new connections, whose ratio is the noisiest and \
         nearest its goal), each counted in the server's namespace (bytes received, accepted \
         connections) after {settle_ms} ms to settle, a pair's two windows adjacent and in turn \
         first. So no window holds a test's start (slow start, process start-up), and the two \
         sides of a ratio are a fraction of a second apart. Small UDP packets (`iperf3 -u -b 0 \
         -l 64 -t {seconds}`, packets received per second) and request/response latency \
         (`sockperf ping-pong -m 64 -t {seconds}`, UDP, p50 and p99) take whole {seconds}-second \
         samples, {pairs} pairs: a one-way UDP stream must start with the rules in place, as \
         conntrack takes it for established only from iperf3's opening exchange. A ratio is the \
         median over the pairs of the configuration's sample divided by the no-program sample \
         beside it. The machine is shared, and one window moves by about 10% from the next with \
         nothing changed (each ratio's min and max are in `benchmarks.json`), so a median \
         within a few percent of a goal is within the noise either way. The absolute columns \
         are medians of the samples.\n\n\
         Empty TC program: `tc_baseline`, which does nothing, attached where Tollgate's programs \
         go: what the hook itself costs. Tollgate: both workloads attached (TCX), isolated both \
         ways, each with a policy of N allowed peers (the other workload among them); a \
         window attaches the programs before it and detaches them after. iptables: what Calico \
         renders for the same job: a chain per workload and direction with a counted rule per \
         allowed peer (calico-accountant reads those counters), the client's rule last, \
         conntrack accepting established flows. nftables: the same with the peers in a set.\n",
        pairs = args.net_runs,
        tcp_pairs = tollgate_tests::bench_net::pairs_for(
            tollgate_tests::bench_net::Metric::Tcp,
            args.net_runs as usize
        ),
        crr_pairs = tollgate_tests::bench_net::pairs_for(
            tollgate_tests::bench_net::Metric::NewConnections,
            args.net_runs as usize
        ),
        window_ms = tollgate_tests::bench_net::WINDOW.as_millis(),
        settle_ms = tollgate_tests::bench_net::SETTLE.as_millis(),
    )
    .unwrap();
    writeln!(
        md,
        "| configuration | peers | TCP Gbit/s | ratio | UDP kpps | ratio | p50 us | p99 us | p99 added us | new conn/s | ratio |"
    )
    .unwrap();
    writeln!(
        md,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    .unwrap();
    for f in net {
        writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} | {} |",
            f.config,
            f.rules,
            fmt(f.tcp_gbps, 2),
            fmt(f.tcp_ratio, 3),
            fmt(f.udp_kpps, 0),
            fmt(f.udp_ratio, 3),
            fmt(f.latency_p50_us, 1),
            fmt(f.latency_p99_us, 1),
            f.p99_added_us.map_or("-".into(), |v| format!("{v:+.1}")),
            f.new_connections_per_s,
            fmt(f.new_connections_ratio, 3),
        )
        .unwrap();
    }
    writeln!(
        md,
        "\nWhat the programs themselves cost, from the kernel's BPF run-time statistics \
         (`BPF_ENABLE_STATS`), in a window of {stats_ms} ms per configuration and load after \
         its ratio windows: their run time as a share of the CPU time the machine had (wall \
         time x CPUs), and per program run (each packet runs one program on the way out of the \
         client's interface and one on the way into the server's, and the same for the \
         replies). The statistics cost two clock reads per run, so the windows of the ratios \
         are taken without them. The empty program's row is the hook's own share of each \
         figure.\n\n\
         Checks on every Tollgate row, over all its samples: the load is allowed traffic, so \
         no packet of it may count as dropped or would-drop; and the new connections reuse the \
         client's ephemeral ports (28,232 of them), so each workload holds fewer flows than \
         its share of the connection tracking table (`--conntrack-share`, 25% of the agent's \
         default table here) and none may be tracked in the overflow table.\n\n\
         | configuration | peers | CPU share, TCP | ns per run, TCP | CPU share, new connections | ns per run, new connections | packets denied | flows in the overflow table |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|",
        stats_ms = tollgate_tests::bench_net::STATS_WINDOW.as_millis(),
    )
    .unwrap();
    let pct = |v: Option<f64>| v.map_or("-".into(), |v| format!("{:.2}%", v * 100.0));
    for f in net
        .iter()
        .filter(|f| f.config.starts_with("Tollgate") || f.config.starts_with("empty"))
    {
        writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            f.config,
            f.rules,
            pct(f.tcp_program_cpu_share),
            fmt(f.tcp_program_ns_per_run, 0),
            pct(f.crr_program_cpu_share),
            fmt(f.crr_program_ns_per_run, 0),
            f.checks.map_or("-".into(), |c| c.denied.to_string()),
            f.checks.map_or("-".into(), |c| c.overflowed.to_string()),
        )
        .unwrap();
    }
    let base = &net[0];
    writeln!(
        md,
        "\nThe no-program row holds every baseline sample of the run. Min and max of every \
         figure and ratio are in `benchmarks.json` (`traffic[].spread`).\n\n\
         Goals for Tollgate at 9300 peers, in log and drop mode: TCP throughput at least 0.97 \
         and new connections per second at least 0.9 of no program; p99 within the run-to-run \
         noise of no program (here: the interquartile range of the no-program p99 samples, \
         {} us). A ratio's goal is called met or missed only when a confidence interval of its \
         median of at least 95% (from the order statistics of its pairs, assuming nothing of \
         their distribution but that the pairs are independent) lies on one side of it; else \
         this run does not decide it.\n",
        fmt(base.p99_noise_us, 1)
    )
    .unwrap();
    // A ratio's goal is met or missed only when the 95% interval of its median is clear
    // of it: a median within the noise of the goal decides nothing.
    let verdict = |v: Option<f64>, interval: Option<(f64, f64)>, goal: f64| match (v, interval) {
        (Some(v), Some((lo, hi))) => {
            let call = if lo >= goal {
                "met"
            } else if hi < goal {
                "missed"
            } else {
                "undecided: the interval holds the goal"
            };
            format!("{v:.3} (95% interval {lo:.3} to {hi:.3}: {call})")
        }
        (Some(v), None) => format!("{v:.3} (undecided: too few pairs for an interval)"),
        (None, _) => "-".into(),
    };
    for f in net
        .iter()
        .filter(|f| f.config.starts_with("Tollgate") && f.rules >= 9300)
    {
        let p99 = match (f.p99_added_us, base.p99_noise_us) {
            (Some(added), Some(noise)) if added <= noise => format!("{added:+.1} us (met)"),
            (Some(added), Some(_)) => format!("{added:+.1} us (missed)"),
            _ => "-".into(),
        };
        let checks = match f.checks {
            Some(c) if c.denied > 0 || c.overflowed > 0 => format!(
                "; checks failed: {} packets denied, {} flows in the overflow table (the \
                 figures are not those of allowed traffic tracked as the agent tracks it)",
                c.denied, c.overflowed
            ),
            _ => String::new(),
        };
        writeln!(
            md,
            "- {}: TCP {}, new connections {}, p99 {}{checks}",
            f.config,
            verdict(f.tcp_ratio, f.tcp_ratio_interval, 0.97),
            verdict(
                f.new_connections_ratio,
                f.new_connections_ratio_interval,
                0.9
            ),
            p99,
        )
        .unwrap();
    }
}

fn control_section(
    md: &mut String,
    control: &[tollgate_tests::bench_control::ControlFigure],
    args: &Args,
) {
    writeln!(
        md,
        "\n## Control plane at the reference bank's size\n\n\
         A generated cluster: {} services in {} namespaces, {} pods, {} allowed \
         service-to-service connections (one ingress policy per called service, a peer per \
         caller, named port), as Kubernetes YAML files; {} of the pods are local to this node \
         and attached through their cgroup directories. Cold sync starts from empty pins; a \
         single change adds or removes one caller of a service that has a local pod; a file \
         change is read as the daemon reads it (`Source::refresh`: the files that changed, \
         into the state the source keeps); the agent figures come from `tollgate run` \
         itself. Median of {} runs (min, max).\n",
        tollgate_tests::bench_control::SERVICES,
        tollgate_tests::bench_control::NAMESPACES,
        tollgate_tests::bench_control::PODS,
        tollgate_tests::bench_control::CONNECTIONS,
        tollgate_tests::bench_control::LOCAL_PODS,
        args.runs
    )
    .unwrap();
    writeln!(md, "| what | median | min | max | unit | goal |").unwrap();
    writeln!(md, "|---|---:|---:|---:|---|---|").unwrap();
    for f in control {
        writeln!(
            md,
            "| {} | {:.2} | {:.2} | {:.2} | {} | {} |",
            f.what,
            f.median,
            f.min,
            f.max,
            f.unit,
            control_goal(&f.what, f.median)
        )
        .unwrap();
    }
}
