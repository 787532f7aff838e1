//! SWIM membership (foca) wrapped in tomo's versioned envelope, feeding the
//! coordinate engine with direct-probe RTTs. Sans-IO: the caller passes the
//! time and the received bytes in, and gets datagrams to send, timers to
//! arm and membership events out; the agent drives it with UDP sockets and
//! the real clock, the simulator with its event queue.
//!
//! Every datagram is `[envelope][foca message]`. The envelope carries the
//! sender's current coordinate (so every member learns the coordinates of
//! those it hears from, and a prober gets the target's coordinate with the
//! ack, as serf's ack payload does) and how long the sender held the
//! datagram it answers (subtracted from the RTT).
//!
//! RTT samples come only from a direct `Ping(n)` we sent to a member and
//! the `Ack(n)` that member returned: indirect probes and forwarded acks
//! never produce samples.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use foca::{
    BroadcastHandler, Config as FocaConfig, Foca, Identity, Invalidates, Message, Notification,
    PostcardCodec, Runtime, Timer,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::vivaldi::{self, Coordinate, Node};

/// Version byte of the envelope.
pub const ENVELOPE_VERSION: u8 = 1;
/// Largest datagram sent or accepted, bytes.
pub const MAX_DATAGRAM: usize = 1400;
/// Most coordinate dimensions an envelope may carry.
pub const MAX_DIMENSIONS: usize = 64;

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

/// The decoded envelope of a datagram.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    /// The sender's coordinate, when it has one to share.
    pub coordinate: Option<Coordinate>,
    /// Microseconds the sender held the datagram this one answers.
    pub hold_us: u32,
}

const FLAG_COORDINATE: u8 = 1;

