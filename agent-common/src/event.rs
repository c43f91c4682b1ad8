//! Flow events sent through the ring buffer.

use crate::user_pod;

/// One sampled would-drop or dropped flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    /// The programs' clock (CLOCK_MONOTONIC_COARSE ns, `Config::ns_per_jiffy`) at the packet.
    pub time_ns: u64,
    pub slot: u32,
    /// Identity of the peer (`IDENTITY_WORLD` outside the cluster).
    pub peer_identity: u32,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub family: u8,
    pub direction: u8,
    pub verdict: u8,
    /// Length of the packet (L3).
    pub len: u32,
    /// Workload policy epoch the decision was taken at.
    pub epoch: u32,
}
const _: () = assert!(core::mem::size_of::<FlowEvent>() == 64);

/// Per-workload token bucket (GCRA): the theoretical arrival time of the next event.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventBucket {
    pub tat_ns: u64,
    /// Events the bucket suppressed for this workload.
    pub suppressed: u64,
}
const _: () = assert!(core::mem::size_of::<EventBucket>() == 16);

user_pod!(FlowEvent, EventBucket);
