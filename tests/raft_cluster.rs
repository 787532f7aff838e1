//! Three registry servers (openraft + redb on disk, peer RPC on loopback
//! TCP) in one process: writes through a follower, the leader stopped
//! mid-stream, a new leader, every acknowledged write still there, and the
//! stopped server back from its data dir.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tomo::catalog::{Command, KvSet, Outcome};
use tomo::raft::Request;
use tomo::server::{Server, ServerConfig};

fn put(key: &str) -> Request {
    Request {
        now: Duration::from_secs(1),
        cmd: Command::KvSet(KvSet {
            key: key.into(),
            value: key.as_bytes().to_vec(),
            flags: 0,
            cas: None,
            acquire: None,
            release: None,
        }),
    }
}

async fn eventually<F, Fut>(limit: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cond().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_loss_keeps_every_acknowledged_write_and_a_restart_keeps_its_state() {
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::TempDir::new().unwrap()).collect();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut servers: Vec<Option<Server>> = Vec::new();
    for (i, d) in dirs.iter().enumerate() {
        let cfg = ServerConfig::new(i as u64 + 1, any, d.path().to_path_buf());
        servers.push(Some(Server::start(cfg).await.unwrap()));
    }
    let addrs: Vec<SocketAddr> = servers
        .iter()
        .map(|s| s.as_ref().unwrap().rpc_addr)
        .collect();
    let members: BTreeMap<u64, SocketAddr> = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| (i as u64 + 1, *a))
        .collect();
    servers[0]
        .as_ref()
        .unwrap()
        .initialize(members)
        .await
        .unwrap();
    let s = &servers;
    assert!(
        eventually(Duration::from_secs(10), || async move {
            let mut leaders = Vec::new();
            for x in s.iter().flatten() {
                leaders.push(x.leader().await);
            }
            leaders.iter().all(|l| l.is_some() && *l == leaders[0])
        })
        .await,
        "no leader agreed on"
    );

    // Writes through the last server (a follower unless it won): each is
    // acknowledged only once committed.
    let mut acked = Vec::new();
    for i in 0..30 {
        let key = format!("k{i:02}");
        let r = servers[2].as_ref().unwrap().write(put(&key)).await.unwrap();
        assert_eq!(r, Ok(Outcome::Bool(true)));
        acked.push(key);
    }

    // Stop the leader.
    let leader = servers[0].as_ref().unwrap().leader().await.unwrap();
    let li = (leader - 1) as usize;
    servers[li].take().unwrap().stop().await;
    let s = &servers;
    assert!(
        eventually(Duration::from_secs(10), || async move {
            let mut ok = true;
            for x in s.iter().flatten() {
                ok &= x.leader().await.is_some_and(|l| l != leader);
            }
            ok
        })
        .await,
        "no new leader after stopping {leader}"
    );
    let other = (0..3).find(|&i| i != li).unwrap();
    for i in 30..50 {
        let key = format!("k{i:02}");
        let r = servers[other]
            .as_ref()
            .unwrap()
            .write(put(&key))
            .await
            .unwrap();
        assert_eq!(r, Ok(Outcome::Bool(true)));
        acked.push(key);
    }
    // Every acknowledged write is on the new leader.
    let new_leader = servers[other].as_ref().unwrap().leader().await.unwrap();
    let nl = servers[(new_leader - 1) as usize].as_ref().unwrap();
    let missing: Vec<String> = nl
        .read_consistent(|c| {
            acked
                .iter()
                .filter(|k| c.kv_get(k).is_none())
                .cloned()
                .collect()
        })
        .await
        .unwrap();
    assert!(missing.is_empty(), "lost writes: {missing:?}");

    // The old leader restarts from its data dir at its old address: what it
    // had is there at once, and it catches up with the rest.
    let cfg = ServerConfig::new(leader, addrs[li], dirs[li].path().to_path_buf());
    let back = Server::start(cfg).await.unwrap();
    // It had applied the first 30 writes (it led when they were
    // acknowledged): they are back before any catch-up, replayed from its
    // log up to the commit point it stored.
    let first: Vec<&String> = acked[..30].iter().collect();
    let missing_now: Vec<&&String> =
        back.read(|c| first.iter().filter(|k| c.kv_get(k).is_none()).collect());
    assert!(
        missing_now.is_empty(),
        "after restart, missing {missing_now:?}"
    );
    let target = nl.applied();
    let b = &back;
    assert!(
        eventually(
            Duration::from_secs(10),
            || async move { b.applied() >= target }
        )
        .await,
        "the restarted server did not catch up: {} < {target}",
        back.applied()
    );
    let missing: Vec<String> = back.read(|c| {
        acked
            .iter()
            .filter(|k| c.kv_get(k).is_none())
            .cloned()
            .collect()
    });
    assert!(missing.is_empty(), "restarted server lacks {missing:?}");
    back.stop().await;
    for s in servers.into_iter().flatten() {
        s.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_compact_the_log_and_bring_a_new_server_up_to_date() {
    let dirs: Vec<tempfile::TempDir> = (0..4).map(|_| tempfile::TempDir::new().unwrap()).collect();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let cfg = |i: usize| {
        let mut c = ServerConfig::new(i as u64 + 1, any, dirs[i].path().to_path_buf());
        // Snapshot every 20 entries, keep 5 behind it.
        c.snapshot_threshold = 20;
        c.trailing_logs = 5;
        c
    };
    let mut servers = Vec::new();
    for i in 0..3 {
        servers.push(Server::start(cfg(i)).await.unwrap());
    }
    let members: BTreeMap<u64, SocketAddr> = servers.iter().map(|s| (s.id, s.rpc_addr)).collect();
    servers[0].initialize(members).await.unwrap();
    let s = &servers;
    assert!(
        eventually(Duration::from_secs(10), || async move {
            s[0].leader().await.is_some()
        })
        .await
    );
    // One at a time: each write is its own log entry.
    for k in 0..100 {
        let r = servers[k % 3]
            .write(put(&format!("k{k:03}")))
            .await
            .unwrap();
        assert_eq!(r, Ok(Outcome::Bool(true)));
    }
    // Every server snapshotted and purged its log behind the snapshot.
    assert!(
        eventually(Duration::from_secs(10), || async move {
            s.iter().all(|x| {
                let (snap, purged) = x.snapshot_state();
                snap.is_some_and(|i| i >= 80) && purged.is_some_and(|p| p >= 60)
            })
        })
        .await,
        "{:?}",
        servers
            .iter()
            .map(|x| x.snapshot_state())
            .collect::<Vec<_>>()
    );
    // A new server can no longer catch up from the log alone: it gets the
    // leader's snapshot, then the rest.
    let fresh = Server::start(cfg(3)).await.unwrap();
    let leader_id = servers[0].leader().await.unwrap();
    let leader = servers.iter().find(|x| x.id == leader_id).unwrap();
    leader.add_voter(fresh.id, fresh.rpc_addr).await.unwrap();
    let f = &fresh;
    assert!(
        eventually(Duration::from_secs(10), || async move {
            f.read(|c| (0..100).all(|k| c.kv_get(&format!("k{k:03}")).is_some()))
        })
        .await,
        "the new server did not get every key"
    );
    assert!(
        fresh.snapshot_state().0.is_some(),
        "installed from a snapshot"
    );
    assert_eq!(leader.configuration().0.len(), 4);
    // It is a voter that counts: writes still commit with one old server
    // stopped.
    let other = servers.iter().find(|x| x.id != leader_id).unwrap();
    other.stop().await;
    assert_eq!(
        leader.write(put("after")).await.unwrap(),
        Ok(Outcome::Bool(true))
    );
    assert!(
        eventually(Duration::from_secs(5), || async move {
            f.read(|c| c.kv_get("after").is_some())
        })
        .await
    );
}
