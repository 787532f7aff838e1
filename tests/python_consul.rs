//! python-consul 0.7.1 (Debian's `python3-consul`, what Patroni uses),
//! unchanged, against `tomo agent -dev`, one script per area, each checking
//! the content of every answer, not just that nothing raised:
//!
//! - Patroni's path: KV with CAS, a blocking read, sessions with Patroni's
//!   parameters, locks, the NotFound a renew of an unknown session must
//!   raise, agent services, catalog and health with `near`, coordinates
//!   and prepared queries;
//! - KV: every parameter python-consul sends (`recurse`, `keys` with
//!   `separator`, `cas`, `flags`, `acquire`/`release`, recursive and CAS
//!   deletes, `consistent`/`stale`, `dc`, `token`) and blocking reads;
//! - sessions: every create field, destroy, renew, info, node, list, and
//!   blocking reads of all three;
//! - the agent: self, members (LAN and WAN), join (GET, as python-consul
//!   sends it) of a second agent, node and service maintenance, services
//!   with HTTP, TCP and TTL checks, IDs with `/` (Patroni's), checks
//!   registered on their own and driven with pass/warn/fail and a note;
//! - catalog and health: register/deregister of nodes, services and
//!   checks, datacenters, nodes/services/node/service with `tag` and
//!   `near`, health service/checks/state/node with `passing`, `tag` and
//!   `near`, and blocking reads;
//! - status, `operator raft configuration` and coordinates (with a
//!   blocking read released by a coordinate update).
//!
//! Not covered because tomo does not implement them: `event.fire`/
//! `event.list`, `agent.force_leave`, the legacy `acl.*` (removed from
//! Consul 1.11).
//!
//! Skips with a message when the package is missing; CI sets
//! `TOMO_REQUIRE_EXTERNAL=1` (and installs it) to make that a failure.
//! `TOMO_SYSTEM_PYTHON` picks the interpreter (default `/usr/bin/python3`,
//! where Debian's package lives).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{free_tcp, free_udp, json};

/// What every script starts with: the client for the agent named on the
/// command line (`host port node`), and helpers for blocking reads.
const PRELUDE: &str = r#"
import sys, time, json, threading, consul, requests
host, port, node = sys.argv[1], int(sys.argv[2]), sys.argv[3]
c = consul.Consul(host=host, port=port)
base = 'http://%s:%d' % (host, port)

def released(call, change):
    """Runs the blocking `call` while `change` runs 0.3 s later on another
    thread: the call must come back because of the change, well before its
    wait is over."""
    th = threading.Thread(target=lambda: (time.sleep(0.3), change()))
    th.start()
    t = time.time()
    r = call()
    th.join()
    el = time.time() - t
    assert 0.25 <= el < 8, ('blocking call returned after', el)
    return r

def held(call, secs):
    """A blocking call with nothing changing: it waits out its wait."""
    t = time.time()
    r = call()
    el = time.time() - t
    assert el >= secs * 0.9, ('blocking call returned early', el)
    return r

def coordinate(n, x):
    """Gives node `n` a LAN coordinate (python-consul has no call for it)."""
    r = requests.put(base + '/v1/coordinate/update', data=json.dumps(
        {'Node': n, 'Coord': {'Vec': [x, 0, 0, 0, 0, 0, 0, 0], 'Error': 0.2,
                              'Adjustment': 0, 'Height': 1e-05}}))
    assert r.status_code == 200, r.text
"#;

const PATRONI_PATH: &str = r#"

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
const KV: &str = r#"
# put: plain, flags, bytes, empty; get: one key, recurse, keys, separator.
assert c.kv.put('app/a', 'one') is True
assert c.kv.put('app/b/c', 'two', flags=42) is True
assert c.kv.put('app/b/d', b'\x00\xff') is True
assert c.kv.put('app/empty', '') is True
idx, v = c.kv.get('app/a')
assert v['Key'] == 'app/a' and v['Value'] == b'one' and v['Flags'] == 0, v
assert v['LockIndex'] == 0 and 'Session' not in v and v['CreateIndex'] == v['ModifyIndex'], v
assert int(idx) == v['ModifyIndex'], (idx, v)
idx, v = c.kv.get('app/b/c')
assert v['Value'] == b'two' and v['Flags'] == 42, v
assert c.kv.get('app/b/d')[1]['Value'] == b'\x00\xff'
# An empty value is null on the wire, None here.
assert c.kv.get('app/empty')[1]['Value'] is None
idx, vs = c.kv.get('app/', recurse=True)
assert [x['Key'] for x in vs] == ['app/a', 'app/b/c', 'app/b/d', 'app/empty'], vs
assert [x['Value'] for x in vs] == [b'one', b'two', b'\x00\xff', None], vs
idx, keys = c.kv.get('app/', keys=True)
assert keys == ['app/a', 'app/b/c', 'app/b/d', 'app/empty'], keys
idx, keys = c.kv.get('app/', keys=True, separator='/')
assert keys == ['app/a', 'app/b/', 'app/empty'], keys
idx, keys = c.kv.get('', keys=True)
assert keys == ['app/a', 'app/b/c', 'app/b/d', 'app/empty'], keys
# Absent: None, with an index all the same.
for args in [('nope',), ('nope/',)]:
    idx, gone = c.kv.get(*args)
    assert gone is None and int(idx) >= 1, (args, idx, gone)
