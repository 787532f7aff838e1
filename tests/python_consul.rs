//! python-consul 0.7.1 (Debian's `python3-consul`, what Patroni uses),
//! unchanged, against `tomo agent -dev`: KV with CAS, blocking reads,
//! sessions with Patroni's parameters, locks, the NotFound a renew of
//! an unknown session must raise, agent services, catalog and health with
//! `near`, coordinates and prepared queries.
//!
//! Skips with a message when the package is missing; CI sets
//! `TOMO_REQUIRE_EXTERNAL=1` (and installs it) to make that a failure.
//! `TOMO_SYSTEM_PYTHON` picks the interpreter (default `/usr/bin/python3`,
//! where Debian's package lives).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

const SCRIPT: &str = r#"
import sys, time, consul
host, port = sys.argv[1], int(sys.argv[2])
c = consul.Consul(host=host, port=port)

# KV, CAS, flags
assert c.kv.put('svc/config', 'v1', flags=3) is True
idx, v = c.kv.get('svc/config')
assert v['Value'] == b'v1' and v['Flags'] == 3, v
assert int(idx) == v['ModifyIndex'], (idx, v)
assert c.kv.put('svc/config', 'v2', cas=v['ModifyIndex']) is True
assert c.kv.put('svc/config', 'v3', cas=v['ModifyIndex']) is False
assert c.kv.put('svc/new', 'x', cas=0) is True
assert c.kv.put('svc/new', 'y', cas=0) is False
idx, keys = c.kv.get('svc/', keys=True)
assert keys == ['svc/config', 'svc/new'], keys
idx, missing = c.kv.get('nope')
assert missing is None and int(idx) >= 1

# A blocking read with nothing changing returns after the wait.
idx, v = c.kv.get('svc/config')
t = time.time()
idx2, v2 = c.kv.get('svc/config', index=idx, wait='1s')
assert time.time() - t >= 0.9 and idx2 == idx, (idx, idx2)

# Patroni's session and leader lock.
sid = c.session.create(name='patroni', ttl=15, behavior='delete', lock_delay=0.001)
assert c.kv.put('service/pg/leader', 'node1', acquire=sid) is True
other = c.session.create(name='other')
assert c.kv.put('service/pg/leader', 'node2', acquire=other) is False
idx, v = c.kv.get('service/pg/leader')
assert v['Session'] == sid, v
idx, s = c.session.info(sid)
assert s['Behavior'] == 'delete' and s['TTL'] == '15s', s
c.session.renew(sid)
try:
    c.session.renew('00000000-0000-4000-8000-000000000000')
    raise SystemExit('renew of an unknown session did not raise NotFound')
except consul.NotFound:
    pass
assert c.session.destroy(sid) is True
idx, v = c.kv.get('service/pg/leader')
assert v is None, v
assert c.kv.delete('svc/', recurse=True) is True
idx, gone = c.kv.get('svc/', recurse=True)
assert gone is None

# Agent services and checks, as Patroni registers itself.
assert c.agent.service.register('web', service_id='web-1', port=8080, tags=['v1'],
                                check=consul.Check.ttl('10s')) is True
svcs = c.agent.services()
assert svcs['web-1']['Port'] == 8080 and svcs['web-1']['Tags'] == ['v1'], svcs
assert c.agent.checks()['service:web-1']['Status'] == 'critical'
c.agent.check.ttl_pass('service:web-1', notes='ok')
assert c.agent.checks()['service:web-1']['Status'] == 'passing'
idx, healthy = c.health.service('web', passing=True, near='_agent')
assert [h['Service']['ID'] for h in healthy] == ['web-1'], healthy

# The catalog, with a node that has no coordinate: near puts it last.
assert c.catalog.register('far', '10.9.9.9', service={'service': 'web', 'port': 80}) is True
idx, inst = c.catalog.service('web', near='_agent')
assert [i['Node'] for i in inst] == ['py', 'far'], inst
# A source without a coordinate leaves the order as it is (by name).
idx, nodes = c.catalog.nodes(near='far')
assert [n['Node'] for n in nodes] == ['far', 'py'], nodes

