//! SWIM membership (foca) wrapped in tomo's versioned envelope, feeding the
//! coordinate engine with direct-probe RTTs and keeping every member's
//! coordinate in a table. Sans-IO: the caller passes the time and the
//! received bytes in, and gets datagrams to send, timers to arm and
//! membership events out; the agent drives it with UDP sockets and the real
//! clock, the simulator with its event queue.
//!
//! Every datagram is `[envelope][foca message]`. The envelope carries:
//!
//! - the sender's current coordinate, so a prober gets the target's
//!   coordinate with the ack (as serf's ack payload does);
//! - how long the sender held the datagram it answers (subtracted from the
//!   RTT);
//! - a few coordinate-table entries (at most [`ENTRY_BUDGET`] bytes): a
//!   member publishes its coordinate when it moves significantly, and each
//!   node passes every newer entry it learns on in its next few datagrams
//!   (rumors, least-sent first), filling what room is left with entries
//!   of its table taken round-robin (anti-entropy, so a newcomer's table
//!   fills and a missed rumor is repaired). Entries ride on the probes
//!   SWIM sends anyway: the table never costs a datagram of its own and its
//!   bandwidth is bounded whatever the cluster size.
//!
//! RTT samples come only from a direct `Ping(n)` we sent to a member and
//! the `Ack(n)` that member returned: indirect probes and forwarded acks
//! never produce samples.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::Arc;
use std::time::Duration;

use foca::{
    Codec, Config as FocaConfig, Foca, Identity, Message, NoCustomBroadcast, Notification,
    PostcardCodec, Runtime, Timer,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::vivaldi::{self, Coordinate, Node};

/// Version byte of the envelope.
pub const ENVELOPE_VERSION: u8 = 3;
/// Largest datagram sent or accepted, bytes.
pub const MAX_DATAGRAM: usize = 1400;
/// Most coordinate dimensions an envelope may carry.
pub const MAX_DIMENSIONS: usize = 64;
/// Bytes of each datagram set aside for coordinate-table entries: about
/// eight entries of an 8-dimensional coordinate. This caps what
/// disseminating the table costs, whatever the cluster size: a node sends
/// about two datagrams per probe interval (its ping and its ack), so the
/// table costs at most ~1 KB/s per node at 1 s probes, and in steady state
/// much less (see [`RUMOR_ENTRIES_PER_S`]).
pub const ENTRY_BUDGET: usize = 512;
/// Of the entries in one datagram, at most this many are anti-entropy
/// (table entries sent round-robin so a newcomer fills its table); the
/// rest of the budget goes to fresh changes (rumors).
const MAX_ANTI_ENTROPY: usize = 2;

/// What can go wrong decoding a datagram or driving the membership.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GossipError {
    /// Shorter than its header says.
    #[error("truncated datagram")]
    Truncated,
    /// Longer than [`MAX_DATAGRAM`].
    #[error("oversized datagram: {0} bytes")]
    Oversized(usize),
    /// An envelope version this build does not speak.
    #[error("unknown envelope version {0}")]
    Version(u8),
    /// The coordinate has a non-finite field or too many dimensions.
    #[error("invalid coordinate in envelope")]
    BadCoordinate,
    /// foca refused the payload or an operation.
    #[error("membership: {0}")]
    Membership(String),
}

/// A member's identity: its node name and gossip address, plus a counter
/// bumped when it rejoins after being declared down (so the new identity
/// wins over the stale one).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Id {
    /// Node name (Consul's `-node`).
    pub name: String,
    /// Gossip address.
    pub addr: SocketAddr,
    /// Rejoin counter.
    pub bump: u16,
    /// Set on registry servers: how the others reach its Raft member
    /// (Consul's serf tags `role=consul`, `port`, `id`). Servers find each
    /// other through it, and client agents find servers.
    pub server: Option<ServerTag>,
}

/// What a registry server tells the cluster about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ServerTag {
    /// Its Raft node ID.
    pub raft_id: u64,
    /// Its peer RPC port, on the gossip address's IP.
    pub rpc_port: u16,
}

impl Id {
    /// The server's peer RPC address, if this member is a server.
    pub fn rpc_addr(&self) -> Option<SocketAddr> {
        self.server
            .map(|t| SocketAddr::new(self.addr.ip(), t.rpc_port))
    }
}

impl Identity for Id {
    type Addr = SocketAddr;

    fn renew(&self) -> Option<Self> {
        Some(Id {
            bump: self.bump.wrapping_add(1),
            ..self.clone()
        })
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        // Wrapping comparison: the more recent bump wins.
        self.bump.wrapping_sub(adversary.bump) as i16 > 0
    }
}

/// The top bit of an entry's version marks a graceful leave: the member
/// says goodbye (Consul's "left", status 3) rather than being found dead
/// ("failed", status 4), which foca alone cannot tell apart. Versions are
/// microseconds since the epoch, far below it.
pub const LEFT: u64 = 1 << 63;

/// One member's published coordinate as it travels between tables.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// The member's node name.
    pub name: String,
    /// Its publication version (larger is newer; set by the member), with
    /// [`LEFT`] set in the entry a member sends as it leaves.
    pub version: u64,
    /// The published coordinate.
    pub coordinate: Coordinate,
}

/// The decoded envelope of a datagram.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    /// The sender's current coordinate, when it has one to share.
    pub coordinate: Option<Coordinate>,
    /// Microseconds the sender held the datagram this one answers.
    pub hold_us: u32,
    /// Coordinate-table entries piggybacked on this datagram (all of the
    /// envelope's dimension).
    pub entries: Vec<Entry>,
}

const FLAG_COORDINATE: u8 = 1;

/// Wire size of `dim + 3` f32s.
const fn coordinate_len(dim: usize) -> usize {
    4 * (dim + 3)
}

/// Wire size of an entry.
fn entry_len(name: &str, dim: usize) -> usize {
    1 + name.len() + 8 + coordinate_len(dim)
}

/// Envelope bytes before the entries: version, flags, dim, coordinate,
/// hold time, entry count.
pub const fn envelope_header_len(dim: usize) -> usize {
    3 + coordinate_len(dim) + 4 + 1
}

fn put_coordinate(out: &mut Vec<u8>, c: &Coordinate) {
    // f32 on the wire: 24 bits of mantissa are nanoseconds on coordinates
    // of seconds, far below what any RTT sample resolves, and halve what
    // every datagram spends on coordinates.
    for v in c.vec.iter().chain([&c.error, &c.adjustment, &c.height]) {
        out.extend_from_slice(&(*v as f32).to_le_bytes());
    }
}

/// Encodes `[version][flags][dim][coordinate…][hold_us][n][entries…][payload]`,
/// each entry `[name len u8][name][version u64][coordinate…]`, coordinates
/// as `dim + 3` little-endian f32s (vector, error, adjustment, height).
/// Entries whose name is over 255 bytes or whose dimension differs from
/// the envelope's are left out.
pub fn encode(env: &Envelope, payload: &[u8]) -> Vec<u8> {
    let dim = env
        .coordinate
        .as_ref()
        .or(env.entries.first().map(|e| &e.coordinate))
        .map_or(0, |c| c.vec.len());
    let mut out = Vec::with_capacity(
        envelope_header_len(dim)
            + env
                .entries
                .iter()
                .map(|e| entry_len(&e.name, dim))
                .sum::<usize>()
            + payload.len(),
    );
    out.push(ENVELOPE_VERSION);
    out.push(if env.coordinate.is_some() {
        FLAG_COORDINATE
    } else {
        0
    });
    out.push(dim as u8);
    if let Some(c) = &env.coordinate {
        put_coordinate(&mut out, c);
    }
    out.extend_from_slice(&env.hold_us.to_le_bytes());
    let count_at = out.len();
    out.push(0);
    let mut count = 0u8;
    for e in &env.entries {
        if e.name.len() > u8::MAX as usize || e.coordinate.vec.len() != dim || count == u8::MAX {
            continue;
        }
        out.push(e.name.len() as u8);
        out.extend_from_slice(e.name.as_bytes());
        out.extend_from_slice(&e.version.to_le_bytes());
        put_coordinate(&mut out, &e.coordinate);
        count += 1;
    }
    out[count_at] = count;
    out.extend_from_slice(payload);
    out
}

