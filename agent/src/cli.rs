//! Command line: clap commands and exit codes (0 ok, 1 runtime failure, 2 bad usage or
//! bad input). The edge of the program, where `anyhow` lives.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use crate::{Datapath, DatapathOptions, attach, pins};

/// Tollgate: per-workload eBPF packet accounting, dry-run and enforced network policy.
#[derive(Parser, Debug)]
#[command(name = "tollgate", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Evaluate flows offline against a cluster state, with the same compiler and decision
    /// procedure as the datapath; no kernel needed.
    ///
    /// Each input line is `SRC DST PORT/PROTOCOL`, SRC and DST being NAMESPACE/POD or an IP
    /// address, e.g. `x/a y/b 80/tcp` or `x/a 10.0.0.7 443/tcp`. Blank lines and lines
    /// starting with # are skipped. A flow is allowed only when the source's egress and the
    /// destination's ingress both allow it.
    Check {
        /// File or directory of Kubernetes YAML (Namespaces, Pods, NetworkPolicies).
        #[arg(long)]
        cluster_state: std::path::PathBuf,
        /// Flows to evaluate (default: standard input).
        #[arg(long)]
        flows: Option<std::path::PathBuf>,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Text)]
        output: Output,
        /// For NAMESPACE/POD endpoints, use the pod's IPv6 address where it has one.
        #[arg(long)]
        ipv6: bool,
    },
    /// Load the embedded eBPF programs into this kernel (the verifier checks them), report
    /// how workloads would attach, and remove everything again.
    Selftest {
        /// bpffs directory for the temporary pins.
        #[arg(long, default_value = "/sys/fs/bpf/tollgate-selftest")]
        bpffs: std::path::PathBuf,
    },
}

/// Runs the command line; returns the process exit code.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Selftest { bpffs } => selftest(&bpffs).map(|()| ExitCode::SUCCESS),
        Command::Check {
            cluster_state,
            flows,
            output,
            ipv6,
        } => check(&cluster_state, flows.as_deref(), output, ipv6),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tollgate: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Output formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Text,
    Json,
}

/// One evaluated flow, as `check -o json` prints it.
#[derive(Debug, serde::Serialize)]
pub struct CheckResult {
    pub src: String,
    pub dst: String,
    pub port: u16,
    pub protocol: String,
    pub egress: &'static str,
    pub ingress: &'static str,
    pub verdict: &'static str,
    pub policies: Vec<String>,
}

fn word(allowed: bool) -> &'static str {
    if allowed { "allowed" } else { "denied" }
}

/// Evaluates one `SRC DST PORT/PROTOCOL` line.
pub fn check_line(
    ev: &crate::compile::eval::Evaluator,
    line: &str,
    ipv6: bool,
) -> Result<CheckResult, String> {
    use crate::compile::{eval::endpoint, model::Protocol};
    let fields: Vec<&str> = line.split_whitespace().collect();
    let [src, dst, port_proto] = fields.as_slice() else {
        return Err(format!("expected `SRC DST PORT/PROTOCOL`, got {line:?}"));
    };
    let (port, proto) = port_proto
        .split_once('/')
        .ok_or_else(|| format!("{port_proto:?}: expected PORT/PROTOCOL, e.g. 80/tcp"))?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("{port:?} is not a port (1-65535)"))?;
    let protocol = Protocol::parse(&proto.to_ascii_uppercase())
        .ok_or_else(|| format!("{proto:?} is not tcp, udp or sctp"))?;
    let src_ep = endpoint(ev, src, ipv6)?;
    let dst_ep = endpoint(ev, dst, ipv6)?;
    let (egress, ingress) = ev.flow(src_ep, dst_ep, protocol.number(), port);
    let mut policies = egress.policies.clone();
    for p in &ingress.policies {
        if !policies.contains(p) {
            policies.push(p.clone());
        }
    }
    Ok(CheckResult {
        src: src.to_string(),
        dst: dst.to_string(),
        port,
        protocol: proto.to_ascii_lowercase(),
        egress: word(egress.allowed),
        ingress: word(ingress.allowed),
        verdict: word(egress.allowed && ingress.allowed),
        policies,
    })
}

/// Loads a cluster state and builds the offline evaluator over every pod.
pub fn evaluator_for(
    path: &std::path::Path,
) -> anyhow::Result<(crate::compile::eval::Evaluator, crate::sources::Loaded)> {
    use crate::compile::{eval::Evaluator, policy};
    if !path.exists() {
        anyhow::bail!(
            "cluster state {}: no such file or directory",
            path.display()
        );
    }
    let mut source = crate::sources::FileSource::new(path);
    let loaded = source.load();
    let mut allocator = policy::IdentityAllocator::default();
    let compiled = policy::compile(&loaded.state, &mut allocator, None, crate::maps::Mode::Log);
    let ev = Evaluator::new(compiled)
        .map_err(|((ns, name), e)| anyhow::anyhow!("compiling rules of pod {ns}/{name}: {e}"))?;
    Ok((ev, loaded))
}

fn check(
    cluster_state: &std::path::Path,
    flows: Option<&std::path::Path>,
    output: Output,
    ipv6: bool,
) -> anyhow::Result<ExitCode> {
    use std::io::BufRead as _;
    let (ev, loaded) = match evaluator_for(cluster_state) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("tollgate: {e:#}");
            return Ok(ExitCode::from(2));
        }
    };
    let mut bad_input = false;
    for e in &loaded.errors {
        eprintln!("tollgate: rejected {e}");
        bad_input = true;
    }
    for w in &loaded.warnings {
        eprintln!("tollgate: warning: {w}");
    }
    let reader: Box<dyn std::io::BufRead> = match flows {
        Some(path) => Box::new(std::io::BufReader::new(
            std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?,
        )),
        None => Box::new(std::io::BufReader::new(std::io::stdin())),
    };
    for (n, line) in reader.lines().enumerate() {
        let line = line.context("read flows")?;
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        match check_line(&ev, trimmed, ipv6) {
            Ok(r) => match output {
                Output::Json => println!("{}", serde_json::to_string(&r)?),
                Output::Text => println!(
                    "{} -> {} {}/{}: {} (egress {}, ingress {}){}",
                    r.src,
                    r.dst,
                    r.port,
                    r.protocol,
                    r.verdict,
                    r.egress,
                    r.ingress,
                    if r.policies.is_empty() {
                        String::new()
                    } else {
                        format!(" by {}", r.policies.join(", "))
                    }
                ),
            },
            Err(e) => {
                eprintln!("tollgate: line {}: {e}", n + 1);
                bad_input = true;
            }
        }
    }
    Ok(if bad_input {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

fn selftest(bpffs: &std::path::Path) -> anyhow::Result<()> {
    let datapath =
        Datapath::load(DatapathOptions::new(bpffs)).context("loading the embedded eBPF object")?;
    let ids = datapath.program_ids();
    println!("programs loaded and verified: {} (ids {ids:?})", ids.len());
    println!(
        "tc attach: {}",
        if attach::kernel_has_tcx() {
            "tcx (kernel 6.6+)"
        } else {
            "clsact (kernel without tcx)"
        }
    );
    println!(
        "bpffs: {}",
        if pins::is_bpffs(std::path::Path::new(pins::BPFFS_MOUNT)) {
            "mounted"
        } else {
            "not mounted"
        }
    );
    datapath
        .remove()
        .context("removing the self-test datapath")?;
    println!("removed: nothing left attached or pinned");
    Ok(())
}
