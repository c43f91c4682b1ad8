//! The policy compiler: desired state in, map entries out. Pure and deterministic, so the
//! agent and `tollgate check` share it and it is tested without a kernel.

pub mod rules;

pub use rules::{
    AllowRule, CidrSetIds, Peer, PortMatch, RuleError, RulesetEntries, compile_ruleset,
};
