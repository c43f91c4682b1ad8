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
        Command::Selftest { bpffs } => selftest(&bpffs),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tollgate: {e:#}");
            ExitCode::from(1)
        }
    }
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