assert c.kv.get('nope/', recurse=True)[1] is None
assert c.kv.get('nope/', keys=True)[1] is None

# Consistency modes, dc and token are accepted and change nothing here.
for kw in [dict(consistency='consistent'), dict(consistency='stale'), dict(dc='dc1'),
           dict(token='anything')]:
    assert c.kv.get('app/a', **kw)[1]['Value'] == b'one', kw
both = consul.Consul(host=host, port=port, consistency='stale')
assert both.kv.get('app/a')[1]['Value'] == b'one'
try:
    c.kv.get('app/a', dc='elsewhere')
    raise SystemExit('an unknown dc did not fail')
except consul.ConsulException as e:
    assert 'No path to datacenter' in str(e), e

# CAS: create-only, stale index, current index.
assert c.kv.put('app/a', 'x', cas=0) is False
idx, v = c.kv.get('app/a')
assert c.kv.put('app/a', 'x', cas=v['ModifyIndex'] + 1000) is False
assert c.kv.put('app/a', 'uno', cas=v['ModifyIndex']) is True
idx, v2 = c.kv.get('app/a')
assert v2['Value'] == b'uno' and v2['ModifyIndex'] > v['ModifyIndex'] and v2['CreateIndex'] == v['CreateIndex'], v2

# Locks: acquire, another session is refused, release by the holder only.
s1 = c.session.create(name='kv-1')
s2 = c.session.create(name='kv-2')
assert c.kv.put('app/lock', 'held', acquire=s1) is True
idx, v = c.kv.get('app/lock')
assert v['Session'] == s1 and v['LockIndex'] == 1 and v['Value'] == b'held', v
assert c.kv.put('app/lock', 'mine', acquire=s2) is False
assert c.kv.put('app/lock', 'again', acquire=s1) is True
assert c.kv.get('app/lock')[1]['LockIndex'] == 1
assert c.kv.put('app/lock', 'x', release=s2) is False
assert c.kv.put('app/lock', 'free', release=s1) is True
idx, v = c.kv.get('app/lock')
assert 'Session' not in v and v['LockIndex'] == 1 and v['Value'] == b'free', v
try:
    c.kv.put('app/lock', 'x', acquire='00000000-0000-4000-8000-000000000000')
    raise SystemExit('acquire with an unknown session did not fail')
except consul.ConsulException as e:
    assert 'invalid session' in str(e), e

# Deletes: CAS 0 never deletes, a stale index does not, the current one does.
idx, v = c.kv.get('app/b/c')
assert c.kv.delete('app/b/c', cas=0) is False
assert c.kv.delete('app/b/c', cas=v['ModifyIndex'] + 1000) is False
assert c.kv.get('app/b/c')[1] is not None
assert c.kv.delete('app/b/c', cas=v['ModifyIndex']) is True
assert c.kv.get('app/b/c')[1] is None
assert c.kv.delete('app/a') is True
assert c.kv.delete('app/a') is True
assert c.kv.delete('app/', recurse=True) is True
assert c.kv.get('app/', recurse=True)[1] is None

# Blocking reads: held when nothing changes, released by a write; a
# missing key's index moves too, so a watch sees it appear.
assert c.kv.put('w/k', 'v1') is True
idx, v = c.kv.get('w/k')
idx2, v2 = held(lambda: c.kv.get('w/k', index=idx, wait='1s'), 1)
assert idx2 == idx and v2['Value'] == b'v1'
idx3, v3 = released(lambda: c.kv.get('w/k', index=idx, wait='30s'),
                    lambda: c.kv.put('w/k', 'v2'))
assert int(idx3) > int(idx) and v3['Value'] == b'v2', (idx3, v3)
idx, _ = c.kv.get('w/', recurse=True)
idx4, vs = released(lambda: c.kv.get('w/', recurse=True, index=idx, wait='30s'),
                    lambda: c.kv.put('w/new', 'n'))
assert [x['Key'] for x in vs] == ['w/k', 'w/new'], vs
idx, none = c.kv.get('w/later')
assert none is None
idx5, v5 = released(lambda: c.kv.get('w/later', index=idx, wait='30s', consistency='stale'),
                    lambda: c.kv.put('w/later', 'here'))
assert v5['Value'] == b'here', v5
print('python-consul kv ok')
"#;

const SESSIONS: &str = r#"
# Defaults: this agent's node, serfHealth, 15 s lock delay, release, no TTL.
sid = c.session.create()
idx, s = c.session.info(sid)
assert s['ID'] == sid and s['Name'] == '' and s['Node'] == node, s
assert s['NodeChecks'] == ['serfHealth'] and s['LockDelay'] == 15 * 10**9, s
assert s['Behavior'] == 'release' and s['TTL'] == '' and int(idx) >= s['CreateIndex'], s