/// Rewrites the hold time of an encoded datagram in place (the driver knows
/// how long it really held the datagram it answers: the time between
/// reading the request and sending the reply). Returns false if `bytes`
/// is not an envelope.
pub fn set_hold(bytes: &mut [u8], hold_us: u32) -> bool {
    let [version, flags, dim, ..] = *bytes else {
        return false;
    };
    if version != ENVELOPE_VERSION {
        return false;
    }
    let at = 3 + if flags & FLAG_COORDINATE != 0 {
        coordinate_len(dim as usize)
    } else {
        0
    };
    match bytes.get_mut(at..at + 4) {
        Some(slot) => {
            slot.copy_from_slice(&hold_us.to_le_bytes());
            true
        }
        None => false,
    }
}

/// A coordinate's dimension count as it appears on the wire.
fn check_dim(dim: u8) -> Result<usize, GossipError> {
    let dim = dim as usize;
    if dim == 0 || dim > MAX_DIMENSIONS {
        return Err(GossipError::BadCoordinate);
    }
    Ok(dim)
}

/// Reads `dim + 3` little-endian f32s (vector, error, adjustment, height)
/// as a coordinate, refusing non-finite or negative error/height values.
fn read_coordinate(dim: usize, raw: &[u8]) -> Result<Coordinate, GossipError> {
    if raw.len() != coordinate_len(dim) {
        return Err(GossipError::Truncated);
    }
    let f = |k: usize| {
        f64::from(f32::from_le_bytes(
            raw[4 * k..4 * k + 4].try_into().expect("4 bytes"),
        ))
    };
    let c = Coordinate {
        vec: (0..dim).map(f).collect(),
        error: f(dim),
        adjustment: f(dim + 1),
        height: f(dim + 2),
    };
    if !c.is_valid() || c.height < 0.0 || c.error < 0.0 {
        return Err(GossipError::BadCoordinate);
    }
    Ok(c)
}

/// Decodes a datagram into its envelope and foca payload. Never panics;
/// every malformed input is an error.
pub fn decode(bytes: &[u8]) -> Result<(Envelope, &[u8]), GossipError> {
    if bytes.len() > MAX_DATAGRAM {
        return Err(GossipError::Oversized(bytes.len()));
    }
    let [version, flags, dim, rest @ ..] = bytes else {
        return Err(GossipError::Truncated);
    };
    if *version != ENVELOPE_VERSION {
        return Err(GossipError::Version(*version));
    }
    let mut rest = rest;
    let mut take = |n: usize| -> Result<&[u8], GossipError> {
        if rest.len() < n {
            return Err(GossipError::Truncated);
        }
        let (a, b) = rest.split_at(n);
        rest = b;
        Ok(a)
    };
    let coordinate = if flags & FLAG_COORDINATE != 0 {
        let dim = check_dim(*dim)?;
        Some(read_coordinate(dim, take(coordinate_len(dim))?)?)
    } else {
        None
    };
    let hold_us = u32::from_le_bytes(take(4)?.try_into().expect("4 bytes"));
    let count = take(1)?[0] as usize;
    let mut entries = Vec::with_capacity(count);
    if count > 0 {
        let dim = check_dim(*dim)?;
        for _ in 0..count {
            let len = take(1)?[0] as usize;
            let name = std::str::from_utf8(take(len)?)
                .map_err(|_| GossipError::Truncated)?
                .to_string();
            let version = u64::from_le_bytes(take(8)?.try_into().expect("8 bytes"));
            let coordinate = read_coordinate(dim, take(coordinate_len(dim))?)?;
            entries.push(Entry {
                name,
                version,
                coordinate,
            });
        }
    }
    Ok((
        Envelope {
            coordinate,
            hold_us,
            entries,
        },
        rest,
    ))
}

/// Parameters of a gossip node.
#[derive(Debug, Clone)]
pub struct GossipConfig {
    /// foca's SWIM parameters (probe period, suspicion, packet size…).
    pub foca: FocaConfig,
    /// The coordinate engine's parameters.
    pub engine: vivaldi::Config,
    /// How many datagrams carry each fresh coordinate-table change onward
    /// from every node that learns it (a push epidemic: a node misses a
    /// change with probability about e^-n, and anti-entropy repairs the
    /// rest).
    pub rumor_transmissions: u8,
    /// Added to the node's clock to version its coordinate publications.
    /// The agent passes the wall-clock time it started, so a restarted
    /// agent's versions are newer than its previous life's; the simulator
    /// runs every life on one clock and passes zero.
    pub epoch: Duration,
    /// Keep RTT distributions (p50/p99) of the members this node probes
    /// ([`crate::tomography`]). The agent does (its `/v1/rtt`); the
    /// simulator's thousands of nodes leave it off.
    pub tomography: Option<crate::tomography::TomographyConfig>,
}

impl GossipConfig {
    /// LAN defaults (1 s probes) for an expected cluster size, with the
    /// packet size shrunk by the envelope.
    pub fn lan(cluster_size: u32) -> Self {
        let mut foca = FocaConfig::new_lan(NonZeroU32::new(cluster_size.max(1)).expect("non-zero"));
        // foca's suspicion lasts 4·log10(n) probe periods, fixed: 6 s at 30
        // members. memberlist's Lifeguard starts a lone suspicion at six
        // times that and shortens it as others confirm; foca has no
        // confirmations, so small clusters get a floor instead: a member
        // wrongly suspected by one slow node (its acks come late) needs the
        // time to hear of it and refute.
        foca.suspect_to_down_after = foca.suspect_to_down_after.max(SUSPICION_MIN);
        // Three: a push epidemic where every node passes a change on three
        // times reaches ~95% of the cluster (1 − e⁻³); anti-entropy repairs
        // the rest. foca sends membership changes 4·log10 n times (14 at
        // 5,000 members), but a missed membership change is not repaired,
        // and the table's bandwidth is what limits its freshness.
        let rumor_transmissions = 3;
        let mut g = GossipConfig {
            foca,
            engine: vivaldi::Config::tomo(),
            rumor_transmissions,
            epoch: Duration::ZERO,
            tomography: None,
        };
        g.fit_packet();
        g
    }

    /// Shrinks foca's packet size so that foca's message, the envelope and
    /// [`ENTRY_BUDGET`] bytes of entries fit in [`MAX_DATAGRAM`]. Call it
    /// again after changing the engine's dimensionality.
    pub fn fit_packet(&mut self) {
        let room = MAX_DATAGRAM
            .saturating_sub(envelope_header_len(self.engine.dimensionality) + ENTRY_BUDGET)
            .max(256);
        self.foca.max_packet_size = NonZeroUsize::new(room).expect("non-zero");
    }
}

/// What the driver must do after a call.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Send these bytes to this address.
    Send {
        /// Destination.
        to: SocketAddr,
        /// The datagram.
        bytes: Vec<u8>,
    },
    /// Call [`Gossip::handle_timer`] with this timer at this time.
    Timer {
        /// When.
        at: Duration,
        /// What.
        timer: Timer<Id>,
    },
    /// Something happened to the membership.
    Event(Event),
}