# Coordinates: this agent's own, and the servers' by datacenter.
idx, coords = c.coordinate.nodes()
assert [x['Node'] for x in coords] == ['py'] and len(coords[0]['Coord']['Vec']) == 8, coords
dcs = c.coordinate.datacenters()
assert dcs[0]['Datacenter'] == 'dc1' and [x['Node'] for x in dcs[0]['Coordinates']] == ['py'], dcs
# Prepared queries. python-consul always sends a name_prefix_match
# template, so (as on Consul) the query runs by name, not by ID.
q = c.query.create('web', name='web', nearestn=2, onlypassing=False, ttl='10s')
qid = q['ID']
got = c.query.get(qid)
assert got[0]['Name'] == 'web' and got[0]['Service']['Service'] == 'web', got
assert got[0]['Template']['Type'] == 'name_prefix_match', got
assert got[0]['Service']['Failover']['NearestN'] == 2, got
assert [x['ID'] for x in c.query.list()] == [qid]
r = c.query.execute('web', near='_agent')
assert r['Service'] == 'web' and r['Datacenter'] == 'dc1' and r['Failovers'] == 0, r
assert [n['Node']['Node'] for n in r['Nodes']] == ['py', 'far'], r
assert r['DNS']['TTL'] == '10s', r
r = c.query.execute('web-anything', limit=1)
assert len(r['Nodes']) == 1, r
assert c.query.explain('web')['Query']['ID'] == qid
try:
    c.query.execute(qid)
    raise SystemExit('a template ran by ID')
except consul.ConsulException:
    pass
assert c.query.update(qid, 'web', name='web', onlypassing=True) is True
assert c.query.get(qid)[0]['Service']['OnlyPassing'] is True
assert c.query.delete(qid) is True
assert c.query.list() == []

assert c.agent.service.deregister('web-1') is True
assert 'web-1' not in c.agent.services()
print('python-consul ok')
"#;

fn python() -> String {
    std::env::var("TOMO_SYSTEM_PYTHON").unwrap_or_else(|_| "/usr/bin/python3".into())
}

fn has_consul(py: &str) -> bool {
    Command::new(py)
        .args(["-c", "import consul"])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn python_consul_kv_sessions_and_locks() {
    let py = python();
    if !has_consul(&py) {
        let msg = format!("{py} cannot import consul (apt-get install python3-consul)");
        if std::env::var("TOMO_REQUIRE_EXTERNAL").is_ok_and(|v| v == "1") {
            panic!("TOMO_REQUIRE_EXTERNAL=1: {msg}");
        }
        eprintln!("skipping: {msg} (set TOMO_REQUIRE_EXTERNAL=1 to make this a failure)");
        return;
    }
    let dir = tempfile::TempDir::new().unwrap();
    let mut agent = Command::new(env!("CARGO_BIN_EXE_tomo"))
        .args([
            "agent",
            "-dev",
            "-node",
            "py",
            "-http-port",
            "0",
            "-serf-lan-port",
            "0",
            "-dns-port",
            "0",
        ])
        .args(["-data-dir", dir.path().to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tomo agent -dev");
    // "tomo agent py: gossip on …, HTTP on http://ADDR (log level …)"
    let mut stderr = BufReader::new(agent.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no HTTP address in {line:?}"))
        .to_string();
    let (host, port) = addr.rsplit_once(':').unwrap();
    // Give the single server its election and the node its registration.
    let mut out = None;
    for _ in 0..20 {
        let o = Command::new(&py)
            .args(["-c", SCRIPT, host, port])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&o.stderr).into_owned();
        if o.status.success() || !text.contains("Missing node registration") {
            out = Some(o);
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let _ = agent.kill();
    let _ = agent.wait();
    let o = out.expect("python-consul never got past node registration");
    assert!(
        o.status.success(),
        "python-consul failed:\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("python-consul ok"));
}
