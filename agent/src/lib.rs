//! Tollgate: per-workload eBPF packet accounting, dry-run and enforced network policy.
//!
//! Library side of the `tollgate` binary. Dependencies flow one way: `datapath` drives
//! `attach` and `maps`; `maps` writes what `compile` produces.

pub mod admin;
pub mod attach;
pub mod cli;
pub mod compile;
pub mod controller;
pub mod daemon;
pub mod datapath;
pub mod dns;
pub mod flowlog;
pub mod flows;
pub mod graph;
pub mod maps;
pub mod metrics;
pub mod pins;
pub mod prometheus;
pub mod reconcile;
pub mod recorder;
pub mod sources;
pub mod sys;

pub use datapath::{Datapath, DatapathError, DatapathOptions};
pub use maps::{Mode, WorkloadPolicy};