/// Membership events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A member is up (joined, or back).
    MemberUp(Id),
    /// A member is down (failed or left).
    MemberDown(Id),
    /// This node was declared down and rejoined under a new identity.
    Rejoined(Id),
    /// This node knows no other member.
    Idle,
    /// This node knows at least one other member again.
    Active,
}

/// Counters a gossip node keeps about itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct GossipStats {
    /// Datagrams accepted.
    pub datagrams_in: u64,
    /// Bytes of accepted datagrams.
    pub bytes_in: u64,
    /// Datagrams sent.
    pub datagrams_out: u64,
    /// Bytes sent.
    pub bytes_out: u64,
    /// Datagrams dropped: shorter than their header.
    pub dropped_truncated: u64,
    /// Datagrams dropped: over [`MAX_DATAGRAM`].
    pub dropped_oversized: u64,
    /// Datagrams dropped: unknown envelope version.
    pub dropped_version: u64,
    /// Datagrams dropped: invalid coordinate.
    pub dropped_coordinate: u64,
    /// Datagrams dropped: foca could not decode or refused the payload.
    pub dropped_payload: u64,
    /// `TurnUndead` messages dropped as stale (see
    /// [`Gossip::handle_datagram`]).
    pub dropped_turn_undead: u64,
    /// RTT samples fed to the engine.
    pub rtt_samples: u64,
    /// Samples the engine rejected.
    pub rtt_rejected: u64,
    /// Table entries received that were newer than ours.
    pub entries_applied: u64,
    /// Table entries received that we already had (or older).
    pub entries_stale: u64,
    /// Table entries about nodes that are not (or not yet) members.
    pub entries_unknown: u64,
    /// Our own coordinate publications.
    pub publications: u64,
}

/// A member's last known coordinate.
#[derive(Debug, Clone, PartialEq)]
pub struct TableEntry {
    /// The coordinate.
    pub coordinate: Coordinate,
    /// Its publication version (see [`Entry::version`]).
    pub version: u64,
    /// When it was received (the caller's clock).
    pub updated: Duration,
}

/// Every member's published coordinate. Entries live in a vector (the
/// anti-entropy sweep walks it with a cursor, no copies) indexed by name;
/// names are shared with the rumor queue. At thousands of members every
/// node holds thousands of entries, so the layout matters: the simulator
/// holds n² of them.
#[derive(Default)]
struct Table {
    slots: Vec<(Arc<str>, TableEntry)>,
    index: HashMap<Arc<str>, usize>,
    /// Next slot the anti-entropy sweep sends.
    cursor: usize,
    /// Bumped by every insert and removal (what a blocking query on the
    /// coordinate endpoints waits for).
    version: u64,
}

impl Table {
    fn get(&self, name: &str) -> Option<&TableEntry> {
        self.index.get(name).map(|&i| &self.slots[i].1)
    }

    /// Inserts or replaces `name`'s entry; returns the shared name.
    fn insert(&mut self, name: &str, e: TableEntry) -> Arc<str> {
        self.version += 1;
        if let Some(&i) = self.index.get(name) {
            self.slots[i].1 = e;
            return self.slots[i].0.clone();
        }
        let name: Arc<str> = Arc::from(name);
        self.index.insert(name.clone(), self.slots.len());
        self.slots.push((name.clone(), e));
        name
    }

    fn remove(&mut self, name: &str) {
        let Some(i) = self.index.remove(name) else {
            return;
        };
        self.version += 1;
        self.slots.swap_remove(i);
        if let Some((moved, _)) = self.slots.get(i) {
            self.index.insert(moved.clone(), i);
        }
    }

    fn len(&self) -> usize {
        self.slots.len()
    }

    /// The next entry of the round-robin sweep, without advancing.
    fn peek_sweep(&mut self) -> Option<&(Arc<str>, TableEntry)> {
        if self.cursor >= self.slots.len() {
            self.cursor = 0;
        }
        self.slots.get(self.cursor)
    }
}

/// Fresh table changes waiting to be piggybacked, each sent a bounded
/// number of times, the least-sent first (as foca's own update queue). A
/// rumor is a name: what is sent is the table's entry for it at that time
/// (so a newer version simply replaces the older in flight), or the
/// member's goodbye.
#[derive(Default)]
struct Rumors {
    /// name → (transmissions left, generation).
    items: HashMap<Arc<str>, (u8, u32)>,
    /// `buckets[k]`: names with `k` transmissions left, oldest first,
    /// tagged with the generation they were queued under (stale tags are
    /// skipped: cheaper than removing from the middle).
    buckets: Vec<VecDeque<(Arc<str>, u32)>>,
}

impl Rumors {
    fn new(transmissions: u8) -> Self {
        Rumors {
            items: HashMap::new(),
            buckets: (0..=transmissions).map(|_| VecDeque::new()).collect(),
        }
    }

    /// Queues `name` (again) with every transmission ahead of it: first in
    /// line if `urgent`, else last among the unsent.
    fn push(&mut self, name: Arc<str>, urgent: bool) {
        let top = (self.buckets.len() - 1) as u8;
        let generation = self.items.get(&name).map_or(0, |x| x.1.wrapping_add(1));
        let tag = (name.clone(), generation);
        if urgent {
            self.buckets[top as usize].push_front(tag);
        } else {
            self.buckets[top as usize].push_back(tag);
        }
        self.items.insert(name, (top, generation));
    }

    fn remove(&mut self, name: &str) {
        self.items.remove(name);
    }

    fn len(&self) -> usize {
        self.items.len()
    }

    /// Takes the most-wanted changes (at most `max` in `out`) that fit in
    /// `budget` bytes, counting
    /// one transmission for each; `entry` turns a name into what to send
    /// (`None`: nothing any more, the rumor is dropped).
    fn take(
        &mut self,
        budget: &mut usize,
        max: usize,
        dim: usize,
        mut entry: impl FnMut(&Arc<str>) -> Option<Entry>,
        out: &mut Vec<Entry>,
    ) {
        let mut demoted = Vec::new();
        'levels: for level in (1..self.buckets.len()).rev() {
            while let Some((name, generation)) = self.buckets[level].pop_front() {
                let Some((left, g)) = self.items.get_mut(&name) else {
                    continue;
                };
                if *g != generation || *left as usize != level {
                    continue;
                }
                let len = entry_len(&name, dim);
                if len > *budget || out.len() >= max {
                    self.buckets[level].push_front((name, generation));
                    break 'levels;
                }
                let Some(e) = entry(&name) else {
                    self.items.remove(&name);
                    continue;
                };
                *budget -= len;
                out.push(e);
                *left -= 1;
                *g = g.wrapping_add(1);
                if *left == 0 {
                    self.items.remove(&name);
                } else {
                    demoted.push((*left as usize, name, g.to_owned()));
                }
            }
        }
        for (level, name, generation) in demoted {
            self.buckets[level].push_back((name, generation));
        }
    }
}

