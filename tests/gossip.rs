//! The gossip core on an in-memory network with emulated latencies: joins,
//! coordinates converging from direct-probe RTTs, failure detection, and
//! malformed datagrams dropped and counted. (The agent's UDP driver and the
//! simulator's `--protocol gossip` build on the same event loop.)

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use foca::Timer;
use proptest::prelude::*;
use tomo::dataset::{GeoOptions, Synthetic, generate};
use tomo::gossip::{Event, Gossip, GossipConfig, Id, Output, decode};

enum Ev {
    Deliver {
        to: usize,
        from: SocketAddr,
        bytes: Vec<u8>,
    },
    Timer {
        node: usize,
        timer: Timer<Id>,
    },
}

/// A discrete-event network: one-way delay = RTT / 2 from a matrix.
struct Net {
    nodes: Vec<Gossip>,
    addrs: Vec<SocketAddr>,
    rtt_ms: Vec<Vec<f64>>,
    alive: Vec<bool>,
    queue: BinaryHeap<Reverse<(Duration, u64)>>,
    events: HashMap<u64, Ev>,
    seq: u64,
    now: Duration,
    downs: Vec<(usize, Id)>,
}

impl Net {
    fn new(n: usize) -> Net {
        let mut m = generate(Synthetic::Geo, n, 5, &GeoOptions::default())
            .unwrap()
            .matrix;
        m.symmetrize();
        let rtt_ms = (0..n)
            .map(|i| (0..n).map(|j| m.at(i, j)).collect())
            .collect();
        let addrs: Vec<SocketAddr> = (0..n)
            .map(|i| format!("127.0.0.1:{}", 7000 + i).parse().unwrap())
            .collect();
        let nodes = (0..n)
            .map(|i| {
                let id = Id {
                    name: format!("node-{i}"),
                    addr: addrs[i],
                    bump: 0,
                    server: None,
                };
                Gossip::new(id, GossipConfig::lan(n as u32), i as u64 + 1).unwrap()
            })
            .collect();
        Net {
            nodes,
            addrs,
            rtt_ms,
            alive: vec![true; n],
            queue: BinaryHeap::new(),
            events: HashMap::new(),
            seq: 0,
            now: Duration::ZERO,
            downs: Vec::new(),
        }
    }

    fn push(&mut self, at: Duration, ev: Ev) {
        self.seq += 1;
        self.events.insert(self.seq, ev);
        self.queue.push(Reverse((at, self.seq)));
    }

    fn apply(&mut self, node: usize, outs: Vec<Output>) {
        for o in outs {
            match o {
                Output::Send { to, bytes } => {
                    let Some(dst) = self.addrs.iter().position(|a| *a == to) else {
                        continue;
                    };
                    let delay = Duration::from_secs_f64(self.rtt_ms[node][dst] / 2000.0);
                    let from = self.addrs[node];
                    self.push(
                        self.now + delay,
                        Ev::Deliver {
                            to: dst,
                            from,
                            bytes,
                        },
                    );
                }
                Output::Timer { at, timer } => self.push(at, Ev::Timer { node, timer }),
                Output::Event(Event::MemberDown(id)) => self.downs.push((node, id)),
                Output::Event(_) => {}
            }
        }
    }

    fn run_until(&mut self, end: Duration) {
        while let Some(Reverse((at, seq))) = self.queue.peek().copied() {
            if at > end {
                break;
            }
            self.queue.pop();
            self.now = at;
            let ev = self.events.remove(&seq).unwrap();
            match ev {
                Ev::Deliver { to, from, bytes } => {
                    let sender_alive = self
                        .addrs
                        .iter()
                        .position(|a| *a == from)
                        .is_some_and(|i| self.alive[i]);
                    if self.alive[to] && sender_alive {
                        let outs = self.nodes[to].handle_datagram(at, from, &bytes);
                        self.apply(to, outs);
                    }
                }
                Ev::Timer { node, timer } => {
                    if self.alive[node] {
                        let outs = self.nodes[node].handle_timer(at, timer);
                        self.apply(node, outs);
                    }
                }
            }
        }
        self.now = end;
    }

    /// Median relative error of the live nodes' published coordinates.
    fn median_rel_err(&self) -> f64 {
        let live: Vec<usize> = (0..self.nodes.len()).filter(|i| self.alive[*i]).collect();
        let mut errs = Vec::new();
        for (a, &i) in live.iter().enumerate() {
            for &j in &live[a + 1..] {
                let est = self.nodes[i]
                    .engine()
                    .published()
                    .distance_to(self.nodes[j].engine().published())
                    * 1000.0;
                let act = self.rtt_ms[i][j];
                errs.push((est - act).abs() / act);
            }
        }
        errs.sort_by(f64::total_cmp);
        errs[errs.len() / 2]
    }
}