# Every field python-consul sends: name, node, checks, lockdelay ("5s"),
# behavior, ttl ("20s").
full = c.session.create(name='full', node=node, checks=['serfHealth'], lock_delay=5,
                        behavior='delete', ttl=20, dc='dc1')
idx, s = c.session.info(full)
assert s['Name'] == 'full' and s['Node'] == node and s['NodeChecks'] == ['serfHealth'], s
assert s['LockDelay'] == 5 * 10**9 and s['Behavior'] == 'delete' and s['TTL'] == '20s', s
# An explicit empty check list replaces serfHealth.
bare = c.session.create(name='bare', checks=[], lock_delay=0)
idx, s = c.session.info(bare)
assert s['NodeChecks'] == [] and s['LockDelay'] == 0, s

# Errors: an unknown node, an unknown check.
for kw, text in [(dict(node='ghost'), 'Missing node registration'),
                 (dict(checks=['nope']), 'nope')]:
    try:
        c.session.create(**kw)
        raise SystemExit('session create %r did not fail' % kw)
    except consul.ConsulException as e:
        assert text in str(e), (kw, e)

# list and node: all three, by creation.
idx, ss = c.session.list()
assert sorted(x['ID'] for x in ss) == sorted([sid, full, bare]), ss
idx, ss = c.session.node(node)
assert sorted(x['ID'] for x in ss) == sorted([sid, full, bare]), ss
assert c.session.node('ghost')[1] == []
assert c.session.info('00000000-0000-4000-8000-000000000000')[1] is None

# renew: the session back, with its TTL; NotFound for an unknown one.
r = c.session.renew(full)
assert r['ID'] == full and r['TTL'] == '20s', r
assert c.session.renew(sid)['ID'] == sid
try:
    c.session.renew('00000000-0000-4000-8000-000000000000')
    raise SystemExit('renew of an unknown session did not raise NotFound')
except consul.NotFound:
    pass

# destroy: true, idempotent; a delete-behavior session takes its keys.
assert c.kv.put('eph', 'x', acquire=full) is True
assert c.session.destroy(full) is True
assert c.session.destroy(full) is True
assert c.session.info(full)[1] is None
assert c.kv.get('eph')[1] is None
# release behavior: the key stays, unlocked.
assert c.kv.put('kept', 'x', acquire=sid) is True
assert c.session.destroy(sid) is True
idx, v = c.kv.get('kept')
assert v['Value'] == b'x' and 'Session' not in v, v

# Blocking reads of list, node and info: held when nothing changes,
# released by a create or a destroy.
idx, ss = c.session.list()
idx2, ss2 = held(lambda: c.session.list(index=idx, wait='1s'), 1)
assert idx2 == idx and len(ss2) == len(ss) == 1, ss2
holder = {}
idx3, ss3 = released(lambda: c.session.list(index=idx, wait='30s'),
                     lambda: holder.update(id=c.session.create(name='late')))
assert int(idx3) > int(idx) and holder['id'] in [x['ID'] for x in ss3], ss3
idx, ss = c.session.node(node)
idx4, ss4 = released(lambda: c.session.node(node, index=idx, wait='30s'),
                     lambda: c.session.destroy(bare))
assert bare not in [x['ID'] for x in ss4], ss4
idx, s = c.session.info(holder['id'])
idx5, s5 = released(lambda: c.session.info(holder['id'], index=idx, wait='30s', consistency='consistent'),
                    lambda: c.session.destroy(holder['id']))
assert s5 is None, s5
print('python-consul sessions ok')
"#;

const AGENT: &str = r#"
import socket
peer_serf, peer_http = int(sys.argv[4]), int(sys.argv[5])

# self: this agent's config, member entry and coordinate.
me = c.agent.self()
assert me['Config']['NodeName'] == node and me['Config']['Datacenter'] == 'dc1', me['Config']
assert me['Config']['Server'] is True and me['Member']['Name'] == node, me
assert me['Member']['Status'] == 1 and me['Member']['Tags']['role'] == 'consul', me['Member']
assert len(me['Coord']['Vec']) == 8, me['Coord']
for k, v in me.items():
    assert v is None or isinstance(v, dict), (k, v)

# members: LAN, WAN (a server's, named node.dc).
ms = c.agent.members()
assert [m['Name'] for m in ms] == [node] and ms[0]['Addr'] == '127.0.0.1', ms
assert ms[0]['Tags']['dc'] == 'dc1' and ms[0]['Status'] == 1, ms
wan = c.agent.members(wan=True)
assert [m['Name'] for m in wan] == [node + '.dc1'] and wan[0]['Tags']['role'] == 'consul', wan

# join (python-consul sends GET): both agents then list both.
assert c.agent.join('127.0.0.1:%d' % peer_serf) is True
peer = consul.Consul(host=host, port=peer_http)
deadline = time.time() + 20
while time.time() < deadline:
    names = sorted(m['Name'] for m in c.agent.members())
    theirs = sorted(m['Name'] for m in peer.agent.members())
    if names == theirs == sorted([node, 'pypeer']):
        break
    time.sleep(0.1)