/// One node's gossip state: membership, the coordinate engine and the
/// table of every member's coordinate.
pub struct Gossip {
    foca: Foca<Id, PostcardCodec, ChaCha8Rng, NoCustomBroadcast>,
    engine: Node<String>,
    /// RTT distributions of the members this node probed (when on).
    tomography: Option<crate::tomography::Tomography<String>>,
    /// Pings sent and not yet acked: (target address, probe number) → when.
    pending: HashMap<(SocketAddr, u8), Duration>,
    /// Every member's published coordinate, ours included.
    table: Table,
    /// Live members by name (from foca's notifications): a table entry is
    /// only accepted for one of them, so a departed node is not resurrected
    /// by a stale entry still travelling.
    live: HashMap<String, Id>,
    /// Fresh table changes to piggyback.
    rumors: Rumors,
    /// Members that left gracefully (until they come back up), with the
    /// goodbye we pass on.
    left: HashMap<Arc<str>, Entry>,
    /// Anti-entropy over `left`: which goodbye goes out next.
    left_cursor: usize,
    /// We are leaving: publish nothing more.
    leaving: bool,
    /// Our last publication: when, and the coordinate.
    last_publish: Option<(Duration, Coordinate)>,
    /// Our incarnation as last seen on our own headers, and when it last
    /// went up (we refuted a suspicion).
    incarnation: u16,
    refuted_at: Option<Duration>,
    /// Publication allowance (a token bucket of [`PUBLISH_BURST`] filled at
    /// one per [`Gossip::publish_interval`]) and when it was last filled.
    publish_tokens: (f64, Duration),
    /// Entry allowance (a token bucket of [`ENTRY_BURST`] filled at
    /// [`ENTRY_RATE`] per second) and when it was last filled.
    entry_tokens: (f64, Duration),
    /// Our publications: (version, when), oldest first.
    publications: Vec<(u64, Duration)>,
    epoch: Duration,
    rumor_transmissions: u8,
    probe_period: Duration,
    /// How long after refuting a suspicion a `TurnUndead` is taken for
    /// foca's stale courtesy message (see [`Gossip::handle_datagram`]).
    suspicion_window: Duration,
    stats: GossipStats,
    rng: ChaCha8Rng,
}

/// Collects foca's callbacks for one call; datagrams get their envelope
/// in [`Gossip::finish`].
struct Collect {
    now: Duration,
    out: Vec<Output>,
    /// Indices in `out` of the datagrams that are acks: only they carry
    /// our coordinate (the prober's engine needs it; nobody else reads it).
    acks_out: Vec<usize>,
    /// Highest incarnation of ours seen on an outgoing header.
    incarnation: u16,
    sent_pings: Vec<(SocketAddr, u8)>,
    acks: Vec<(SocketAddr, u8, String)>,
}

impl Runtime<Id> for Collect {
    fn notify(&mut self, n: Notification<'_, Id>) {
        match n {
            Notification::MemberUp(id) => self.out.push(Output::Event(Event::MemberUp(id.clone()))),
            Notification::MemberDown(id) => {
                self.out.push(Output::Event(Event::MemberDown(id.clone())))
            }
            Notification::Rejoin(id) => self.out.push(Output::Event(Event::Rejoined(id.clone()))),
            Notification::Idle => self.out.push(Output::Event(Event::Idle)),
            Notification::Active => self.out.push(Output::Event(Event::Active)),
            Notification::DataSent(h) => {
                self.incarnation = self.incarnation.max(h.src_incarnation);
                match h.message {
                    Message::Ping(n) => self.sent_pings.push((h.dst.addr, n)),
                    // foca notifies right after `send_to`: the ack is the
                    // last datagram out.
                    Message::Ack(_) if matches!(self.out.last(), Some(Output::Send { .. })) => {
                        self.acks_out.push(self.out.len() - 1)
                    }
                    _ => {}
                }
            }
            Notification::DataReceived(h) => {
                if let Message::Ack(n) = h.message {
                    self.acks.push((h.src.addr, n, h.src.name.clone()));
                }
            }
            _ => {}
        }
    }

    fn send_to(&mut self, to: Id, data: &[u8]) {
        self.out.push(Output::Send {
            to: to.addr,
            bytes: data.to_vec(),
        });
    }

    fn submit_after(&mut self, timer: Timer<Id>, after: Duration) {
        self.out.push(Output::Timer {
            at: self.now + after,
            timer,
        });
    }
}

/// A member publishes its coordinate when it has moved by this fraction of
/// its distance from the origin (at least [`PUBLISH_MOVE_MIN`]):
/// "significant change" for consumers.
const PUBLISH_MOVE: f64 = 0.05;
/// …and at least this far, seconds.
const PUBLISH_MOVE_MIN: f64 = 0.5e-3;

/// What publications may cost each node, in entries sent per second on
/// average (about 600 B/s), out of [`ENTRY_RATE`]; the rest is
/// anti-entropy and slack for bursts.
pub const RUMOR_ENTRIES_PER_S: f64 = 10.0;
/// The shortest suspicion at 1 s probes (scaled with the probe period).
pub const SUSPICION_MIN: Duration = Duration::from_secs(10);

/// Entries a node sends per second at most (rumors and anti-entropy).
/// At ~63 bytes an entry (8 dimensions, a short name), about 1 KB/s: with
/// SWIM's own ~0.3 KB/s, a node stays under 2 KB/s whatever the cluster
/// size.
pub const ENTRY_RATE: f64 = 16.0;
/// Entries a node may save up for one datagram.
const ENTRY_BURST: f64 = 8.0;
/// Publications a node may make back to back (at the floor interval)
/// before the cluster-size interval applies: coordinates move most while
/// a node converges.
const PUBLISH_BURST: f64 = 2.0;
/// RTT samples before a node's first publication: 5, plus one per 50
/// members, at most 50. A coordinate after a handful of samples is mostly
/// noise, and in a large cluster every publication is expensive.
fn first_publication_samples(members: usize) -> u64 {
    (5 + members / 50).min(50) as u64
}
/// The shortest publication interval, in probe periods.
const PUBLISH_INTERVALS_MIN: f64 = 5.0;

/// Pings older than this are forgotten (their ack is not coming).
const PENDING_TTL: Duration = Duration::from_secs(30);

impl Gossip {
    /// A node with identity `id`, seeded randomness and configuration.
    pub fn new(id: Id, cfg: GossipConfig, seed: u64) -> Result<Self, GossipError> {
        let foca = Foca::new(
            id,
            cfg.foca.clone(),
            ChaCha8Rng::seed_from_u64(seed),
            PostcardCodec,
        );
        let engine = Node::new(cfg.engine).map_err(|e| GossipError::Membership(e.to_string()))?;
        Ok(Gossip {
            foca,
            engine,
            tomography: cfg.tomography.map(crate::tomography::Tomography::new),
            pending: HashMap::new(),
            table: Table::default(),
            live: HashMap::new(),
            rumors: Rumors::new(cfg.rumor_transmissions.max(1)),
            left: HashMap::new(),
            left_cursor: 0,
            leaving: false,
            last_publish: None,
            incarnation: 0,
            refuted_at: None,
            suspicion_window: cfg.foca.suspect_to_down_after + 2 * cfg.foca.probe_period,
            publish_tokens: (1.0, Duration::ZERO),
            entry_tokens: (ENTRY_BURST, Duration::ZERO),
            publications: Vec::new(),
            epoch: cfg.epoch,
            rumor_transmissions: cfg.rumor_transmissions.max(1),
            probe_period: cfg.foca.probe_period,
            stats: GossipStats::default(),
            rng: ChaCha8Rng::seed_from_u64(seed ^ 0xC00D),
        })
    }

    /// The RTT distributions of the members this node probed (`None`
    /// unless [`GossipConfig::tomography`] is set).
    pub fn tomography(&self) -> Option<&crate::tomography::Tomography<String>> {
        self.tomography.as_ref()
    }

    /// This node's identity.
    pub fn identity(&self) -> &Id {
        self.foca.identity()
    }

    /// The coordinate engine.
    pub fn engine(&self) -> &Node<String> {
        &self.engine
    }

    /// A counter that moves whenever the coordinate table changes.
    pub fn table_version(&self) -> u64 {
        self.table.version
    }