#[test]
fn cluster_joins_converges_and_detects_a_failure() {
    let n = 5;
    let mut net = Net::new(n);
    for i in 1..n {
        let outs = net.nodes[i].announce(Duration::ZERO, net.addrs[0]);
        net.apply(i, outs);
    }
    net.run_until(Duration::from_secs(300));
    for (i, g) in net.nodes.iter().enumerate() {
        assert_eq!(
            g.members().count(),
            n - 1,
            "node {i} sees {:?}",
            g.members().collect::<Vec<_>>()
        );
        // Every member's coordinate is in every table.
        assert_eq!(g.table_len(), n, "node {i} table");
        let s = g.stats();
        assert!(s.rtt_samples > 100, "node {i}: {s:?}");
        assert_eq!(
            s.dropped_payload + s.dropped_truncated + s.dropped_coordinate,
            0,
            "{s:?}"
        );
    }
    let err = net.median_rel_err();
    eprintln!(
        "median relative error {err:.4}; node 0 stats {:?}",
        net.nodes[0].stats()
    );
    assert!(err <= 0.15, "median relative error {err}");

    // Kill node 4: everyone else declares it down.
    net.alive[4] = false;
    net.run_until(Duration::from_secs(360));
    for i in 0..4 {
        assert!(
            net.downs
                .iter()
                .any(|(k, id)| *k == i && id.name == "node-4"),
            "node {i} did not see node-4 fail: {:?}",
            net.downs
        );
        assert_eq!(net.nodes[i].members().count(), 3);
        assert!(
            net.nodes[i].table_entry("node-4").is_none(),
            "node {i} kept node-4's coordinate"
        );
    }
}

#[test]
fn malformed_datagrams_are_dropped_and_counted() {
    let mut net = Net::new(2);
    let from = net.addrs[1];
    let g = &mut net.nodes[0];
    let now = Duration::ZERO;
    const V: u8 = tomo::gossip::ENVELOPE_VERSION;
    assert!(g.handle_datagram(now, from, &[]).is_empty());
    assert!(
        g.handle_datagram(now, from, &[9, 0, 0, 0, 0, 0, 0, 0])
            .is_empty()
    );
    assert!(g.handle_datagram(now, from, &vec![V; 2000]).is_empty());
    // A valid envelope (no coordinate, no entries) around garbage.
    assert!(
        g.handle_datagram(now, from, &[V, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xfe])
            .is_empty()
    );
    // A coordinate of all-ones bits: NaN.
    let mut nan = vec![V, 1, 8];
    nan.extend(std::iter::repeat_n(0xffu8, 4 * 11 + 4 + 1));
    assert!(g.handle_datagram(now, from, &nan).is_empty());
    let s = g.stats();
    assert_eq!(s.dropped_truncated, 1);
    assert_eq!(s.dropped_version, 1);
    assert_eq!(s.dropped_oversized, 1);
    assert_eq!(s.dropped_payload, 1);
    assert_eq!(s.dropped_coordinate, 1);
    assert_eq!(s.datagrams_in, 0);
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1600)) {
        let _ = decode(&bytes);
        let mut net = Net::new(2);
        let from = net.addrs[1];
        let outs = net.nodes[0].handle_datagram(Duration::from_secs(1), from, &bytes);
        // A datagram that is not a valid envelope never produces output.
        if decode(&bytes).is_err() {
            prop_assert!(outs.is_empty());
        }
    }
}

fn coordinate_strategy() -> impl Strategy<Value = tomo::vivaldi::Coordinate> {
    // Values exact in f32 (the wire format): k / 2^16 seconds.
    let v = || (-60_000i32..60_000).prop_map(|k| k as f64 / 65536.0);
    let pos = || (0i32..60_000).prop_map(|k| k as f64 / 65536.0);
    (proptest::collection::vec(v(), 8), pos(), v(), pos()).prop_map(|(vec, error, adj, height)| {
        tomo::vivaldi::Coordinate {
            vec: vec.into_iter().collect(),
            error,
            adjustment: adj,
            height,
        }
    })
}

proptest! {
    #[test]
    fn envelopes_with_entries_round_trip(
        coord in proptest::option::of(coordinate_strategy()),
        hold_us in any::<u32>(),
        entries in proptest::collection::vec(("[a-z0-9-]{0,40}", any::<u64>(), coordinate_strategy()), 0..6),
        payload in proptest::collection::vec(any::<u8>(), 0..200),
    ) {
        let env = tomo::gossip::Envelope {
            coordinate: coord,
            hold_us,
            entries: entries
                .into_iter()
                .map(|(name, version, coordinate)| tomo::gossip::Entry { name, version, coordinate })
                .collect(),
        };
        let bytes = tomo::gossip::encode(&env, &payload);
        let (back, rest) = decode(&bytes).unwrap();
        prop_assert_eq!(back, env);
        prop_assert_eq!(rest, &payload[..]);
        // Any strict prefix that cuts into the envelope is an error, never a panic.
        let header = bytes.len() - payload.len();
        for cut in 0..header {
            prop_assert!(decode(&bytes[..cut]).is_err());
        }
    }
}

#[test]
fn a_graceful_leave_is_left_and_a_kill_is_failed() {
    let n = 6;
    let mut net = Net::new(n);
    for i in 1..n {
        let outs = net.nodes[i].announce(Duration::ZERO, net.addrs[0]);
        net.apply(i, outs);
    }
    net.run_until(Duration::from_secs(120));
    assert!((0..n).all(|i| net.nodes[i].members().count() == n - 1));
    // node-5 leaves gracefully; node-4 dies at the same moment.
    let outs = net.nodes[5].leave(Duration::from_secs(120));
    assert!(
        outs.iter().any(|o| matches!(o, Output::Send { .. })),
        "the leave sends its news"
    );
    net.apply(5, outs);
    net.run_until(Duration::from_secs(121));
    net.alive[5] = false;
    net.alive[4] = false;
    net.run_until(Duration::from_secs(200));
    for i in 0..4 {
        let g = &net.nodes[i];
        assert_eq!(g.members().count(), 3, "node {i}");
        assert!(g.has_left("node-5"), "node {i} does not know node-5 left");
        assert!(
            !g.has_left("node-4"),
            "node {i} thinks the dead node-4 left"
        );
        assert!(g.table_entry("node-5").is_none());
    }
}