else:
    raise SystemExit('join: members %r / %r' % (names, theirs))
m = [m for m in c.agent.members() if m['Name'] == 'pypeer'][0]
assert m['Status'] == 1 and m['Port'] == peer_serf and m['Tags']['role'] == 'node', m
try:
    c.agent.join('not-an-address')
    raise SystemExit('join of a bad address did not fail')
except consul.base.BadRequest:
    pass

def wait_status(cid, want, secs=10):
    deadline = time.time() + secs
    while time.time() < deadline:
        k = c.agent.checks().get(cid)
        if k is not None and k['Status'] == want:
            return k
        time.sleep(0.1)
    raise SystemExit('%s never %s: %r' % (cid, want, c.agent.checks().get(cid)))

# Services with each check python-consul builds: HTTP (to this agent),
# TCP (to this agent's port, and to a closed one), TTL.
closed = socket.socket()
closed.bind(('127.0.0.1', 0))
closed_port = closed.getsockname()[1]
closed.close()
ok_url = base + '/v1/status/leader'
assert c.agent.service.register('api', service_id='api-1', address='127.0.0.2', port=9000,
                                tags=['a', 'b'], enable_tag_override=True,
                                check=consul.Check.http(ok_url, '1s', timeout='1s', deregister='90s')) is True
assert c.agent.service.register('bad-api', port=9001,
                                check=consul.Check.http(base + '/v1/nothing-here', '1s')) is True
assert c.agent.service.register('db', service_id='db-1', port=port,
                                check=consul.Check.tcp(host, port, '1s', timeout='1s')) is True
assert c.agent.service.register('db', service_id='db-2', port=closed_port,
                                check=consul.Check.tcp(host, closed_port, '1s')) is True
assert c.agent.service.register('cache', port=6379, tags=['x'], check=consul.Check.ttl('30s')) is True
try:
    c.agent.service.register('s', check=consul.Check.script('/bin/true', '10s'))
    raise SystemExit('a script check was taken (tomo runs none)')
except consul.base.BadRequest:
    pass
svcs = c.agent.services()
assert sorted(svcs) == ['api-1', 'bad-api', 'cache', 'db-1', 'db-2'], svcs
a = svcs['api-1']
assert a['Service'] == 'api' and a['Address'] == '127.0.0.2' and a['Port'] == 9000, a
assert a['Tags'] == ['a', 'b'] and a['Weights'] == {'Passing': 1, 'Warning': 1}, a
assert svcs['cache']['ID'] == 'cache' and svcs['cache']['Address'] == '', svcs['cache']
k = wait_status('service:api-1', 'passing')
assert k['Name'] == "Service 'api' check" and k['ServiceID'] == 'api-1' and k['ServiceName'] == 'api', k
assert '200' in k['Output'], k
k = wait_status('service:bad-api', 'critical')
assert '404' in k['Output'], k
assert 'Success' in wait_status('service:db-1', 'passing')['Output']
wait_status('service:db-2', 'critical')
k = c.agent.checks()['service:cache']
assert k['Status'] == 'critical' and k['ServiceName'] == 'cache', k
# The catalog has them too.
idx, inst = c.catalog.service('api')
assert [(i['ServiceID'], i['ServiceAddress'], i['ServicePort'], i['ServiceTags']) for i in inst] == \
    [('api-1', '127.0.0.2', 9000, ['a', 'b'])], inst
idx, hs = c.health.service('db', passing=True)
assert [h['Service']['ID'] for h in hs] == ['db-1'], hs

# TTL updates with notes (python-consul sends GET).
assert c.agent.check.ttl_pass('service:cache', 'fine') is True
k = c.agent.checks()['service:cache']
assert k['Status'] == 'passing' and k['Output'] == 'fine', k
assert c.agent.check.ttl_warn('service:cache', 'slow') is True
assert c.agent.checks()['service:cache']['Status'] == 'warning'
idx, st = c.health.state('warning')
assert [(x['CheckID'], x['Output']) for x in st] == [('service:cache', 'slow')], st
assert c.agent.check.ttl_fail('service:cache') is True
k = c.agent.checks()['service:cache']
assert k['Status'] == 'critical' and k['Output'] == '', k
assert c.agent.check.ttl_pass('no-such-check') is False

# Checks registered on their own: node-level, and on a service.
assert c.agent.check.register('disk', check=consul.Check.ttl('60s'), check_id='disk-1',
                              notes='watch the disk') is True
assert c.agent.check.register('cache-extra', check=consul.Check.ttl('60s'), service_id='cache') is True
assert c.agent.check.register('leader-up', check=consul.Check.http(ok_url, '1s')) is True
ks = c.agent.checks()
assert ks['disk-1']['Name'] == 'disk' and ks['disk-1']['ServiceID'] == '' and ks['disk-1']['Status'] == 'critical', ks
assert ks['disk-1']['Notes'] == 'watch the disk', ks
assert ks['cache-extra']['ServiceID'] == 'cache' and ks['cache-extra']['ServiceName'] == 'cache', ks
wait_status('leader-up', 'passing')
assert c.agent.check.ttl_warn('disk-1', 'filling') is True
assert c.agent.check.ttl_pass('cache-extra', 'ok') is True
idx, hn = c.health.node(node)
by_id = {x['CheckID']: x for x in hn}
assert by_id['disk-1']['Status'] == 'warning' and by_id['disk-1']['Output'] == 'filling', by_id
assert by_id['disk-1']['Notes'] == 'watch the disk', by_id
assert by_id['cache-extra']['Status'] == 'passing' and by_id['cache-extra']['ServiceID'] == 'cache', by_id
assert c.agent.check.deregister('disk-1') is True
assert 'disk-1' not in c.agent.checks()
assert 'disk-1' not in [x['CheckID'] for x in c.health.node(node)[1]]