/// Encodes `[version][flags][dim][coordinate…][hold_us][payload]`.
pub fn encode(env: &Envelope, payload: &[u8]) -> Vec<u8> {
    let dim = env.coordinate.as_ref().map_or(0, |c| c.vec.len());
    let mut out = Vec::with_capacity(3 + 8 * (dim + 3) + 4 + payload.len());
    out.push(ENVELOPE_VERSION);
    match &env.coordinate {
        Some(c) => {
            out.push(FLAG_COORDINATE);
            out.push(dim as u8);
            for v in c.vec.iter().chain([&c.error, &c.adjustment, &c.height]) {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        None => {
            out.push(0);
            out.push(0);
        }
    }
    out.extend_from_slice(&env.hold_us.to_le_bytes());
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
        8 * (dim as usize + 3)
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

/// Reads `dim + 3` little-endian f64s (vector, error, adjustment, height)
/// as a coordinate, refusing non-finite or negative error/height values.
fn read_coordinate(dim: usize, raw: &[u8]) -> Result<Coordinate, GossipError> {
    if raw.len() != 8 * (dim + 3) {
        return Err(GossipError::Truncated);
    }
    let f = |k: usize| f64::from_le_bytes(raw[8 * k..8 * k + 8].try_into().expect("8 bytes"));
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
        Some(read_coordinate(dim, take(8 * (dim + 3))?)?)
    } else {
        None
    };
    let hold = take(4)?;
    let hold_us = u32::from_le_bytes(hold.try_into().expect("4 bytes"));
    Ok((
        Envelope {
            coordinate,
            hold_us,
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
}

impl GossipConfig {
    /// LAN defaults (1 s probes) for an expected cluster size, with the
    /// packet size shrunk by the envelope.
    pub fn lan(cluster_size: u32) -> Self {
        let mut foca = FocaConfig::new_lan(NonZeroU32::new(cluster_size.max(1)).expect("non-zero"));
        let engine = vivaldi::Config::tomo();
        let envelope = 3 + 8 * (engine.dimensionality + 3) + 4;
        foca.max_packet_size = (MAX_DATAGRAM - envelope).try_into().expect("non-zero");
        GossipConfig { foca, engine }
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
    /// RTT samples fed to the engine.
    pub rtt_samples: u64,
    /// Samples the engine rejected.
    pub rtt_rejected: u64,
}

/// A member's last known coordinate.
#[derive(Debug, Clone, PartialEq)]
pub struct TableEntry {
    /// The coordinate.
    pub coordinate: Coordinate,
    /// When it was received (the caller's clock).
    pub updated: Duration,
}

/// One node's gossip state: membership, the coordinate engine and the
/// table of every member's coordinate.
pub struct Gossip {
    foca: Foca<Id, PostcardCodec, ChaCha8Rng, CoordinateBroadcasts>,
    /// Coordinates that arrived in other members' broadcasts, not yet in
    /// the table (shared with the broadcast handler foca owns).
    inbox: Inbox,
    /// Our last broadcast: when, its version and the coordinate.
    last_broadcast: Option<(Duration, Coordinate)>,
    engine: Node<String>,
    /// Pings sent and not yet acked: (target address, probe number) → when.
    pending: HashMap<(SocketAddr, u8), Duration>,
    table: HashMap<String, TableEntry>,
    stats: GossipStats,
    rng: ChaCha8Rng,
}

/// Collects foca's callbacks for one call.
struct Collect {
    now: Duration,
    /// Our coordinate, put in every envelope we send.
    ours: Coordinate,
    out: Vec<Output>,
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
                if let Message::Ping(n) = h.message {
                    self.sent_pings.push((h.dst.addr, n));
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
        // We answer within this call: nothing was held.
        let env = Envelope {
            coordinate: Some(self.ours.clone()),
            hold_us: 0,
        };
        self.out.push(Output::Send {
            to: to.addr,
            bytes: encode(&env, data),
        });
    }

    fn submit_after(&mut self, timer: Timer<Id>, after: Duration) {
        self.out.push(Output::Timer {
            at: self.now + after,
            timer,
        });
    }
}

/// A member re-broadcasts its coordinate at least this often.
const BROADCAST_REFRESH: Duration = Duration::from_secs(60);
/// …or as soon as it moved by this fraction of its distance from the
/// origin (at least 0.5 ms): "significant change" for consumers.
const BROADCAST_MOVE: f64 = 0.05;

/// Coordinates received in broadcasts, handed from foca's handler to the
/// table.
#[derive(Clone, Default)]
struct Inbox(std::sync::Arc<std::sync::Mutex<Vec<(String, Coordinate)>>>);

/// foca's custom-broadcast handler for coordinates: items are
/// `[name len u16][name][version u64][dim u8][dim + 3 f64]`; a newer
/// version of a member's coordinate replaces (and stops the dissemination
/// of) an older one.
struct CoordinateBroadcasts {
    versions: HashMap<String, u64>,
    inbox: Inbox,
    dimensionality: usize,
}

/// The dissemination key of a coordinate broadcast.
struct BroadcastKey {
    name: String,
    version: u64,
}

impl Invalidates for BroadcastKey {
    fn invalidates(&self, other: &Self) -> bool {
        self.name == other.name && self.version >= other.version
    }
}

/// Encodes a coordinate broadcast item.
fn encode_broadcast(name: &str, version: u64, c: &Coordinate) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + name.len() + 8 + 1 + 8 * (c.vec.len() + 3));
    out.extend_from_slice(&(name.len() as u16).to_le_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&version.to_le_bytes());
    out.push(c.vec.len() as u8);
    for v in c.vec.iter().chain([&c.error, &c.adjustment, &c.height]) {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Decodes a coordinate broadcast item (never panics).
fn decode_broadcast(data: &[u8]) -> Result<(String, u64, Coordinate), GossipError> {
    let take = |d: &mut &[u8], n: usize| -> Result<Vec<u8>, GossipError> {
        if d.len() < n {
            return Err(GossipError::Truncated);
        }
        let (a, b) = d.split_at(n);
        *d = b;
        Ok(a.to_vec())
    };
    let mut d = data;
    let len = u16::from_le_bytes(take(&mut d, 2)?.try_into().expect("2 bytes")) as usize;
    let name = String::from_utf8(take(&mut d, len)?).map_err(|_| GossipError::Truncated)?;
    let version = u64::from_le_bytes(take(&mut d, 8)?.try_into().expect("8 bytes"));
    let dim = check_dim(take(&mut d, 1)?[0])?;
    let c = read_coordinate(dim, &take(&mut d, 8 * (dim + 3))?)?;
    Ok((name, version, c))
}

impl BroadcastHandler<Id> for CoordinateBroadcasts {
    type Key = BroadcastKey;
    type Error = GossipError;

    fn receive_item(
        &mut self,
        data: &[u8],
        _sender: Option<&Id>,
    ) -> Result<Option<BroadcastKey>, GossipError> {
        let (name, version, c) = decode_broadcast(data)?;
        if c.vec.len() != self.dimensionality {
            return Err(GossipError::BadCoordinate);
        }
        let known = self.versions.get(&name).copied().unwrap_or(0);
        if version <= known {
            // Already seen: do not disseminate again.
            return Ok(None);
        }
        self.versions.insert(name.clone(), version);
        self.inbox
            .0
            .lock()
            .expect("not poisoned")
            .push((name.clone(), c));
        Ok(Some(BroadcastKey { name, version }))
    }
}

/// Pings older than this are forgotten (their ack is not coming).
const PENDING_TTL: Duration = Duration::from_secs(30);

impl Gossip {
    /// A node with identity `id`, seeded randomness and configuration.
    pub fn new(id: Id, cfg: GossipConfig, seed: u64) -> Result<Self, GossipError> {
        let inbox = Inbox::default();
        let handler = CoordinateBroadcasts {
            versions: HashMap::new(),
            inbox: inbox.clone(),
            dimensionality: cfg.engine.dimensionality,
        };
        let foca = Foca::with_custom_broadcast(
            id,
            cfg.foca,
            ChaCha8Rng::seed_from_u64(seed),
            PostcardCodec,
            handler,
        );
        let engine = Node::new(cfg.engine).map_err(|e| GossipError::Membership(e.to_string()))?;
        Ok(Gossip {
            foca,
            inbox,
            last_broadcast: None,
            engine,
            pending: HashMap::new(),
            table: HashMap::new(),
            stats: GossipStats::default(),
            rng: ChaCha8Rng::seed_from_u64(seed ^ 0xC00D),
        })
    }

    /// This node's identity.
    pub fn identity(&self) -> &Id {
        self.foca.identity()
    }

    /// The coordinate engine.
    pub fn engine(&self) -> &Node<String> {
        &self.engine
    }

    /// Every member's last known coordinate (ours included).
    pub fn table(&self) -> &HashMap<String, TableEntry> {
        &self.table
    }

    /// Counters.
    pub fn stats(&self) -> GossipStats {
        self.stats
    }

    /// Records a coordinate for `name` from outside the gossip (Consul's
    /// `PUT /v1/coordinate/update`), after validating it.
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
        self.table.insert(
            name,
            TableEntry {
                coordinate: c,
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
        self.foca
            .iter_membership_state()
            .map(|m| (m.id().clone(), m.state()))
            .collect()
    }

    fn collect(&self, now: Duration) -> Collect {
        Collect {
            now,
            ours: self.engine.coordinate().clone(),
            out: Vec::new(),
            sent_pings: Vec::new(),
            acks: Vec::new(),
        }
    }

    /// Finishes a call: remembers pings, turns acks into RTT samples,
    /// counts what is sent, refreshes our table entry.
    fn finish(
        &mut self,
        now: Duration,
        mut rt: Collect,
        incoming: Option<Envelope>,
    ) -> Vec<Output> {
        for p in rt.sent_pings.drain(..) {
            self.pending.insert(p, now);
        }
        // Acks are only ever noticed while handling the datagram that
        // carries them, so `incoming` is the responder's envelope.
        for (addr, n, name) in rt.acks.drain(..) {
            let Some(sent) = self.pending.remove(&(addr, n)) else {
                continue;
            };
            let Some(env) = incoming.as_ref() else {
                continue;
            };
            let Some(coord) = &env.coordinate else {
                continue;
            };
            let rtt = now
                .saturating_sub(sent)
                .saturating_sub(Duration::from_micros(env.hold_us as u64));
            match self
                .engine
                .update(&name, coord, rtt.as_secs_f64(), &mut self.rng)
            {
                Ok(()) => self.stats.rtt_samples += 1,
                Err(_) => self.stats.rtt_rejected += 1,
            }
        }
        self.pending
            .retain(|_, t| now.saturating_sub(*t) < PENDING_TTL);
        for o in &rt.out {
            match o {
                Output::Send { bytes, .. } => {
                    self.stats.datagrams_out += 1;
                    self.stats.bytes_out += bytes.len() as u64;
                }
                Output::Event(Event::MemberDown(id)) => {
                    self.table.remove(&id.name);
                }
                _ => {}
            }
        }
        let me = self.foca.identity().name.clone();
        let ours = self.engine.published().clone();
        self.table.insert(
            me.clone(),
            TableEntry {
                coordinate: ours.clone(),
                updated: now,
            },
        );
        // Coordinates other members broadcast (only members we know of:
        // a stale broadcast must not resurrect a departed node's entry).
        let arrived = std::mem::take(&mut *self.inbox.0.lock().expect("not poisoned"));
        for (name, c) in arrived {
            if name != me && self.foca.iter_members().any(|m| m.id().name == name) {
                self.table.insert(
                    name,
                    TableEntry {
                        coordinate: c,
                        updated: now,
                    },
                );
            }
        }
        self.maybe_broadcast(now, &me, ours);
        std::mem::take(&mut rt.out)
    }

    /// Publishes our coordinate to the cluster (piggybacked on foca's
    /// messages) when it has moved significantly since the last broadcast,
    /// or at least every [`BROADCAST_REFRESH`].
    fn maybe_broadcast(&mut self, now: Duration, me: &str, ours: Coordinate) {
        let due = match &self.last_broadcast {
            None => true,
            Some((at, last)) => {
                let moved = last.distance_to(&ours);
                let scale = last.vec.iter().map(|v| v * v).sum::<f64>().sqrt() + last.height;
                now.saturating_sub(*at) >= BROADCAST_REFRESH
                    || moved > (BROADCAST_MOVE * scale).max(0.5e-3)
            }
        };
        if !due {
            return;
        }
        let version = now.as_micros() as u64 + 1;
        let item = encode_broadcast(me, version, &ours);
        if self.foca.add_broadcast(&item).is_ok() {
            self.last_broadcast = Some((now, ours));
        }
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
        };
        let _ = self.foca.announce(target, &mut rt);
        self.finish(now, rt, None)
    }

    /// Leaves the cluster gracefully.
    pub fn leave(&mut self, now: Duration) -> Vec<Output> {
        let mut rt = self.collect(now);
        let _ = self.foca.leave_cluster(&mut rt);
        self.finish(now, rt, None)
    }

    /// Handles a timer set earlier.
    pub fn handle_timer(&mut self, now: Duration, timer: Timer<Id>) -> Vec<Output> {
        let mut rt = self.collect(now);
        let _ = self.foca.handle_timer(timer, &mut rt);
        self.finish(now, rt, None)
    }

    /// Handles a datagram from `from`. Malformed datagrams are dropped and
    /// counted, never a panic.
    pub fn handle_datagram(
        &mut self,
        now: Duration,
        from: SocketAddr,
        bytes: &[u8],
    ) -> Vec<Output> {
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
        if let Some(c) = &env.coordinate
            && c.vec.len() != self.engine.config().dimensionality
        {
            self.stats.dropped_coordinate += 1;
            return Vec::new();
        }
        let mut rt = self.collect(now);
        if self.foca.handle_data(payload, &mut rt).is_err() {
            self.stats.dropped_payload += 1;
            return Vec::new();
        }
        self.stats.datagrams_in += 1;
        self.stats.bytes_in += bytes.len() as u64;
        // Remember the sender's coordinate under its name, when foca told us
        // who it is (any message carries the sender's identity).
        if let Some(c) = &env.coordinate
            && let Some(name) = self.name_of(from)
        {
            self.table.insert(
                name,
                TableEntry {
                    coordinate: c.clone(),
                    updated: now,
                },
            );
        }
        self.finish(now, rt, Some(env))
    }

    fn name_of(&self, addr: SocketAddr) -> Option<String> {
        self.foca
            .iter_membership_state()
            .find(|m| m.id().addr == addr && m.state() != foca::State::Down)
            .map(|m| m.id().name.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn coord() -> Coordinate {
        let mut c = Coordinate::origin(&vivaldi::Config::tomo());
        c.vec[0] = 0.012;
        c.height = 0.001;
        c
    }

    #[test]
    fn envelope_round_trips() {
        for env in [
            Envelope {
                coordinate: Some(coord()),
                hold_us: 1234,
            },
            Envelope {
                coordinate: None,
                hold_us: 0,
            },
        ] {
            let bytes = encode(&env, b"payload");
            let (back, payload) = decode(&bytes).unwrap();
            assert_eq!(back, env);
            assert_eq!(payload, b"payload");
        }
    }

    #[test]
    fn hold_time_can_be_set_after_encoding() {
        let env = Envelope {
            coordinate: Some(coord()),
            hold_us: 0,
        };
        let mut bytes = encode(&env, b"p");
        assert!(set_hold(&mut bytes, 777));
        let (back, payload) = decode(&bytes).unwrap();
        assert_eq!(back.hold_us, 777);
        assert_eq!(payload, b"p");
        assert!(!set_hold(&mut [9u8, 0, 0], 1));
    }

    #[test]
    fn malformed_envelopes_are_errors() {
        let good = encode(
            &Envelope {
                coordinate: Some(coord()),
                hold_us: 5,
            },
            b"x",
        );
        assert_eq!(decode(&[]), Err(GossipError::Truncated));
        assert_eq!(decode(&good[..20]), Err(GossipError::Truncated));
        let mut v2 = good.clone();
        v2[0] = 2;
        assert_eq!(decode(&v2), Err(GossipError::Version(2)));
        let mut nan = good.clone();
        nan[3..11].copy_from_slice(&f64::NAN.to_le_bytes());
        assert_eq!(decode(&nan), Err(GossipError::BadCoordinate));
        let mut zero_dim = good.clone();
        zero_dim[2] = 0;
        assert_eq!(decode(&zero_dim), Err(GossipError::BadCoordinate));
        assert_eq!(
            decode(&vec![1u8; MAX_DATAGRAM + 1]),
            Err(GossipError::Oversized(MAX_DATAGRAM + 1))
        );
    }

    #[test]
    fn coordinate_broadcasts_round_trip_and_newer_versions_win() {
        let item = encode_broadcast("node-7", 42, &coord());
        assert_eq!(
            decode_broadcast(&item).unwrap(),
            ("node-7".to_string(), 42, coord())
        );
        for cut in 0..item.len() {
            assert!(decode_broadcast(&item[..cut]).is_err(), "cut at {cut}");
        }
        let mut h = CoordinateBroadcasts {
            versions: HashMap::new(),
            inbox: Inbox::default(),
            dimensionality: 8,
        };
        assert!(h.receive_item(&item, None).unwrap().is_some());
        // The same or an older version is not disseminated again.
        assert!(h.receive_item(&item, None).unwrap().is_none());
        assert!(
            h.receive_item(&encode_broadcast("node-7", 41, &coord()), None)
                .unwrap()
                .is_none()
        );
        let newer = h
            .receive_item(&encode_broadcast("node-7", 43, &coord()), None)
            .unwrap()
            .unwrap();
        let older = BroadcastKey {
            name: "node-7".into(),
            version: 42,
        };
        assert!(newer.invalidates(&older));
        assert!(!older.invalidates(&newer));
        assert_eq!(h.inbox.0.lock().unwrap().len(), 2);
        let mut wrong = coord();
        wrong.vec.pop();
        assert!(
            h.receive_item(&encode_broadcast("x", 1, &wrong), None)
                .is_err()
        );
    }

    #[test]
    fn identities_win_by_newer_bump() {
        let a = Id {
            name: "a".into(),
            addr: "127.0.0.1:1".parse().unwrap(),
            bump: 0,
        };
        let b = a.renew().unwrap();
        assert!(b.win_addr_conflict(&a));
        assert!(!a.win_addr_conflict(&b));
        let wrapped = Id {
            bump: u16::MAX,
            ..a.clone()
        }
        .renew()
        .unwrap();
        assert_eq!(wrapped.bump, 0);
        assert!(wrapped.win_addr_conflict(&Id {
            bump: u16::MAX,
            ..a
        }));
    }
}