    /// Every member's last known published coordinate (ours included),
    /// in no particular order.
    pub fn table(&self) -> impl Iterator<Item = (&str, &TableEntry)> {
        self.table.slots.iter().map(|(n, e)| (&**n, e))
    }

    /// `name`'s entry in the coordinate table.
    pub fn table_entry(&self, name: &str) -> Option<&TableEntry> {
        self.table.get(name)
    }

    /// Entries in the coordinate table (ours included).
    pub fn table_len(&self) -> usize {
        self.table.len()
    }

    /// Our coordinate publications, (version, when), oldest first.
    pub fn publications(&self) -> &[(u64, Duration)] {
        &self.publications
    }

    /// Table changes waiting to be piggybacked.
    pub fn pending_rumors(&self) -> usize {
        self.rumors.len()
    }

    /// Counters.
    pub fn stats(&self) -> GossipStats {
        self.stats
    }

    /// Records a coordinate for `name` from outside the gossip (Consul's
    /// `PUT /v1/coordinate/update`), after validating it. It keeps the
    /// entry's version, so the member's next publication replaces it.
    pub fn insert_coordinate(
        &mut self,
        name: String,
        c: Coordinate,
        now: Duration,
    ) -> Result<(), GossipError> {
        if c.vec.len() != self.engine.config().dimensionality {
            return Err(GossipError::BadCoordinate);
        }
        if !c.is_valid() {
            return Err(GossipError::BadCoordinate);
        }
        let version = self.table.get(&name).map_or(0, |e| e.version);
        self.table.insert(
            &name,
            TableEntry {
                coordinate: c,
                version,
                updated: now,
            },
        );
        Ok(())
    }

    /// Live members other than this node (alive or suspect).
    pub fn members(&self) -> impl Iterator<Item = &Id> {
        self.foca.iter_members().map(|m| m.id())
    }

    /// Every member foca knows with its state, down ones included.
    pub fn membership(&self) -> Vec<(Id, foca::State)> {
        self.membership_iter()
            .map(|(id, state)| (id.clone(), state))
            .collect()
    }

    /// [`Gossip::membership`] without copying.
    pub fn membership_iter(&self) -> impl Iterator<Item = (&Id, foca::State)> {
        self.foca
            .iter_membership_state()
            .map(|m| (m.id(), m.state()))
    }

    /// True for a `TurnUndead` ("you are down") that is foca 2.0.0's
    /// stale courtesy message: when a suspicion timer fires, foca checks
    /// that the suspect has not refuted before declaring it down, but sends
    /// `TurnUndead` either way, and the refuted member would rejoin under a
    /// new identity (with 5% loss, a needless rejoin per node every few
    /// minutes and kilobytes per second of membership churn). So one that
    /// arrives within a suspicion period of our last refutation is
    /// dropped. Had the sender really declared us down, its Down update
    /// about us still reaches us by gossip and we rejoin then; after a
    /// restart or a healed partition (no recent refutation) it passes.
    fn stale_turn_undead(&self, now: Duration, payload: &[u8]) -> bool {
        let Some(refuted) = self.refuted_at else {
            return false;
        };
        if now.saturating_sub(refuted) > self.suspicion_window {
            return false;
        }
        matches!(
            Codec::<Id>::decode_header(&mut PostcardCodec, payload),
            Ok(h) if h.message == Message::TurnUndead && &h.dst == self.foca.identity()
        )
    }

    fn collect(&self, now: Duration) -> Collect {
        Collect {
            now,
            out: Vec::new(),
            acks_out: Vec::new(),
            incarnation: self.incarnation,
            sent_pings: Vec::new(),
            acks: Vec::new(),
        }
    }

    /// Finishes a call: remembers pings, turns acks into RTT samples,
    /// follows membership changes, applies the entries that arrived,
    /// publishes our coordinate if it moved, and wraps every datagram foca
    /// produced in an envelope.
    fn finish(
        &mut self,
        now: Duration,
        mut rt: Collect,
        incoming: Option<Envelope>,
    ) -> Vec<Output> {
        if rt.incarnation > self.incarnation {
            self.incarnation = rt.incarnation;
            self.refuted_at = Some(now);
        }
        for p in rt.sent_pings.drain(..) {
            self.pending.insert(p, now);
        }
        // Acks are only ever noticed while handling the datagram that
        // carries them, so `incoming` is the responder's envelope.
        for (addr, n, name) in rt.acks.drain(..) {
            let Some(sent) = self.pending.remove(&(addr, n)) else {
                continue;
            };
            let Some(coord) = incoming.as_ref().and_then(|e| e.coordinate.as_ref()) else {
                continue;
            };
            let hold = Duration::from_micros(incoming.as_ref().map_or(0, |e| e.hold_us as u64));
            let rtt = now.saturating_sub(sent).saturating_sub(hold);
            // The coordinate estimate before this sample moves it: the
            // calibration compares measurements with predictions.
            let predicted = (coord.vec.len() == self.engine.coordinate().vec.len())
                .then(|| self.engine.coordinate().distance_to(coord));
            match self
                .engine
                .update(&name, coord, rtt.as_secs_f64(), &mut self.rng)
            {
                Ok(()) => {
                    self.stats.rtt_samples += 1;
                    // Only samples the engine took feed the distributions.
                    if let Some(t) = &mut self.tomography {
                        let _ = t.record(&name, rtt.as_secs_f64(), predicted, now);
                    }
                }
                Err(_) => self.stats.rtt_rejected += 1,
            }
        }
        if !self.pending.is_empty() {
            self.pending
                .retain(|_, t| now.saturating_sub(*t) < PENDING_TTL);
        }
        for o in &rt.out {
            match o {
                Output::Event(Event::MemberUp(id)) => {
                    self.live.insert(id.name.clone(), id.clone());
                    self.left.remove(id.name.as_str());
                }
                // A rename (newer identity, same name) may have come up
                // before the old identity went down: keep that one.
                Output::Event(Event::MemberDown(id)) if self.live.get(&id.name) == Some(id) => {
                    self.live.remove(&id.name);
                    self.table.remove(&id.name);
                    self.rumors.remove(&id.name);
                    if let Some(t) = &mut self.tomography {
                        t.forget(&id.name);
                    }
                }
                _ => {}
            }
        }
        if let Some(env) = incoming {
            self.apply_entries(now, env.entries);
        }
        self.maybe_publish(now);
        let dim = self.engine.config().dimensionality;
        let ours = self.engine.coordinate().clone();
        for (k, o) in rt.out.iter_mut().enumerate() {
            if let Output::Send { bytes, .. } = o {
                let entries = self.pick_entries(now, dim);
                let env = Envelope {
                    coordinate: rt.acks_out.contains(&k).then(|| ours.clone()),
                    // We answer within this call: nothing was held (the
                    // driver rewrites it with `set_hold` if it knows better).
                    hold_us: 0,
                    entries,
                };
                *bytes = encode(&env, bytes);
                self.stats.datagrams_out += 1;
                self.stats.bytes_out += bytes.len() as u64;
            }
        }
        rt.out
    }