# Patroni's IDs: `<scope>/<name>`, so its check is `service:<scope>/<name>`.
assert c.agent.service.register('pg', service_id='batman/pg0', port=5432,
                                check=consul.Check.ttl('30s')) is True
assert c.agent.check.ttl_pass('service:batman/pg0', 'up') is True
assert c.agent.checks()['service:batman/pg0']['Status'] == 'passing'
assert c.agent.service.maintenance('batman/pg0', True) is True
assert c.agent.checks()['_service_maintenance:batman/pg0']['ServiceID'] == 'batman/pg0'
assert c.agent.service.deregister('batman/pg0') is True
assert 'batman/pg0' not in c.agent.services()
assert not [k for k in c.agent.checks() if 'batman' in k], c.agent.checks()
assert c.catalog.service('pg')[1] == []

# Service maintenance: a critical check that takes the instance out of
# passing answers, until it ends.
assert c.agent.check.ttl_pass('service:cache') is True
assert len(c.health.service('cache', passing=True)[1]) == 1
assert c.agent.service.maintenance('cache', True, 'upgrade') is True
k = c.agent.checks()['_service_maintenance:cache']
assert k['Status'] == 'critical' and k['Name'] == 'Service Maintenance Mode', k
assert k['ServiceID'] == 'cache' and k['Notes'] == 'upgrade', k
assert c.health.service('cache', passing=True)[1] == []
idx, hs = c.health.service('cache')
assert '_service_maintenance:cache' in [x['CheckID'] for x in hs[0]['Checks']], hs
assert c.agent.service.maintenance('cache', False) is True
assert '_service_maintenance:cache' not in c.agent.checks()
assert len(c.health.service('cache', passing=True)[1]) == 1
assert c.agent.service.maintenance('ghost', True) is False

# Node maintenance: every instance on the node goes.
assert c.agent.maintenance(True, 'kernel') is True
k = c.agent.checks()['_node_maintenance']
assert k['Status'] == 'critical' and k['ServiceID'] == '' and k['Notes'] == 'kernel', k
assert k['Name'] == 'Node Maintenance Mode', k
assert c.health.service('cache', passing=True)[1] == []
assert c.health.service('db', passing=True)[1] == []
assert '_node_maintenance' in [x['CheckID'] for x in c.health.node(node)[1]]
assert c.agent.maintenance(False) is True
assert '_node_maintenance' not in [x['CheckID'] for x in c.health.node(node)[1]]
assert len(c.health.service('cache', passing=True)[1]) == 1
try:
    c.agent.maintenance('maybe')
    raise SystemExit('enable=maybe was taken')
except consul.base.BadRequest:
    pass

# Deregistration (GET) takes the service's checks along.
for sid in ['api-1', 'bad-api', 'cache', 'db-1', 'db-2']:
    assert c.agent.service.deregister(sid) is True, sid
assert c.agent.services() == {}
assert sorted(c.agent.checks()) == ['leader-up'], c.agent.checks()
assert set(c.catalog.services()[1]) <= {'consul'}, c.catalog.services()
print('python-consul agent ok')
"#;

const CATALOG_HEALTH: &str = r#"
assert c.catalog.datacenters() == ['dc1']

# Three nodes with a `db` instance each: a passing and a warning service
# check, and a critical node-level check (which judges every instance on
# its node). Two get coordinates; n-none has none, so `near` puts it last.
assert c.catalog.register('n-near', '10.1.0.1', dc='dc1', token='t',
                          service={'service': 'db', 'id': 'db-1', 'tags': ['primary', 'v1'], 'port': 5432},
                          check={'name': 'db alive', 'checkid': 'db-1-alive', 'serviceid': 'db-1',
                                 'status': 'passing'}) is True
assert c.catalog.register('n-far', '10.1.0.2',
                          service={'service': 'db', 'id': 'db-2', 'tags': ['replica'], 'port': 5433},
                          check={'name': 'db alive', 'checkid': 'db-2-alive', 'serviceid': 'db-2',
                                 'status': 'warning', 'output': 'lagging'}) is True
assert c.catalog.register('n-none', '10.1.0.3', service={'service': 'db', 'port': 5434},
                          check={'name': 'node ok', 'status': 'critical'}) is True
coordinate('n-near', 0.001)
coordinate('n-far', 0.5)

