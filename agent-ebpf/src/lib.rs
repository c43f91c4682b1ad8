#![no_std]
//! Library target so cargo can track the kernel crate as a build dependency of the agent;
//! the programs are in the `agent-ebpf` binary target.
