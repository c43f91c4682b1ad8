//! Flow events from the kernel's ring buffer.

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    time::{Duration, Instant},
};

use agent_common::FlowEvent;
use aya::maps::{MapData, RingBuf};

/// Reads `FlowEvent`s from the ring buffer.
pub struct EventReader {
    ring: RingBuf<MapData>,
}

impl EventReader {
    pub(crate) fn new(ring: RingBuf<MapData>) -> Self {
        EventReader { ring }
    }

    /// Every event available now.
    pub fn drain(&mut self) -> Vec<FlowEvent> {
        let mut out = Vec::new();
        while let Some(item) = self.ring.next() {
            if item.len() >= size_of::<FlowEvent>() {
                // SAFETY: the kernel wrote a whole FlowEvent; read it unaligned.
                out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<FlowEvent>()) });
            }
        }
        out
    }

    /// Waits up to `timeout` for events, then drains what arrived.
    pub fn wait(&mut self, timeout: Duration) -> Vec<FlowEvent> {
        let deadline = Instant::now() + timeout;
        loop {
            let events = self.drain();
            let left = deadline.saturating_duration_since(Instant::now());
            if !events.is_empty() || left.is_zero() {
                return events;
            }
            let mut pfd = libc::pollfd {
                fd: self.ring.as_fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(1000) as i32) };
        }
    }

    /// The raw file descriptor, for async readiness.
    pub fn as_raw_fd(&self) -> i32 {
        self.ring.as_fd().as_raw_fd()
    }
}