# catalog nodes: by name; `near` sorts by estimated RTT, no coordinate last.
idx, ns = c.catalog.nodes()
assert [n['Node'] for n in ns] == ['n-far', 'n-near', 'n-none', node], ns
n = ns[1]
assert n['Address'] == '10.1.0.1' and n['Datacenter'] == 'dc1' and n['TaggedAddresses']['lan'] == '10.1.0.1', n
assert [n['Node'] for n in c.catalog.nodes(near='_agent')[1]] == [node, 'n-near', 'n-far', 'n-none']
assert [n['Node'] for n in c.catalog.nodes(near='n-far')[1]] == ['n-far', 'n-near', node, 'n-none']
assert [n['Node'] for n in c.catalog.nodes(consistency='consistent', dc='dc1')[1]] == ['n-far', 'n-near', 'n-none', node]

# services: each with the union of its instances' tags.
idx, svcs = c.catalog.services(consistency='stale')
assert set(svcs) - {'consul'} == {'db'} and sorted(svcs['db']) == ['primary', 'replica', 'v1'], svcs

# node: its services by ID; None for an unknown node.
idx, nd = c.catalog.node('n-near')
assert nd['Node']['Node'] == 'n-near' and nd['Node']['Address'] == '10.1.0.1', nd
assert list(nd['Services']) == ['db-1'], nd
d = nd['Services']['db-1']
assert d['Service'] == 'db' and d['Tags'] == ['primary', 'v1'] and d['Port'] == 5432, d
assert c.catalog.node('nobody')[1] is None

# service: `tag` filters, `near` sorts; the ID defaults to the name.
idx, inst = c.catalog.service('db')
assert [(i['Node'], i['ServiceID'], i['ServicePort']) for i in inst] == \
    [('n-far', 'db-2', 5433), ('n-near', 'db-1', 5432), ('n-none', 'db', 5434)], inst
assert inst[1]['Address'] == '10.1.0.1' and inst[1]['ServiceTags'] == ['primary', 'v1'], inst
assert [i['ServiceID'] for i in c.catalog.service('db', tag='primary')[1]] == ['db-1']
assert c.catalog.service('db', tag='nope')[1] == []
assert [i['Node'] for i in c.catalog.service('db', near='n-near')[1]] == ['n-near', 'n-far', 'n-none']
assert c.catalog.service('nothing')[1] == []

# health service: every instance with its node's and its own checks;
# `passing` keeps only all-passing ones, `tag` filters, `near` sorts.
idx, hs = c.health.service('db')
assert [(h['Node']['Node'], h['Service']['ID']) for h in hs] == \
    [('n-far', 'db-2'), ('n-near', 'db-1'), ('n-none', 'db')], hs
assert [[k['CheckID'] for k in h['Checks']] for h in hs] == [['db-2-alive'], ['db-1-alive'], ['node ok']], hs
k = hs[0]['Checks'][0]
assert k['Status'] == 'warning' and k['Output'] == 'lagging' and k['ServiceName'] == 'db', k
assert k['ServiceTags'] == ['replica'] and k['Node'] == 'n-far' and k['Name'] == 'db alive', k
assert [h['Service']['ID'] for h in c.health.service('db', passing=True)[1]] == ['db-1']
assert [h['Service']['ID'] for h in c.health.service('db', tag='replica')[1]] == ['db-2']
assert [h['Node']['Node'] for h in c.health.service('db', near='_agent')[1]] == ['n-near', 'n-far', 'n-none']
assert [h['Node']['Node'] for h in c.health.service('db', near='n-far', dc='dc1')[1]] == ['n-far', 'n-near', 'n-none']

# health checks (a service's own checks), state, node.
idx, ks = c.health.checks('db')
assert sorted(k['CheckID'] for k in ks) == ['db-1-alive', 'db-2-alive'], ks
assert [k['Node'] for k in c.health.checks('db', near='n-far')[1]] == ['n-far', 'n-near']
idx, st = c.health.state('warning')
assert [k['CheckID'] for k in st] == ['db-2-alive'], st
idx, st = c.health.state('critical')
assert [(k['Node'], k['CheckID']) for k in st] == [('n-none', 'node ok')], st
idx, st = c.health.state('passing', near='n-far')
assert [(k['Node'], k['CheckID']) for k in st] == [('n-near', 'db-1-alive'), (node, 'serfHealth')], st
assert len(c.health.state('any')[1]) == 4
idx, hn = c.health.node('n-none')
assert [(k['CheckID'], k['Status'], k['ServiceID']) for k in hn] == [('node ok', 'critical', '')], hn
assert c.health.node('nobody')[1] == []

# Blocking reads, each released by the change it watches.
idx, _ = c.catalog.nodes()
held(lambda: c.catalog.nodes(index=idx, wait='1s'), 1)
idx2, ns = released(lambda: c.catalog.nodes(index=idx, wait='30s'),
                    lambda: c.catalog.register('n-new', '10.1.0.4'))
assert 'n-new' in [n['Node'] for n in ns] and int(idx2) > int(idx), ns
idx, _ = c.catalog.services()
idx2, svcs = released(lambda: c.catalog.services(index=idx, wait='30s'),
                      lambda: c.catalog.register('n-new', '10.1.0.4', service={'service': 'cache', 'port': 1}))