    /// Applies received table entries: newer versions of live members'
    /// coordinates replace ours and become rumors we pass on.
    fn apply_entries(&mut self, now: Duration, entries: Vec<Entry>) {
        let me = &self.foca.identity().name;
        let dim = self.engine.config().dimensionality;
        for e in entries {
            if &e.name == me || e.coordinate.vec.len() != dim {
                continue;
            }
            if e.version & LEFT != 0 {
                // A goodbye: remember it (bounded) and pass it
                // on once. foca's own news of the leave usually came in the
                // same datagram, so the member may already be gone.
                // A goodbye still making the rounds after the member came
                // back (it is live again) is stale.
                let cap = 2 * self.live.len() + 64;
                if !self.live.contains_key(&e.name)
                    && !self.left.contains_key(e.name.as_str())
                    && self.left.len() < cap
                {
                    let name: Arc<str> = Arc::from(e.name.as_str());
                    self.table.remove(&e.name);
                    self.left.insert(name.clone(), e);
                    self.rumors.push(name, false);
                }
                continue;
            }
            if !self.live.contains_key(&e.name) {
                // Not a member we know (yet): anti-entropy brings the
                // entry again once it is.
                self.stats.entries_unknown += 1;
                continue;
            }
            if self
                .table
                .get(&e.name)
                .is_some_and(|t| t.version >= e.version)
            {
                self.stats.entries_stale += 1;
                continue;
            }
            self.stats.entries_applied += 1;
            let name = self.table.insert(
                &e.name,
                TableEntry {
                    coordinate: e.coordinate,
                    version: e.version,
                    updated: now,
                },
            );
            self.rumors.push(name, false);
        }
    }

    /// Entries for one outgoing datagram: fresh changes first, then up to
    /// [`MAX_ANTI_ENTROPY`] table entries taken round-robin.
    fn pick_entries(&mut self, now: Duration, dim: usize) -> Vec<Entry> {
        // The entry allowance: ENTRY_RATE per second, at most a datagram's
        // worth saved up. foca sends far more datagrams while membership
        // changes are pending (gossip to three members five times a
        // second); the table must not ride on all of them.
        let (tokens, filled) = self.entry_tokens;
        let tokens =
            (tokens + now.saturating_sub(filled).as_secs_f64() * ENTRY_RATE).min(ENTRY_BURST);
        let max = tokens.floor() as usize;
        let mut budget = ENTRY_BUDGET;
        let mut out = Vec::new();
        let (table, left) = (&self.table, &self.left);
        self.rumors.take(
            &mut budget,
            max,
            dim,
            |name| {
                if let Some(goodbye) = left.get(name) {
                    return Some(goodbye.clone());
                }
                table.get(name).map(|t| Entry {
                    name: name.to_string(),
                    version: t.version,
                    coordinate: t.coordinate.clone(),
                })
            },
            &mut out,
        );
        // Each table entry is looked at no more than once per datagram.
        let mut swept = 0;
        let mut looked = 0;
        while swept < MAX_ANTI_ENTROPY && out.len() < max && looked < self.table.len() {
            let Some((name, t)) = self.table.peek_sweep() else {
                break;
            };
            let len = entry_len(name, dim);
            if len > budget {
                // Full: this one goes first next time.
                break;
            }
            looked += 1;
            if !out.iter().any(|e| *e.name == **name) {
                budget -= len;
                swept += 1;
                out.push(Entry {
                    name: name.to_string(),
                    version: t.version,
                    coordinate: t.coordinate.clone(),
                });
            }
            self.table.cursor += 1;
        }
        // Goodbyes are not in the table, so its sweep never repeats them:
        // one may go along, round-robin, so that a member the rumor missed
        // still learns the node left rather than failed.
        if out.len() < max && !self.left.is_empty() {
            self.left_cursor = (self.left_cursor + 1) % self.left.len();
            if let Some(goodbye) = self.left.values().nth(self.left_cursor)
                && entry_len(&goodbye.name, dim) <= budget
                && !out.iter().any(|e| e.name == goodbye.name)
            {
                out.push(goodbye.clone());
            }
        }
        self.entry_tokens = (tokens - out.len() as f64, now);
        out
    }

    /// Publishes our coordinate (our table entry, and a rumor) when it has
    /// moved significantly since the last publication.
    fn maybe_publish(&mut self, now: Duration) {
        // Nothing worth publishing before a few measurements.
        if self.leaving
            || (self.last_publish.is_none()
                && self.stats.rtt_samples < first_publication_samples(self.live.len()))
        {
            return;
        }
        let (tokens, filled) = self.publish_tokens;
        let interval = self.publish_interval().as_secs_f64();
        let tokens =
            (tokens + now.saturating_sub(filled).as_secs_f64() / interval).min(PUBLISH_BURST);
        self.publish_tokens = (tokens, now);
        let floor = self.probe_period.mul_f64(PUBLISH_INTERVALS_MIN);
        let ours = self.engine.published();
        let due = match &self.last_publish {
            None => true,
            Some((at, last)) => {
                let moved = last.distance_to(ours);
                let scale = last.vec.iter().map(|v| v * v).sum::<f64>().sqrt() + last.height;
                tokens >= 1.0
                    && now.saturating_sub(*at) >= floor
                    && moved > (PUBLISH_MOVE * scale).max(PUBLISH_MOVE_MIN)
            }
        };
        if !due {
            return;
        }
        self.publish_tokens.0 = (tokens - 1.0).max(0.0);
        let ours = ours.clone();
        let clock = (self.epoch + now).as_micros().min(u64::MAX as u128) as u64;
        let version = clock.max(self.publications.last().map_or(0, |p| p.0) + 1);
        let me = self.table.insert(
            &self.foca.identity().name,
            TableEntry {
                coordinate: ours.clone(),
                version,
                updated: now,
            },
        );
        self.rumors.push(me, false);
        self.publications.push((version, now));
        self.stats.publications += 1;
        self.last_publish = Some((now, ours));
    }

    /// The average time between two of our publications. Every member
    /// passes each publication on `rumor_transmissions` times, so the
    /// cluster's publications cost each node about
    /// `members · transmissions / interval` entries per second: the interval
    /// grows with the cluster to keep that near [`RUMOR_ENTRIES_PER_S`]
    /// (Consul similarly stretches its coordinate updates with cluster
    /// size), and is never under [`PUBLISH_INTERVALS_MIN`] probe periods.
    /// Up to [`PUBLISH_BURST`] publications may go out closer together
    /// (never closer than that floor).
    pub fn publish_interval(&self) -> Duration {
        let members = (self.live.len() + 1) as f64;
        let per_cluster = members * f64::from(self.rumor_transmissions) / RUMOR_ENTRIES_PER_S;
        let floor = self.probe_period.as_secs_f64() * PUBLISH_INTERVALS_MIN;
        Duration::from_secs_f64(per_cluster.max(floor))
    }

    /// Introduces this node to `seed` (join).
    pub fn announce(&mut self, now: Duration, seed: SocketAddr) -> Vec<Output> {
        let mut rt = self.collect(now);
        // The seed's name is unknown until it answers; foca keys members by
        // address, so an identity carrying only its address is enough.
        let target = Id {
            name: String::new(),
            addr: seed,
            bump: 0,
            server: None,
        };
        let _ = self.foca.announce(target, &mut rt);
        self.finish(now, rt, None)
    }

    /// True if `name` left the cluster gracefully (and has not come back).
    pub fn has_left(&self, name: &str) -> bool {
        self.left.contains_key(name)
    }

    /// Starts from a known membership (every id alive) without announcing
    /// or broadcasting it, as foca's `apply_many` for a node restoring
    /// what it knew: the simulator's warm start (a formed cluster without
    /// the join storm), or a restart from a snapshot of the members.
    pub fn restore(&mut self, now: Duration, members: impl IntoIterator<Item = Id>) -> Vec<Output> {
        let mut rt = self.collect(now);
        let me = self.foca.identity().clone();
        let _ = self.foca.apply_many(
            members
                .into_iter()
                .filter(|id| id.addr != me.addr)
                .map(foca::Member::alive),
            false,
            &mut rt,
        );
        self.finish(now, rt, None)
    }

