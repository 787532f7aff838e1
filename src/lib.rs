//! # tomo: network tomography and geo-routing
//!
//! tomo estimates how far every node, service instance and datacenter is
//! (at p50 and, later, p99) from gossip-fed network coordinates, and picks
//! the nearest. This crate holds the engine, the offline tools around it and,
//! behind the default `io` feature, the command-line front end.
//!
//! ## Module map
//!
//! Always compiled, no I/O (`cargo check --lib --no-default-features`):
//!
//! | module | owns |
//! | --- | --- |
//! | [`vivaldi`] | coordinates (Consul's `Coord` JSON), the update rule, latency filters, distance; the serf-compatible profile and tomo's default profile |
//! | [`dataset`] | RTT matrices and series (`ltm v1`, triples, King-style), summaries (`dataset info`), synthetic generators (serf's phantom shapes, the geo model) |
//! | [`tomography`] | RTT distributions: per-peer quantile sketches that forget, per-node tail and calibration factors, p50/p99 for probed and unprobed pairs |
//! | [`gossip`] | SWIM membership (foca) in tomo's versioned envelope: acks carry the responder's coordinate and direct ping/ack pairs become RTT samples; the LAN coordinate table, disseminated in the envelope at a bounded rate |
//! | [`catalog`] | the registry's state machine (Raft applies it): nodes, services, checks, KV with `cas` and locks, sessions, prepared queries, a Raft index per table |
//! | [`routing`] | the geo-routing policy: datacenters ordered by the upper median of estimated RTTs (Consul's rule), the failover candidate list (`NearestN`, `Datacenters`, a healthy-fraction threshold, a p99 bound) and the chooser that fails over at once and fails back with hysteresis; shared by the agent and the simulator |
//! | [`query`] | prepared queries: the definition (stored form and Consul's JSON), parsing with keys in any case, validation with Consul's 400 reasons, tomo's failover fields (`MinHealthyFraction`, `MaxP99`, `Deadline`, `FailbackAfter`), template resolution and interpolation, the instance filter and the local healthy fraction |
//! | [`sim`] | the round-based simulator and the gossip simulator (the real `gossip` core on a discrete-event network), with metrics defined as the serf peer harness defines them; the held-out tail evaluation; the datacenter failover scenario (`sim::failover`: `routing` on Vivaldi coordinates against the true matrix) |
//! | [`stats`] | nearest-rank quantiles shared by the above |
//!
//! Behind the `io` feature:
//!
//! | module | owns |
//! | --- | --- |
//! | `plot` | PNG/SVG figures (plotters) from `tomo sim --out` directories and datasets |
//! | `agent` | the agent process: the UDP gossip driver (tokio, socket2), user-space link emulation, the HTTP API (axum) in Consul's shapes; the KV, session, catalog/health (`?near=`) endpoints on servers, reached from any agent (`agent::forward`: client → server → leader); agent services and checks; bootstrap and membership of the server group (`-bootstrap-expect`); servers' WAN pool and `?dc=` forwarding between datacenters (`agent::federation`); prepared queries with nearest failover (`agent::query_api`); p50/p99 estimates (`agent::rtt`, `/v1/rtt`); the DNS interface (`agent::dns`); blocking reads shared by their watchers and answered only on a change (`agent::watch`); writes from web pages on other sites refused (`agent::browser`) |
//! | `raft` | openraft 0.9 for the servers: the type config, and the redb-backed log (one writer thread, group commit) and state machine (the catalog) |
//! | `server` | a registry server: a Raft member holding the catalog, peer RPC on TCP, concurrent writes batched into one log entry and forwarded to the leader, `?stale` and `?consistent` reads (one leadership check shared by concurrent reads), adding and removing servers; a fault-injection hook for the test harness (`server::fault`) |
//! | `cli` | the `tomo` command (clap): `sim`, `sim-failover`, `dataset`, `plot`, `agent`, `demo`, `members`, `rtt`, `info`, `bench kv` (tomo's registry against etcd); the binary's `main` only calls it |
//!
//! The shape the later modules (gossip, tomography, catalog, agent, server,
//! proxy) grow into is `../shared/docs/architecture.md`.

#![warn(missing_docs)]

pub mod catalog;
pub mod dataset;
pub mod gossip;
pub mod query;
pub mod routing;
pub mod sim;
pub mod stats;
pub mod tomography;
pub mod vivaldi;

#[cfg(feature = "io")]
pub mod agent;
#[cfg(feature = "io")]
pub mod cli;
#[cfg(feature = "io")]
pub mod plot;
#[cfg(feature = "io")]
pub mod raft;
#[cfg(feature = "io")]
pub mod server;
