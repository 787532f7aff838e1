//! User-space link emulation: the kernel here has no netem, so the agent
//! delays (or drops) its own outgoing datagrams by a per-destination
//! one-way latency. `tomo demo` and the integration tests use it to give a
//! loopback cluster a real topology's RTTs (one-way = RTT / 2).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::RwLock;
use std::time::Duration;

/// Per-destination delays and drops for one sender.
#[derive(Debug, Default)]
pub struct LinkEmulator {
    delays: RwLock<HashMap<SocketAddr, Duration>>,
    dropped: RwLock<HashSet<SocketAddr>>,
}

impl LinkEmulator {
    /// Delays datagrams to each destination by its one-way latency.
    pub fn with_delays(delays: HashMap<SocketAddr, Duration>) -> Self {
        LinkEmulator {
            delays: RwLock::new(delays),
            dropped: RwLock::new(HashSet::new()),
        }
    }

    /// Sets the one-way delay to `dst`.
    pub fn set_delay(&self, dst: SocketAddr, delay: Duration) {
        self.delays
            .write()
            .expect("not poisoned")
            .insert(dst, delay);
    }

    /// One-way delay to `dst` (zero for unknown destinations), or `None`
    /// when datagrams to `dst` are being dropped.
    pub fn delay_to(&self, dst: SocketAddr) -> Option<Duration> {
        if self.dropped.read().expect("not poisoned").contains(&dst) {
            return None;
        }
        Some(
            self.delays
                .read()
                .expect("not poisoned")
                .get(&dst)
                .copied()
                .unwrap_or_default(),
        )
    }

    /// Starts or stops dropping datagrams to `dst` (an emulated partition).
    pub fn set_dropped(&self, dst: SocketAddr, drop: bool) {
        let mut d = self.dropped.write().expect("not poisoned");
        if drop {
            d.insert(dst);
        } else {
            d.remove(&dst);
        }
    }

    /// Destinations currently dropped.
    pub fn dropped(&self) -> Vec<SocketAddr> {
        self.dropped
            .read()
            .expect("not poisoned")
            .iter()
            .copied()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_and_drops() {
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let l = LinkEmulator::with_delays([(a, Duration::from_millis(30))].into());
        assert_eq!(l.delay_to(a), Some(Duration::from_millis(30)));
        assert_eq!(l.delay_to(b), Some(Duration::ZERO));
        l.set_dropped(a, true);
        assert_eq!(l.delay_to(a), None);
        assert_eq!(l.dropped(), vec![a]);
        l.set_dropped(a, false);
        assert_eq!(l.delay_to(a), Some(Duration::from_millis(30)));
    }
}
