//! The Raft log and state machine on redb (one file, `raft.redb`, under the
//! data dir). Every write is a redb transaction committed with immediate
//! durability before openraft hears it is done (its durability contract:
//! a vote or an appended entry must survive a crash once acknowledged).
//!
//! Log writes go through one writer thread in order, so an fsync never
//! blocks the async runtime's threads; appends queued while one runs are
//! committed together (group commit), and entries appended but not yet on
//! disk are readable from memory meanwhile. openraft 0.9 waits for each
//! append's flush before the next, so in practice one append is in the
//! queue at a time: the grouping that matters is the server's batching of
//! concurrent writes into one entry (`server`), and this layout is ready
//! for a non-blocking append (openraft 0.10).
//!
//! The state machine ([`Catalog`]) lives in memory; its snapshots are
//! persisted, and on start the machine reloads the last one and openraft
//! replays the log after it. Entries are postcard-encoded; snapshot data is
//! postcard of the machine's state, its metadata JSON.

// openraft's `StorageError` (224 bytes) is what its storage traits return;
// the helpers here return it too rather than box and unbox at every call.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock, mpsc};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    AnyError, BasicNode, Entry, EntryPayload, LogId, RaftLogReader, RaftSnapshotBuilder,
    SnapshotMeta, StorageError, StorageIOError, StoredMembership, Vote,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{Response, TypeConfig};
use crate::catalog::{Catalog, Outcome};

/// Log entries by index.
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
/// Vote, committed id, purge point, last snapshot.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const PURGED: &str = "last_purged";
const SNAPSHOT_META: &str = "snapshot_meta";
const SNAPSHOT_DATA: &str = "snapshot_data";

/// Why the store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// redb refused the file (missing permissions, corrupt, locked by
    /// another process…).
    #[error("cannot open the Raft store {path}: {source}")]
    Open {
        /// The file.
        path: String,
        /// redb's reason.
        source: redb::Error,
    },
    /// The file opened but what it holds does not decode.
    #[error("the Raft store {path} is damaged: {what}")]
    Corrupt {
        /// The file.
        path: String,
        /// What failed to decode.
        what: String,
    },
}

type Sto = StorageError<u64>;

fn io_err(f: fn(&AnyError) -> StorageIOError<u64>, e: impl std::error::Error + 'static) -> Sto {
    f(&AnyError::new(&e)).into()
}

fn read_err(e: impl std::error::Error + 'static) -> Sto {
    io_err(|a| StorageIOError::read(a.clone()), e)
}

fn write_err(e: impl std::error::Error + 'static) -> Sto {
    io_err(|a| StorageIOError::write(a.clone()), e)
}

/// Opens (creating if needed) the store at `dir/raft.redb`: the log and the
/// state machine, sharing the file.
pub fn open(dir: &Path) -> Result<(LogStore, StateMachine), StoreError> {
    let path = dir.join("raft.redb");
    let shown = path.display().to_string();
    let db = Database::create(&path).map_err(|e| StoreError::Open {
        path: shown.clone(),
        source: e.into(),
    })?;
    // Create the tables once so that readers never meet a missing one.
    let init = || -> Result<(), redb::Error> {
        let tx = db.begin_write()?;
        tx.open_table(LOG)?;
        tx.open_table(META)?;
        tx.commit()?;
        Ok(())
    };
    init().map_err(|e| StoreError::Open {
        path: shown.clone(),
        source: e,
    })?;
    let db = Arc::new(db);
    let log = LogStore::new(db.clone());
    let corrupt = |what: String| StoreError::Corrupt {
        path: shown.clone(),
        what,
    };
    // Every entry and the metadata must decode now, not in the middle of
    // an election.
    log.check().map_err(|e| corrupt(e.to_string()))?;
    let sm = StateMachine::load(db).map_err(|e| corrupt(e.to_string()))?;
    Ok((log, sm))
}

/// An entry appended but maybe not on disk yet, postcard-encoded.
type Row = (LogId<u64>, Arc<Vec<u8>>);

/// A write run on the writer thread.
type WriteFn = Box<dyn FnOnce(&Database) -> Result<(), redb::Error> + Send>;