assert 'cache' in svcs, svcs
idx, _ = c.catalog.service('db')
idx2, inst = released(lambda: c.catalog.service('db', index=idx, wait='30s'),
                      lambda: c.catalog.register('n-new', '10.1.0.4', service={'service': 'db', 'id': 'db-4', 'port': 2}))
assert 'db-4' in [i['ServiceID'] for i in inst], inst
idx, _ = c.catalog.node('n-new')
idx2, nd = released(lambda: c.catalog.node('n-new', index=idx, wait='30s'),
                    lambda: c.catalog.deregister('n-new', service_id='cache'))
assert sorted(nd['Services']) == ['db-4'], nd
idx, hs = c.health.service('db', passing=True)
idx2, hs = released(lambda: c.health.service('db', passing=True, index=idx, wait='30s'),
                    lambda: c.catalog.register('n-far', '10.1.0.2', check={
                        'name': 'db alive', 'checkid': 'db-2-alive', 'serviceid': 'db-2', 'status': 'passing'}))
assert sorted(h['Service']['ID'] for h in hs) == ['db-1', 'db-2', 'db-4'], hs
idx, _ = c.health.state('critical')
idx2, st = released(lambda: c.health.state('critical', index=idx, wait='30s'),
                    lambda: c.catalog.deregister('n-none', check_id='node ok'))
assert st == [], st
idx, _ = c.health.node('n-far')
idx2, hn = released(lambda: c.health.node('n-far', index=idx, wait='30s'),
                    lambda: c.catalog.deregister('n-far', check_id='db-2-alive'))
assert hn == [], hn
idx, _ = c.health.checks('db')
idx2, ks = released(lambda: c.health.checks('db', index=idx, wait='30s'),
                    lambda: c.catalog.deregister('n-near', check_id='db-1-alive'))
assert ks == [], ks

# Deregistration: a service leaves its node; a node goes whole.
assert c.catalog.deregister('n-far', service_id='db-2') is True
idx, nd = c.catalog.node('n-far')
assert nd['Services'] == {} and nd['Node']['Node'] == 'n-far', nd
assert c.catalog.deregister('n-far') is True
assert c.catalog.node('n-far')[1] is None
assert 'n-far' not in [n['Node'] for n in c.catalog.nodes()[1]]
print('python-consul catalog and health ok')
"#;

const STATUS_COORDINATES: &str = r#"
import re
leader = c.status.leader()
assert re.match(r'^127\.0\.0\.1:\d+$', leader), leader
assert c.status.peers() == [leader]
cfg = c.operator.raft_config()
assert len(cfg['Servers']) == 1 and cfg['Index'] >= 1, cfg
srv = cfg['Servers'][0]
assert srv['Address'] == leader and srv['Leader'] is True and srv['Voter'] is True, srv

dcs = c.coordinate.datacenters()
assert [d['Datacenter'] for d in dcs] == ['dc1'] and dcs[0]['AreaID'] == 'WAN', dcs
assert [x['Node'] for x in dcs[0]['Coordinates']] == [node], dcs
idx, cs = c.coordinate.nodes()
assert [x['Node'] for x in cs] == [node] and len(cs[0]['Coord']['Vec']) == 8, cs
held(lambda: c.coordinate.nodes(index=idx, wait='1s'), 1)
assert c.catalog.register('remote', '10.2.0.1') is True
idx2, cs = released(lambda: c.coordinate.nodes(index=idx, wait='30s'),
                    lambda: coordinate('remote', 0.25))
assert int(idx2) > int(idx), (idx, idx2)
assert [x['Node'] for x in cs] == sorted([node, 'remote']), cs
r = [x for x in cs if x['Node'] == 'remote'][0]
assert r['Coord']['Vec'][0] == 0.25 and r['Coord']['Error'] == 0.2, r
assert c.coordinate.nodes(dc='dc1', consistency='stale')[1] == cs
print('python-consul status and coordinates ok')
"#;

fn python() -> String {
    std::env::var("TOMO_SYSTEM_PYTHON").unwrap_or_else(|_| "/usr/bin/python3".into())
}

