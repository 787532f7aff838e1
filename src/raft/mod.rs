//! Raft for the servers: openraft 0.9 (storage v2) with the registry's
//! [`catalog`](crate::catalog) as the state machine and redb on disk. This
//! module is the only one that names openraft's types, so that moving to
//! openraft 0.10 touches nothing else.
//!
//! - [`store`]: the log (vote, committed id, entries, purge point) and the
//!   state machine with its snapshots, in one redb file under `-data-dir`.
//!
//! Coordinates never go through Raft (architecture.md): the servers hold
//! them as soft state, fed by the agents.

pub mod store;

use std::io::Cursor;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::catalog::{CatalogError, Command, Outcome};

/// A write as the log carries it: the command and the leader's clock
/// reading when it accepted it (lock-delays are judged against it, so
/// every server decides alike).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// Leader time since the Unix epoch.
    pub now: Duration,
    /// The state change.
    pub cmd: Command,
}

/// What applying a [`Request`] answered.
pub type Response = Result<Outcome, CatalogError>;

openraft::declare_raft_types!(
    /// tomo's Raft type configuration.
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);
