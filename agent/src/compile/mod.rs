//! The policy compiler: desired state in, map entries out. Pure and deterministic, so the
//! agent and `tollgate check` share it and it is tested without a kernel.
//!
//! `model` holds the validated cluster, `policy` applies NetworkPolicy semantics per pod,
//! `rules` turns allow rules into map entries, `eval` runs the datapath's decision over
//! those entries offline, `explain` says why a flow is denied and what would allow it,
//! `advise` writes policies from observed traffic and proves they allow it.

pub mod advise;
pub mod eval;
pub mod explain;
pub mod model;
pub mod policy;
pub mod rules;
pub mod services;

pub use rules::{
    AllowRule, CidrSetIds, Peer, PortMatch, RuleError, RulesetEntries, compile_ruleset,
};