/// Work for the writer thread, done in order.
enum Job {
    /// Entries to commit; `LogFlushed` tells openraft once they are on disk.
    Append(Vec<Row>, LogFlushed<TypeConfig>),
    /// The committed log id (JSON): written with the next batch of
    /// appends, or alone without fsync when there is none.
    Committed(Vec<u8>),
    /// Any other write, run in a transaction of its own; the answer goes
    /// back if someone waits.
    Other(
        WriteFn,
        Option<tokio::sync::oneshot::Sender<Result<(), String>>>,
    ),
}

/// The Raft log.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
    /// Appended, not yet committed by the writer: index → entry.
    pending: Arc<Mutex<BTreeMap<u64, Row>>>,
    jobs: mpsc::Sender<Job>,
}

/// The writer thread: takes every queued job, commits runs of appends in
/// one transaction (one fsync), runs other writes in order between them.
///
/// It holds the database weakly: the file is closed as soon as the store
/// is dropped (a restart in the same process reopens it at once).
fn writer(
    db: std::sync::Weak<Database>,
    pending: Arc<Mutex<BTreeMap<u64, Row>>>,
    jobs: mpsc::Receiver<Job>,
) {
    let closed = || redb::Error::Corrupted("the store is closed".into());
    type Appends = Vec<(Vec<Row>, LogFlushed<TypeConfig>)>;
    let flush = |appends: &mut Appends, committed: &mut Option<Vec<u8>>| {
        if appends.is_empty() && committed.is_none() {
            return;
        }
        let mut commit = || -> Result<(), redb::Error> {
            let db = db.upgrade().ok_or_else(closed)?;
            let mut tx = db.begin_write()?;
            if appends.is_empty() {
                // Only the committed id: a hint, no fsync of its own.
                tx.set_durability(redb::Durability::None)
                    .map_err(|e| redb::Error::Corrupted(e.to_string()))?;
            }
            {
                let mut t = tx.open_table(LOG)?;
                for (rows, _) in appends.iter() {
                    for (id, bytes) in rows {
                        t.insert(id.index, bytes.as_slice())?;
                    }
                }
            }
            if let Some(c) = committed.take() {
                tx.open_table(META)?.insert(COMMITTED, c.as_slice())?;
            }
            tx.commit()?;
            Ok(())
        };
        let r = commit();
        // Committed or not, these rows leave the overlay: on disk now, or
        // failed (openraft stops on the error; nothing may read them as
        // if they were stored).
        {
            let mut p = pending.lock().expect("not poisoned");
            for (rows, _) in appends.iter() {
                for (id, bytes) in rows {
                    // A later append of the same index (after a truncate)
                    // stays pending until its own commit.
                    if p.get(&id.index).is_some_and(|(_, b)| Arc::ptr_eq(b, bytes)) {
                        p.remove(&id.index);
                    }
                }
            }
        }
        for (_, cb) in appends.drain(..) {
            cb.log_io_completed(
                r.as_ref()
                    .map(|_| ())
                    .map_err(|e| std::io::Error::other(e.to_string())),
            );
        }
    };
    let mut appends = Vec::new();
    let mut committed = None;
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        batch.extend(jobs.try_iter());
        for job in batch {
            match job {
                Job::Append(rows, cb) => appends.push((rows, cb)),
                Job::Committed(c) => committed = Some(c),
                Job::Other(f, reply) => {
                    flush(&mut appends, &mut committed);
                    let r = match db.upgrade() {
                        Some(db) => f(&db).map_err(|e| e.to_string()),
                        None => Err(closed().to_string()),
                    };
                    if let Some(reply) = reply {
                        let _ = reply.send(r);
                    }
                }
            }
        }
        flush(&mut appends, &mut committed);
    }
}

impl LogStore {
    fn new(db: Arc<Database>) -> LogStore {
        let pending = Arc::new(Mutex::new(BTreeMap::new()));
        let (tx, rx) = mpsc::channel();
        let (d, p) = (Arc::downgrade(&db), pending.clone());
        std::thread::Builder::new()
            .name("raft-log-writer".into())
            .spawn(move || writer(d, p, rx))
            .expect("spawn the log writer thread");
        LogStore {
            db,
            pending,
            jobs: tx,
        }
    }

