//! Connection outcomes from the kernel's ring buffer, read asynchronously: the task sleeps
//! on the ring buffer's fd (epoll through tokio's AsyncFd) until the kernel submits records.

use std::{net::SocketAddr, time::Duration};

use anyhow::Context;
use aya::maps::{MapData, RingBuf};
use circuit_common::{ConnectOutcome, OutcomeEvent, UpstreamKey};
use tokio::io::{Interest, unix::AsyncFd};

use super::socket_addr;
use crate::time::MonoTime;

/// One classified connection attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub upstream: SocketAddr,
    pub outcome: ConnectOutcome,
    /// connect() to outcome; zero when the agent did not see the start.
    pub latency: Duration,
    /// When the kernel observed it (monotonic clock).
    pub observed_at: MonoTime,
    /// The cgroup v2 id of the process that connected; 0 when the connect was not seen.
    pub client_cgroup: u64,
    /// The virtual address the client connected to, when a NAT picked `upstream` for it.
    pub service: Option<SocketAddr>,
}

impl Outcome {
    fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < size_of::<OutcomeEvent>() {
            return None;
        }
        let event: OutcomeEvent = bytemuck::pod_read_unaligned(&bytes[..size_of::<OutcomeEvent>()]);
        Some(Self {
            upstream: socket_addr(&event.upstream),
            outcome: ConnectOutcome::from_u8(event.outcome)?,
            latency: Duration::from_nanos(event.latency_ns),
            observed_at: MonoTime::from_nanos(event.timestamp_ns),
            client_cgroup: event.client,
            service: (event.service != UpstreamKey::new([0; 16], 0))
                .then(|| socket_addr(&event.service)),
        })
    }
}

pub struct OutcomeStream {
    ring: AsyncFd<RingBuf<MapData>>,
}

impl OutcomeStream {
    pub(super) fn new(ring: RingBuf<MapData>) -> anyhow::Result<Self> {
        // SAFETY: the RingBuf owns its map fd and keeps it open, unchanged, for as long as
        // the AsyncFd owns the RingBuf (`next_batch` only reads records through
        // `get_inner_mut`, never replacing it), so `as_raw_fd` keeps returning that fd.
        let ring =
            unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }.map_err(|e| {
                anyhow::anyhow!("cannot register the outcome ring buffer with tokio: {e}")
            })?;
        Ok(Self { ring })
    }

    /// Waits until outcomes are available and appends all of them to `out`. Records that
    /// cannot be decoded (from a newer kernel object, say) are counted in the return value.
    pub async fn next_batch(&mut self, out: &mut Vec<Outcome>) -> anyhow::Result<usize> {
        let mut guard = self
            .ring
            .readable_mut()
            .await
            .context("outcome ring buffer poll failed")?;
        let ring = guard.get_inner_mut();
        let mut undecodable = 0;
        while let Some(item) = ring.next() {
            match Outcome::decode(&item) {
                Some(outcome) => out.push(outcome),
                None => undecodable += 1,
            }
        }
        guard.clear_ready();
        Ok(undecodable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_a_ring_buffer_record() {
        let event = OutcomeEvent {
            timestamp_ns: 5_000,
            latency_ns: 1_500,
            upstream: UpstreamKey::v4([10, 0, 0, 2], 8080),
            outcome: ConnectOutcome::TimedOut as u8,
            _pad: [0; 3],
            client: 7,
            service: UpstreamKey::new([0; 16], 0),
            _pad2: 0,
        };
        let decoded = Outcome::decode(bytemuck::bytes_of(&event)).unwrap();
        assert_eq!(decoded.upstream, "10.0.0.2:8080".parse().unwrap());
        assert_eq!(decoded.service, None, "no NAT");
        let natted = OutcomeEvent {
            service: UpstreamKey::v4([10, 96, 0, 10], 80),
            ..event
        };
        let decoded = Outcome::decode(bytemuck::bytes_of(&natted)).unwrap();
        assert_eq!(decoded.service, Some("10.96.0.10:80".parse().unwrap()));
        assert_eq!(decoded.outcome, ConnectOutcome::TimedOut);
        assert_eq!(decoded.latency, Duration::from_nanos(1_500));
        assert_eq!(decoded.observed_at, MonoTime::from_nanos(5_000));
        assert_eq!(Outcome::decode(&bytemuck::bytes_of(&event)[..39]), None);
        let mut unknown = event;
        unknown.outcome = 99;
        assert_eq!(Outcome::decode(bytemuck::bytes_of(&unknown)), None);
    }
}
