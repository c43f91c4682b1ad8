//! Every byte that crosses the kernel boundary, defined once.
//!
//! The kernel programs (`agent-ebpf`) and the agent (`tollgate`) both use these types as BPF
//! map keys and values, so each one is `#[repr(C)]` with explicit padding and a size check.
//! With the `user` feature the types implement `aya::Pod`.
#![no_std]

pub mod consts;
pub mod counters;
pub mod dns;
pub mod event;
pub mod flow;
pub mod policy;

pub use consts::*;
pub use counters::*;
pub use dns::*;
pub use event::*;
pub use flow::*;
pub use policy::*;

/// Implements `aya::Pod` for plain-old-data types on the user side.
macro_rules! user_pod {
    ($($t:ty),* $(,)?) => {
        $(
            #[cfg(feature = "user")]
            // SAFETY: the type is #[repr(C)], made only of integers and byte arrays, with all
            // padding spelled out, so every bit pattern is valid.
            unsafe impl aya::Pod for $t {}
        )*
    };
}
pub(crate) use user_pod;