/// The interpreter, if it can import python-consul; `None` (after saying
/// so) to skip, or a panic under `TOMO_REQUIRE_EXTERNAL=1`.
fn python_with_consul() -> Option<String> {
    let py = python();
    let ok = Command::new(&py)
        .args(["-c", "import consul, requests"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Some(py);
    }
    let msg = format!("{py} cannot import consul (apt-get install python3-consul)");
    if std::env::var("TOMO_REQUIRE_EXTERNAL").is_ok_and(|v| v == "1") {
        panic!("TOMO_REQUIRE_EXTERNAL=1: {msg}");
    }
    eprintln!("skipping: {msg} (set TOMO_REQUIRE_EXTERNAL=1 to make this a failure)");
    None
}

/// A `tomo agent -dev` on free loopback ports, killed on drop.
struct Agent {
    child: Child,
    port: u16,
    serf: u16,
    node: String,
    _dir: tempfile::TempDir,
}

impl Agent {
    /// Starts it and waits until its node is registered with a passing
    /// serfHealth (sessions need it).
    fn start(node: &str) -> Agent {
        let dir = tempfile::TempDir::new().unwrap();
        let (port, serf) = (free_tcp(), free_udp());
        let child = Command::new(env!("CARGO_BIN_EXE_tomo"))
            .args(["agent", "-dev", "-node", node, "-http-port"])
            .arg(port.to_string())
            .arg("-serf-lan-port")
            .arg(serf.to_string())
            .args(["-dns-port", "0", "-data-dir"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tomo agent -dev");
        let mut agent = Agent {
            child,
            port,
            serf,
            node: node.to_string(),
            _dir: dir,
        };
        let start = Instant::now();
        loop {
            let healthy = json(port, &format!("/v1/health/node/{node}")).is_some_and(|v| {
                v.as_array().is_some_and(|a| {
                    a.iter()
                        .any(|c| c["CheckID"] == "serfHealth" && c["Status"] == "passing")
                })
            });
            if healthy {
                return agent;
            }
            if let Ok(Some(status)) = agent.child.try_wait() {
                panic!("tomo agent exited early: {status}");
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "agent {node} not ready"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs [`PRELUDE`] and `script` against `agent` (arguments: host, port,
/// node, then `extra`), within two minutes; fails the test with the
/// script's output unless it succeeds and prints `done`.
fn run(py: &str, agent: &Agent, script: &str, extra: &[String], done: &str) {
    let dir = tempfile::TempDir::new().unwrap();
    let (out, err) = (dir.path().join("out"), dir.path().join("err"));
    let mut child = Command::new(py)
        .arg("-c")
        .arg(format!("{PRELUDE}\n{script}"))
        .args(["127.0.0.1", &agent.port.to_string(), &agent.node])
        .args(extra)
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .expect("run python");
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if start.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (out, err) = (
        std::fs::read_to_string(out).unwrap_or_default(),
        std::fs::read_to_string(err).unwrap_or_default(),
    );
    assert!(
        status.is_some_and(|s| s.success()) && out.contains(done),
        "python-consul script {} ({status:?}):\n{out}\n{err}",
        if status.is_none() {
            "timed out"
        } else {
            "failed"
        }
    );
}

#[test]
fn python_consul_kv_sessions_and_locks() {
    let Some(py) = python_with_consul() else {
        return;
    };
    // The script expects this node name (`near` orders, coordinates).
    let agent = Agent::start("py");
    run(&py, &agent, PATRONI_PATH, &[], "python-consul ok");
}

#[test]
fn python_consul_kv_every_parameter() {
    let Some(py) = python_with_consul() else {
        return;
    };
    let agent = Agent::start("pykv");
    run(&py, &agent, KV, &[], "python-consul kv ok");
}

#[test]
fn python_consul_sessions() {
    let Some(py) = python_with_consul() else {
        return;
    };
    let agent = Agent::start("pysess");
    run(&py, &agent, SESSIONS, &[], "python-consul sessions ok");
}

#[test]
fn python_consul_agent_services_checks_maintenance_join() {
    let Some(py) = python_with_consul() else {
        return;
    };
    let agent = Agent::start("pyagent");
    // A client agent for `join` (no -server: it only gossips).
    let dir = tempfile::TempDir::new().unwrap();
    let (peer_http, peer_serf) = (free_tcp(), free_udp());
    let peer = Command::new(env!("CARGO_BIN_EXE_tomo"))
        .args([
            "agent",
            "-node",
            "pypeer",
            "-bind",
            "127.0.0.1",
            "-client",
            "127.0.0.1",
        ])
        .arg("-http-port")
        .arg(peer_http.to_string())
        .arg("-serf-lan-port")
        .arg(peer_serf.to_string())
        .args(["-dns-port", "0", "-data-dir"])
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the peer agent");
    struct Kill(Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _peer = Kill(peer);
    let start = Instant::now();
    while json(peer_http, "/v1/agent/self").is_none() {
        assert!(start.elapsed() < Duration::from_secs(30), "peer not up");
        std::thread::sleep(Duration::from_millis(100));
    }
    let extra = [peer_serf.to_string(), peer_http.to_string()];
    run(&py, &agent, AGENT, &extra, "python-consul agent ok");
    assert_eq!(agent.serf, {
        let me = json(agent.port, "/v1/agent/self").unwrap();
        me["Member"]["Port"].as_u64().unwrap() as u16
    });
}

#[test]
fn python_consul_catalog_and_health() {
    let Some(py) = python_with_consul() else {
        return;
    };
    let agent = Agent::start("pycat");
    run(
        &py,
        &agent,
        CATALOG_HEALTH,
        &[],
        "python-consul catalog and health ok",
    );
}

#[test]
fn python_consul_status_and_coordinates() {
    let Some(py) = python_with_consul() else {
        return;
    };
    let agent = Agent::start("pystat");
    run(
        &py,
        &agent,
        STATUS_COORDINATES,
        &[],
        "python-consul status and coordinates ok",
    );
}