    /// Runs a write on the writer thread, after everything queued before
    /// it, and waits for it.
    async fn write(
        &self,
        f: impl FnOnce(&Database) -> Result<(), redb::Error> + Send + 'static,
    ) -> Result<(), Sto> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Job::Other(Box::new(f), Some(tx)))
            .map_err(|_| write_err(std::io::Error::other("the log writer has stopped")))?;
        rx.await
            .map_err(|_| write_err(std::io::Error::other("the log writer has stopped")))?
            .map_err(|e| write_err(std::io::Error::other(e)))
    }

    /// Writes a metadata value on the writer thread; waits for it unless
    /// `durability` is `None` (then it is on disk with the next durable
    /// commit, and nobody waits).
    async fn put_meta_with<T: Serialize>(
        &self,
        key: &'static str,
        v: &T,
        durability: redb::Durability,
    ) -> Result<(), Sto> {
        let bytes = serde_json::to_vec(v).map_err(write_err)?;
        let durable = matches!(durability, redb::Durability::Immediate);
        let f = move |db: &Database| -> Result<(), redb::Error> {
            let mut tx = db.begin_write()?;
            tx.set_durability(durability)
                .map_err(|e| redb::Error::Corrupted(e.to_string()))?;
            {
                let mut t = tx.open_table(META)?;
                t.insert(key, bytes.as_slice())?;
            }
            tx.commit()?;
            Ok(())
        };
        if durable {
            self.write(f).await
        } else {
            self.jobs
                .send(Job::Other(Box::new(f), None))
                .map_err(|_| write_err(std::io::Error::other("the log writer has stopped")))
        }
    }

    /// Removes the entries with an index in `range`, on disk and pending.
    async fn remove(&self, range: (std::ops::Bound<u64>, std::ops::Bound<u64>)) -> Result<(), Sto> {
        self.pending
            .lock()
            .expect("not poisoned")
            .retain(|k, _| !range.contains(k));
        self.write(move |db| {
            let tx = db.begin_write()?;
            {
                let mut t = tx.open_table(LOG)?;
                t.retain_in(range, |_, _| false)?;
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    fn meta<T: for<'de> Deserialize<'de>>(&self, key: &str) -> Result<Option<T>, Sto> {
        let tx = self.db.begin_read().map_err(read_err)?;
        let t = tx.open_table(META).map_err(read_err)?;
        let Some(v) = t.get(key).map_err(read_err)? else {
            return Ok(None);
        };
        serde_json::from_slice(v.value())
            .map(Some)
            .map_err(read_err)
    }

    fn last_entry(&self) -> Result<Option<Entry<TypeConfig>>, Sto> {
        let tx = self.db.begin_read().map_err(read_err)?;
        let t = tx.open_table(LOG).map_err(read_err)?;
        match t.last().map_err(read_err)? {
            Some((_, v)) => postcard::from_bytes(v.value()).map(Some).map_err(read_err),
            None => Ok(None),
        }
    }

    /// Decodes every entry and the metadata (at open).
    fn check(&self) -> Result<(), Sto> {
        let tx = self.db.begin_read().map_err(read_err)?;
        let t = tx.open_table(LOG).map_err(read_err)?;
        for row in t.iter().map_err(read_err)? {
            let (k, v) = row.map_err(read_err)?;
            let e: Entry<TypeConfig> = postcard::from_bytes(v.value()).map_err(read_err)?;
            if e.log_id.index != k.value() {
                return Err(read_err(std::io::Error::other(format!(
                    "entry {} stored under index {}",
                    e.log_id.index,
                    k.value()
                ))));
            }
        }
        self.meta::<Vote<u64>>(VOTE)?;
        self.meta::<LogId<u64>>(COMMITTED)?;
        self.meta::<LogId<u64>>(PURGED)?;
        Ok(())
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, Sto> {
        let bounds = (range.start_bound().cloned(), range.end_bound().cloned());
        // Pending entries first, then the disk: one the writer commits in
        // between is then on disk (copying them after the disk read could
        // miss it in both).
        let pending: Vec<(u64, Arc<Vec<u8>>)> = self
            .pending
            .lock()
            .expect("not poisoned")
            .range(bounds)
            .map(|(k, (_, b))| (*k, b.clone()))
            .collect();
        let tx = self.db.begin_read().map_err(read_err)?;
        let t = tx.open_table(LOG).map_err(read_err)?;
        let mut rows: BTreeMap<u64, Entry<TypeConfig>> = BTreeMap::new();
        for row in t.range::<u64>(bounds).map_err(read_err)? {
            let (k, v) = row.map_err(read_err)?;
            rows.insert(
                k.value(),
                postcard::from_bytes(v.value()).map_err(read_err)?,
            );
        }
        for (k, b) in pending {
            rows.insert(k, postcard::from_bytes(&b).map_err(read_err)?);
        }
        Ok(rows.into_values().collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, Sto> {
        let last_purged_log_id = self.meta::<LogId<u64>>(PURGED)?;
        let pending_last = self
            .pending
            .lock()
            .expect("not poisoned")
            .last_key_value()
            .map(|(_, (id, _))| *id);
        let last_log_id = pending_last
            .or(self.last_entry()?.map(|e| e.log_id))
            .or(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), Sto> {
        self.put_meta_with(VOTE, vote, redb::Durability::Immediate)
            .await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, Sto> {
        self.meta(VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<u64>>) -> Result<(), Sto> {
        // Only a hint for a faster restart (openraft re-derives what is
        // committed from a quorum): no fsync of its own, on disk with the
        // next log append.
        let bytes = serde_json::to_vec(&committed).map_err(write_err)?;
        self.jobs
            .send(Job::Committed(bytes))
            .map_err(|_| write_err(std::io::Error::other("the log writer has stopped")))
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<u64>>, Sto> {
        Ok(self.meta::<Option<LogId<u64>>>(COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), Sto>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut rows = Vec::new();
        for e in entries {
            let bytes = Arc::new(postcard::to_allocvec(&e).map_err(write_err)?);
            rows.push((e.log_id, bytes));
        }
        {
            let mut p = self.pending.lock().expect("not poisoned");
            for (id, b) in &rows {
                p.insert(id.index, (*id, b.clone()));
            }
        }
        // The writer commits it (immediate durability) and then calls
        // back: openraft counts it as flushed only then.
        self.jobs
            .send(Job::Append(rows, callback))
            .map_err(|_| write_err(std::io::Error::other("the log writer has stopped")))
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> Result<(), Sto> {
        use std::ops::Bound;
        self.remove((Bound::Included(log_id.index), Bound::Unbounded))
            .await
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> Result<(), Sto> {
        use std::ops::Bound;
        // Record the purge point first: a crash in between leaves extra
        // entries, never a gap.
        self.put_meta_with(PURGED, &log_id, redb::Durability::Immediate)
            .await?;
        self.remove((Bound::Unbounded, Bound::Included(log_id.index)))
            .await
    }
}

/// A snapshot's metadata.
type Meta = SnapshotMeta<u64, BasicNode>;

/// What a snapshot holds besides its metadata.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct MachineState {
    catalog: Catalog,
    last_applied: Option<LogId<u64>>,
    membership: StoredMembership<u64, BasicNode>,
}

/// The state machine: the catalog, applied in log order.
#[derive(Clone)]
pub struct StateMachine {
    db: Arc<Database>,
    state: Arc<RwLock<MachineState>>,
    /// The catalog's last applied index, for blocking queries.
    applied: Arc<tokio::sync::watch::Sender<u64>>,
}

impl StateMachine {
    /// The machine as of the last persisted snapshot.
    fn load(db: Arc<Database>) -> Result<Self, Sto> {
        let sm = StateMachine {
            db,
            state: Arc::default(),
            applied: Arc::new(tokio::sync::watch::Sender::new(0)),
        };
        if let Some((_, data)) = sm.stored_snapshot()? {
            let s: MachineState = postcard::from_bytes(&data).map_err(read_err)?;
            *sm.state.write().expect("not poisoned") = s;
            sm.publish();
        }
        Ok(sm)
    }

    /// Wakes blocking readers: the catalog changed.
    fn publish(&self) {
        let last = self
            .state
            .read()
            .expect("not poisoned")
            .catalog
            .last_applied();
        self.applied.send_replace(last);
    }

    /// Follows the catalog's last applied index (blocking queries wait on
    /// it).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.applied.subscribe()
    }

    /// Reads the catalog (for the HTTP side).
    pub fn read<T>(&self, f: impl FnOnce(&Catalog) -> T) -> T {
        f(&self.state.read().expect("not poisoned").catalog)
    }

    fn stored_snapshot(&self) -> Result<Option<(Meta, Vec<u8>)>, Sto> {
        let tx = self.db.begin_read().map_err(read_err)?;
        let t = tx.open_table(META).map_err(read_err)?;
        let (Some(meta), Some(data)) = (
            t.get(SNAPSHOT_META).map_err(read_err)?,
            t.get(SNAPSHOT_DATA).map_err(read_err)?,
        ) else {
            return Ok(None);
        };
        let meta = serde_json::from_slice(meta.value()).map_err(read_err)?;
        Ok(Some((meta, data.value().to_vec())))
    }

    fn store_snapshot(&self, meta: &SnapshotMeta<u64, BasicNode>, data: &[u8]) -> Result<(), Sto> {
        let meta = serde_json::to_vec(meta).map_err(write_err)?;
        let tx = self.db.begin_write().map_err(write_err)?;
        {
            let mut t = tx.open_table(META).map_err(write_err)?;
            t.insert(SNAPSHOT_META, meta.as_slice())
                .map_err(write_err)?;
            t.insert(SNAPSHOT_DATA, data).map_err(write_err)?;
        }
        tx.commit().map_err(write_err)
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, Sto> {
        // Serialised under the read lock: a consistent view while writes
        // wait (openraft#507).
        let (data, last_log_id, last_membership) = {
            let s = self.state.read().expect("not poisoned");
            (
                postcard::to_allocvec(&*s).map_err(write_err)?,
                s.last_applied,
                s.membership.clone(),
            )
        };
        let snapshot_id = match last_log_id {
            Some(id) => format!("{}-{}-{}", id.leader_id.term, id.index, data.len()),
            None => format!("empty-{}", data.len()),
        };
        let meta = SnapshotMeta {
            last_log_id,
            last_membership,
            snapshot_id,
        };
        self.store_snapshot(&meta, &data)?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<u64>>, StoredMembership<u64, BasicNode>), Sto> {
        let s = self.state.read().expect("not poisoned");
        Ok((s.last_applied, s.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, Sto>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut out = Vec::new();
        let mut s = self.state.write().expect("not poisoned");
        for e in entries {
            s.last_applied = Some(e.log_id);
            out.push(match e.payload {
                EntryPayload::Blank => Ok(Outcome::Done),
                EntryPayload::Normal(req) => s.catalog.apply(e.log_id.index, req.now, req.cmd),
                EntryPayload::Membership(m) => {
                    s.membership = StoredMembership::new(Some(e.log_id), m);
                    Ok(Outcome::Done)
                }
            });
        }
        drop(s);
        self.publish();
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, Sto> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), Sto> {
        let data = snapshot.into_inner();
        let s: MachineState = postcard::from_bytes(&data).map_err(read_err)?;
        self.store_snapshot(meta, &data)?;
        *self.state.write().expect("not poisoned") = s;
        self.publish();
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, Sto> {
        Ok(self.stored_snapshot()?.map(|(meta, data)| Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::testing::{StoreBuilder, Suite};

    struct Builder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
        async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), Sto> {
            let dir = tempfile::TempDir::new().map_err(write_err)?;
            let (log, sm) = open(dir.path()).map_err(write_err)?;
            Ok((dir, log, sm))
        }
    }

    #[test]
    fn passes_openraft_storage_suite() {
        Suite::test_all(Builder).unwrap();
    }

    fn entry(term: u64, index: u64, payload: EntryPayload<TypeConfig>) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(term, 1), index),
            payload,
        }
    }

    fn kv_put(key: &str) -> EntryPayload<TypeConfig> {
        EntryPayload::Normal(super::super::Request {
            now: std::time::Duration::from_secs(1),
            cmd: crate::catalog::Command::KvSet(crate::catalog::KvSet {
                key: key.into(),
                value: b"v".to_vec(),
                flags: 0,
                cas: None,
                acquire: None,
                release: None,
            }),
        })
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    /// Appends without openraft: `LogFlushed` has no public constructor, so
    /// this writes the table as `append` does.
    fn append(log: &LogStore, entries: &[Entry<TypeConfig>]) {
        let tx = log.db.begin_write().unwrap();
        {
            let mut t = tx.open_table(LOG).unwrap();
            for e in entries {
                t.insert(e.log_id.index, postcard::to_allocvec(e).unwrap().as_slice())
                    .unwrap();
            }
        }
        tx.commit().unwrap();
    }

    #[test]
    fn a_reopened_store_has_its_vote_log_and_snapshot() {
        let dir = tempfile::TempDir::new().unwrap();
        block_on(async {
            let (mut log, mut sm) = open(dir.path()).unwrap();
            log.save_vote(&Vote::new(3, 1)).await.unwrap();
            let entries = vec![
                entry(3, 1, EntryPayload::Blank),
                entry(3, 2, kv_put("a")),
                entry(3, 3, kv_put("b")),
            ];
            append(&log, &entries);
            let out = sm.apply(entries[..2].to_vec()).await.unwrap();
            assert_eq!(out[1], Ok(Outcome::Bool(true)));
            let snap = sm
                .get_snapshot_builder()
                .await
                .build_snapshot()
                .await
                .unwrap();
            assert_eq!(snap.meta.last_log_id.map(|l| l.index), Some(2));
            log.purge(entries[0].log_id).await.unwrap();
        });
        // Everything acknowledged is there after a reopen.
        block_on(async {
            let (mut log, mut sm) = open(dir.path()).unwrap();
            assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(3, 1)));
            let state = log.get_log_state().await.unwrap();
            assert_eq!(state.last_purged_log_id.map(|l| l.index), Some(1));
            assert_eq!(state.last_log_id.map(|l| l.index), Some(3));
            let rest = log.try_get_log_entries(0..10).await.unwrap();
            assert_eq!(
                rest.iter().map(|e| e.log_id.index).collect::<Vec<_>>(),
                [2, 3]
            );
            // The machine restarts from its snapshot: "a" applied, "b" to replay.
            let (applied, _) = sm.applied_state().await.unwrap();
            assert_eq!(applied.map(|l| l.index), Some(2));
            assert!(sm.read(|c| c.kv_get("a").is_some() && c.kv_get("b").is_none()));
            sm.apply(rest[1..].to_vec()).await.unwrap();
            assert!(sm.read(|c| c.kv_get("b").is_some()));
            assert!(sm.get_current_snapshot().await.unwrap().is_some());
        });
    }

    #[test]
    fn a_damaged_store_is_a_clear_error() {
        // Not a redb file at all.
        let dir = tempfile::TempDir::new().unwrap();
        std::fs::write(dir.path().join("raft.redb"), b"this is not a database").unwrap();
        let err = open(dir.path()).err().expect("garbage must not open");
        assert!(matches!(err, StoreError::Open { .. }), "{err}");
        assert!(err.to_string().contains("raft.redb"), "{err}");
        // A real redb file whose log entry does not decode.
        let dir = tempfile::TempDir::new().unwrap();
        {
            let (log, _) = open(dir.path()).unwrap();
            let tx = log.db.begin_write().unwrap();
            {
                let mut t = tx.open_table(LOG).unwrap();
                t.insert(1u64, &[0xffu8, 0xff, 0xff][..]).unwrap();
            }
            tx.commit().unwrap();
        }
        let err = open(dir.path()).err().expect("a bad entry must not open");
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("damaged"), "{err}");
        // A truncated file.
        let dir = tempfile::TempDir::new().unwrap();
        {
            let (log, _) = open(dir.path()).unwrap();
            append(&log, &[entry(1, 1, kv_put("x"))]);
        }
        let path = dir.path().join("raft.redb");
        let len = std::fs::metadata(&path).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len / 3).unwrap();
        drop(f);
        assert!(open(dir.path()).is_err(), "a truncated store must not open");
    }
}