    /// Leaves the cluster gracefully: foca declares us down, and our
    /// goodbye entry rides on the same datagrams so members report us as
    /// left rather than failed.
    pub fn leave(&mut self, now: Duration) -> Vec<Output> {
        self.leaving = true;
        let version = self.publications.last().map_or(1, |p| p.0 + 1) | LEFT;
        let me = self.foca.identity().name.clone();
        let goodbye = Entry {
            name: me,
            version,
            coordinate: self.engine.published().clone(),
        };
        let name: Arc<str> = Arc::from(goodbye.name.as_str());
        self.left.insert(name.clone(), goodbye);
        self.rumors.push(name, true);
        let mut rt = self.collect(now);
        let _ = self.foca.leave_cluster(&mut rt);
        self.finish(now, rt, None)
    }

    /// Handles a timer set earlier.
    pub fn handle_timer(&mut self, now: Duration, timer: Timer<Id>) -> Vec<Output> {
        if self.leaving {
            return Vec::new();
        }
        let mut rt = self.collect(now);
        let _ = self.foca.handle_timer(timer, &mut rt);
        self.finish(now, rt, None)
    }

    /// Handles a datagram from `from`. Malformed datagrams are dropped and
    /// counted, never a panic; so is foca's stale `TurnUndead` after a
    /// suspicion we refuted (see `stale_turn_undead`).
    pub fn handle_datagram(
        &mut self,
        now: Duration,
        _from: SocketAddr,
        bytes: &[u8],
    ) -> Vec<Output> {
        if self.leaving {
            // Gone: answering now would let a member that has already
            // marked us down tell us so (foca's `TurnUndead`), and we
            // would rejoin under a new identity, then vanish and be
            // reported failed instead of left.
            return Vec::new();
        }
        let (env, payload) = match decode(bytes) {
            Ok(x) => x,
            Err(e) => {
                match e {
                    GossipError::Truncated => self.stats.dropped_truncated += 1,
                    GossipError::Oversized(_) => self.stats.dropped_oversized += 1,
                    GossipError::Version(_) => self.stats.dropped_version += 1,
                    GossipError::BadCoordinate => self.stats.dropped_coordinate += 1,
                    GossipError::Membership(_) => self.stats.dropped_payload += 1,
                }
                return Vec::new();
            }
        };
        let dim = self.engine.config().dimensionality;
        if env.coordinate.as_ref().is_some_and(|c| c.vec.len() != dim)
            || env
                .entries
                .first()
                .is_some_and(|e| e.coordinate.vec.len() != dim)
        {
            self.stats.dropped_coordinate += 1;
            return Vec::new();
        }
        if self.stale_turn_undead(now, payload) {
            self.stats.dropped_turn_undead += 1;
            return Vec::new();
        }
        let mut rt = self.collect(now);
        if self.foca.handle_data(payload, &mut rt).is_err() {
            self.stats.dropped_payload += 1;
            return Vec::new();
        }
        self.stats.datagrams_in += 1;
        self.stats.bytes_in += bytes.len() as u64;
        self.finish(now, rt, Some(env))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A coordinate whose fields are exact in f32 (the wire format).
    fn coord() -> Coordinate {
        let mut c = Coordinate::origin(&vivaldi::Config::tomo());
        c.vec[0] = 0.015625;
        c.vec[3] = -0.25;
        c.error = 0.5;
        c.height = 0.0009765625;
        c
    }

    fn entry(name: &str, version: u64) -> Entry {
        Entry {
            name: name.into(),
            version,
            coordinate: coord(),
        }
    }

    #[test]
    fn envelope_round_trips() {
        for env in [
            Envelope {
                coordinate: Some(coord()),
                hold_us: 1234,
                entries: vec![entry("node-7", 42), entry("", u64::MAX)],
            },
            Envelope {
                coordinate: Some(coord()),
                hold_us: 1,
                entries: vec![],
            },
            Envelope {
                coordinate: None,
                hold_us: 0,
                entries: vec![],
            },
            Envelope {
                coordinate: None,
                hold_us: 9,
                entries: vec![entry("a", 1)],
            },
        ] {
            let bytes = encode(&env, b"payload");
            let (back, payload) = decode(&bytes).unwrap();
            assert_eq!(back, env);
            assert_eq!(payload, b"payload");
        }
    }

    #[test]
    fn f32_wire_rounding_is_below_a_microsecond() {
        let mut c = coord();
        c.vec[1] = 0.123456789;
        c.height = 0.000333333;
        let env = Envelope {
            coordinate: Some(c.clone()),
            hold_us: 0,
            entries: vec![],
        };
        let (back, _) = decode(&encode(&env, b"")).unwrap();
        let got = back.coordinate.unwrap();
        assert!((got.vec[1] - c.vec[1]).abs() < 1e-8);
        assert!((got.height - c.height).abs() < 1e-9);
    }

    #[test]
    fn entries_that_do_not_fit_the_format_are_left_out() {
        let mut small = entry("small", 1);
        small.coordinate.vec.pop();
        let env = Envelope {
            coordinate: Some(coord()),
            hold_us: 0,
            entries: vec![entry(&"x".repeat(300), 1), small, entry("ok", 2)],
        };
        let (back, _) = decode(&encode(&env, b"")).unwrap();
        assert_eq!(back.entries, vec![entry("ok", 2)]);
    }

    #[test]
    fn hold_time_can_be_set_after_encoding() {
        let env = Envelope {
            coordinate: Some(coord()),
            hold_us: 0,
            entries: vec![entry("b", 3)],
        };
        let mut bytes = encode(&env, b"p");
        assert!(set_hold(&mut bytes, 777));
        let (back, payload) = decode(&bytes).unwrap();
        assert_eq!(back.hold_us, 777);
        assert_eq!(back.entries, env.entries);
        assert_eq!(payload, b"p");
        assert!(!set_hold(&mut [9u8, 0, 0], 1));
    }

    #[test]
    fn malformed_envelopes_are_errors() {
        let good = encode(
            &Envelope {
                coordinate: Some(coord()),
                hold_us: 5,
                entries: vec![entry("node-1", 5)],
            },
            b"x",
        );
        assert!(decode(&good).is_ok());
        assert_eq!(decode(&[]), Err(GossipError::Truncated));
        // Every cut inside the envelope is truncated (the last byte is the
        // payload).
        for cut in 0..good.len() - 1 {
            assert_eq!(
                decode(&good[..cut]),
                Err(GossipError::Truncated),
                "cut {cut}"
            );
        }
        let mut v9 = good.clone();
        v9[0] = 9;
        assert_eq!(decode(&v9), Err(GossipError::Version(9)));
        let mut nan = good.clone();
        nan[3..7].copy_from_slice(&f32::NAN.to_le_bytes());
        assert_eq!(decode(&nan), Err(GossipError::BadCoordinate));
        // A non-finite coordinate inside an entry.
        let entry_coord = envelope_header_len(8) + 1 + 6 + 8;
        let mut inf = good.clone();
        inf[entry_coord..entry_coord + 4].copy_from_slice(&f32::INFINITY.to_le_bytes());
        assert_eq!(decode(&inf), Err(GossipError::BadCoordinate));
        let mut negative_height = good.clone();
        let h = 3 + 4 * 10;
        negative_height[h..h + 4].copy_from_slice(&(-1.0f32).to_le_bytes());
        assert_eq!(decode(&negative_height), Err(GossipError::BadCoordinate));
        let mut zero_dim = good.clone();
        zero_dim[2] = 0;
        assert_eq!(decode(&zero_dim), Err(GossipError::BadCoordinate));
        // Entries but no dimension.
        assert_eq!(
            decode(&[ENVELOPE_VERSION, 0, 0, 0, 0, 0, 0, 1, 0]),
            Err(GossipError::BadCoordinate)
        );
        let mut bad_utf8 = good.clone();
        bad_utf8[envelope_header_len(8) + 1] = 0xff;
        assert_eq!(decode(&bad_utf8), Err(GossipError::Truncated));
        assert_eq!(
            decode(&vec![ENVELOPE_VERSION; MAX_DATAGRAM + 1]),
            Err(GossipError::Oversized(MAX_DATAGRAM + 1))
        );
    }

    #[test]
    fn rumors_go_least_sent_first_and_send_the_current_entry() {
        let mut r = Rumors::new(3);
        let (a, b, c): (Arc<str>, Arc<str>, Arc<str>) = ("a".into(), "b".into(), "c".into());
        r.push(a.clone(), false);
        r.push(b.clone(), false);
        let one = entry_len("a", 8);
        // What is sent is looked up at send time: version 1, later 2.
        let mut versions: HashMap<String, u64> = HashMap::from([("a".into(), 1), ("b".into(), 1)]);
        let take = |r: &mut Rumors, versions: &HashMap<String, u64>, n: usize| {
            let mut budget = one * n;
            let mut out = Vec::new();
            r.take(
                &mut budget,
                usize::MAX,
                8,
                |name| versions.get(&**name).map(|&v| entry(name, v)),
                &mut out,
            );
            out.into_iter()
                .map(|e| (e.name, e.version))
                .collect::<Vec<_>>()
        };
        let ab = |va, vb| vec![("a".to_string(), va), ("b".to_string(), vb)];
        assert_eq!(take(&mut r, &versions, 1), vec![("a".to_string(), 1)]);
        // b has been sent less often than a now.
        assert_eq!(take(&mut r, &versions, 1), vec![("b".to_string(), 1)]);
        // A newer version of a restarts its count.
        versions.insert("a".into(), 2);
        r.push(a.clone(), false);
        assert_eq!(take(&mut r, &versions, 2), ab(2, 1));
        // Never the same name twice in one datagram, and each stops after
        // its transmissions: a has 2 left, b has 1.
        assert_eq!(take(&mut r, &versions, 5), ab(2, 1));
        assert_eq!(take(&mut r, &versions, 5), vec![("a".to_string(), 2)]);
        assert_eq!(take(&mut r, &versions, 5), vec![]);
        assert_eq!(r.len(), 0);
        // Removed, or gone from the table: dropped.
        r.push(c.clone(), false);
        r.remove("c");
        r.push(b.clone(), false);
        versions.remove("b");
        assert_eq!(take(&mut r, &versions, 5), vec![]);
        assert_eq!(r.len(), 0);
        // Urgent goes first.
        r.push(a.clone(), false);
        r.push(b.clone(), true);
        versions.insert("b".into(), 7);
        assert_eq!(take(&mut r, &versions, 1), vec![("b".to_string(), 7)]);
    }

    #[test]
    fn the_table_sweeps_every_entry_and_survives_removals() {
        let mut t = Table::default();
        let e = |v| TableEntry {
            coordinate: coord(),
            version: v,
            updated: Duration::ZERO,
        };
        for (i, name) in ["a", "b", "c", "d"].iter().enumerate() {
            t.insert(name, e(i as u64));
        }
        t.insert("b", e(9));
        assert_eq!(t.len(), 4);
        assert_eq!(t.get("b").unwrap().version, 9);
        t.remove("a");
        t.remove("zz");
        assert_eq!(t.len(), 3);
        assert!(t.get("a").is_none());
        for name in ["b", "c", "d"] {
            assert!(t.get(name).is_some(), "{name} lost its index");
        }
        let mut seen = Vec::new();
        for _ in 0..6 {
            let name = t.peek_sweep().unwrap().0.to_string();
            t.cursor += 1;
            seen.push(name);
        }
        let mut first: Vec<_> = seen[..3].to_vec();
        first.sort();
        assert_eq!(first, ["b", "c", "d"]);
        assert_eq!(seen[..3], seen[3..]);
        let mut empty = Table::default();
        assert!(empty.peek_sweep().is_none());
    }

    /// A foca message from `src` to `dst` with `updates`, in an envelope.
    fn foca_datagram(
        src: &Id,
        dst: &Id,
        message: Message<Id>,
        updates: &[foca::Member<Id>],
    ) -> Vec<u8> {
        let mut payload = Vec::new();
        let header = foca::Header {
            src: src.clone(),
            src_incarnation: 0,
            dst: dst.clone(),
            message,
        };
        Codec::<Id>::encode_header(&mut PostcardCodec, &header, &mut payload).unwrap();
        if !updates.is_empty() {
            payload.extend_from_slice(&(updates.len() as u16).to_be_bytes());
            for m in updates {
                Codec::<Id>::encode_member(&mut PostcardCodec, m, &mut payload).unwrap();
            }
        }
        let env = Envelope {
            coordinate: None,
            hold_us: 0,
            entries: vec![],
        };
        encode(&env, &payload)
    }

    #[test]
    fn a_turn_undead_right_after_a_refutation_is_dropped_later_one_rejoins() {
        let id = |k: u8| Id {
            name: format!("n{k}"),
            addr: format!("127.0.0.{k}:8301").parse().unwrap(),
            bump: 0,
            server: None,
        };
        let (a, b) = (id(1), id(2));
        let cfg = GossipConfig::lan(2);
        let window = cfg.foca.suspect_to_down_after + 2 * cfg.foca.probe_period;
        let mut g = Gossip::new(a.clone(), cfg, 7).unwrap();
        let t0 = Duration::from_secs(1);
        g.restore(t0, [b.clone()]);
        assert_eq!(g.members().count(), 1);
        let rejoined = |outs: &[Output]| {
            outs.iter()
                .any(|o| matches!(o, Output::Event(Event::Rejoined(_))))
        };
        // b gossips that it suspects us: we refute (incarnation 1).
        let suspect = foca::Member::new(a.clone(), 0, foca::State::Suspect);
        let outs = g.handle_datagram(
            t0,
            b.addr,
            &foca_datagram(&b, &a, Message::Gossip, &[suspect]),
        );
        assert!(!outs.is_empty(), "the refutation is sent");
        // b's suspicion timer fires and foca sends its courtesy TurnUndead
        // although we refuted: dropped, no rejoin.
        let turn_undead = foca_datagram(&b, &a, Message::TurnUndead, &[]);
        let t1 = t0 + window / 2;
        let outs = g.handle_datagram(t1, b.addr, &turn_undead);
        assert!(!rejoined(&outs));
        assert_eq!(g.stats().dropped_turn_undead, 1);
        assert_eq!(g.identity().bump, 0);
        // Long after any refutation, "you are down" is believed: we rejoin
        // under a newer identity.
        let t2 = t0 + window * 2;
        let outs = g.handle_datagram(t2, b.addr, &turn_undead);
        assert!(rejoined(&outs), "{outs:?}");
        assert_eq!(g.identity().bump, 1);
        assert_eq!(g.stats().dropped_turn_undead, 1);
    }

    #[test]
    fn identities_win_by_newer_bump() {
        let a = Id {
            name: "a".into(),
            addr: "127.0.0.1:1".parse().unwrap(),
            bump: 0,
            server: None,
        };
        let b = a.renew().unwrap();
        assert!(b.win_addr_conflict(&a));
        assert!(!a.win_addr_conflict(&b));
        let wrapped = Id {
            bump: u16::MAX,
            server: None,
            ..a.clone()
        }
        .renew()
        .unwrap();
        assert_eq!(wrapped.bump, 0);
        assert!(wrapped.win_addr_conflict(&Id {
            bump: u16::MAX,
            server: None,
            ..a
        }));
    }
}
