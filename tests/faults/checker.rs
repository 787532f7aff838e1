//! A linearizability checker for per-key register histories, in the style
//! of Porcupine and Knossos: the Wing–Gong–Lowe search, memoized on
//! (operations linearized so far, register state).
//!
//! ## The model
//!
//! Each key is a register holding nothing (absent) or a value; every value
//! the workload writes is unique. Operations:
//!
//! - `read` (`GET ?consistent`) returns the value and, when there is
//!   one, its `ModifyIndex`;
//! - `write` (`PUT`) sets a value;
//! - `cas` (`PUT ?cas=<ModifyIndex>`) sets a value if the key's
//!   `ModifyIndex` is the given one. Consul compares indexes, not values;
//!   the client only uses an index it read together with a value, and
//!   values are unique and each written once, so "index is i" is "value
//!   is the one read with i", and a `cas` is `cas(expected value, new
//!   value)`. `cas=0` expects the key absent. The history holds both, and
//!   [`check`] verifies the mapping holds: no value is read with two
//!   indexes, no index with two values (either would mean a write applied
//!   twice or an index reused).
//!
//! ## Outcomes
//!
//! - `ok`: the operation took effect exactly once between its call and
//!   its return (a read returned what it says);
//! - `fail`: it certainly did not take effect (a `cas` answered `false`,
//!   a 4xx, no connection): dropped;
//! - `unknown` (a timeout, a reset, a 5xx): it may or may not have taken
//!   effect, at any time after its call. Its return is +∞, and the search
//!   may linearize it or leave it out. Unknown reads tell nothing and are
//!   dropped; so is an unknown write whose value no read returned and no
//!   cas expected: with unique values and no `cas=false` observations
//!   (dropped above), while its value is in the register no operation
//!   with a precondition can take effect, so whether it happened changes
//!   no verdict, and leaving it out keeps the search small.
//!
//! ## The search
//!
//! Calls and returns are sorted by time (a call before a return at the
//! same instant, so ties count as concurrent) into a doubly linked list.
//! Walking it, a call may be linearized if the model allows the
//! operation in the current state; it is then taken out of the list and
//! the walk restarts from the head. Reaching a return means that
//! operation should have been linearized already: backtrack to the last
//! choice and try the next call. The history is linearizable once every
//! `ok` operation is linearized. A configuration seen before (same set of
//! linearized operations, same state) is not explored twice; the set is
//! kept as a 128-bit Zobrist hash (XOR of a random word per operation)
//! rather than a bitset, so memory does not grow with the square of the
//! history. A hash collision could only prune a path, that is report a
//! violation that is not one, with odds around n²/2¹²⁸.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// How an operation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Took effect, once, between call and return.
    Ok,
    /// Certainly had no effect.
    Fail,
    /// Perhaps took effect, at any time after the call.
    Unknown,
}

/// What an operation did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Action {
    /// A read: the value (`None`: absent) and its `ModifyIndex`.
    Read {
        value: Option<String>,
        index: Option<u64>,
    },
    /// A blind write.
    Write { value: String },
    /// `?cas=index`; `expected` is the value read with that index (`None`
    /// for `cas=0`: create only).
    Cas {
        index: u64,
        expected: Option<String>,
        value: String,
    },
}

/// One operation of the history (a line of the saved JSON-lines file).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    /// Position in the history.
    pub id: usize,
    /// The client thread (the final reads are one more client).
    pub client: usize,
    /// The server asked.
    pub server: usize,
    pub key: String,
    #[serde(flatten)]
    pub action: Action,
    /// Nanoseconds since the run began: invocation.
    pub call: u64,
    /// Completion, or when the client gave up (`unknown`).
    pub ret: u64,
    pub outcome: Outcome,
    /// Why it failed or is unknown.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
}

/// The verdict on one key.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    /// Not linearizable: why.
    Violation(String),
    /// The search ran out of its step budget.
    Inconclusive(String),
}

/// One key's check.
#[derive(Debug)]
pub struct KeyReport {
    pub key: String,
    /// Operations the search considered (after dropping).
    pub ops: usize,
    pub verdict: Verdict,
    /// Search steps taken.
    pub steps: u64,
}

/// One operation as the search sees it; values are interned per key.
#[derive(Clone, Copy, Debug)]
enum Step {
    Read(Option<u32>),
    Write(u32),
    Cas(Option<u32>, u32),
}

/// The register: `state` after `step`, if the step is allowed there.
fn apply(state: Option<u32>, step: Step) -> Option<Option<u32>> {
    match step {
        Step::Read(v) => (state == v).then_some(state),
        Step::Write(v) => Some(Some(v)),
        Step::Cas(expected, v) => (state == expected).then_some(Some(v)),
    }
}

#[derive(Clone, Copy, Debug)]
struct Op {
    step: Step,
    call: u64,
    /// `u64::MAX` for unknown outcomes.
    ret: u64,
    /// Must be linearized (`ok`), or may be left out (`unknown`).
    required: bool,
    /// Index into the key's records, for messages.
    rec: usize,
}

/// Checks every key of `history` (all keys, in name order); `budget`
/// bounds the search steps per key.
pub fn check(history: &[Record], budget: u64) -> Vec<KeyReport> {
    let mut by_key: HashMap<&str, Vec<&Record>> = HashMap::new();
    for r in history {
        by_key.entry(&r.key).or_default().push(r);
    }
    let mut keys: Vec<&str> = by_key.keys().copied().collect();
    keys.sort();
    keys.into_iter()
        .map(|k| check_key(k, &by_key[k], budget))
        .collect()
}

/// Checks one key's operations.
pub fn check_key(key: &str, recs: &[&Record], budget: u64) -> KeyReport {
    let done = |ops: usize, verdict: Verdict, steps: u64| KeyReport {
        key: key.to_string(),
        ops,
        verdict,
        steps,
    };

    // Values read and their indexes: one index per value, one value per
    // index.
    let mut index_of: HashMap<&str, (u64, usize)> = HashMap::new();
    let mut value_at: HashMap<u64, (&str, usize)> = HashMap::new();
    for r in recs.iter().filter(|r| r.outcome == Outcome::Ok) {
        if let Action::Read {
            value: Some(v),
            index: Some(i),
        } = &r.action
        {
            if let Some((j, other)) = index_of.insert(v, (*i, r.id))
                && j != *i
            {
                return done(
                    0,
                    Verdict::Violation(format!(
                        "value {v:?} read with ModifyIndex {j} (op {other}) and {i} (op {}): \
                         written twice?",
                        r.id
                    )),
                    0,
                );
            }
            if let Some((w, other)) = value_at.insert(*i, (v, r.id))
                && w != v
            {
                return done(
                    0,
                    Verdict::Violation(format!(
                        "ModifyIndex {i} read with value {w:?} (op {other}) and {v:?} (op {})",
                        r.id
                    )),
                    0,
                );
            }
        }
    }

    // Which values may exist: written by an ok or unknown write (a value
    // whose only write failed for sure must never be read).
    let mut written: HashSet<&str> = HashSet::new();
    for r in recs.iter().filter(|r| r.outcome != Outcome::Fail) {
        match &r.action {
            Action::Write { value } | Action::Cas { value, .. } => {
                written.insert(value);
            }
            Action::Read { .. } => {}
        }
    }
    for r in recs.iter().filter(|r| r.outcome == Outcome::Ok) {
        if let Action::Read { value: Some(v), .. } = &r.action
            && !written.contains(v.as_str())
        {
            return done(
                0,
                Verdict::Violation(format!(
                    "op {} read {v:?}, which no write that may have happened wrote",
                    r.id
                )),
                0,
            );
        }
    }

    // Drop what cannot matter (see the module doc), intern values.
    let mut ids: HashMap<&str, u32> = HashMap::new();
    // Values some operation depends on: read, or expected by a cas that
    // may have happened.
    let observed: HashSet<&str> = recs
        .iter()
        .filter(|r| r.outcome != Outcome::Fail)
        .filter_map(|r| match &r.action {
            Action::Read { value, .. } if r.outcome == Outcome::Ok => value.as_deref(),
            Action::Cas { expected, .. } => expected.as_deref(),
            _ => None,
        })
        .collect();
    let mut ops = Vec::new();
    for (n, r) in recs.iter().enumerate() {
        let step = match (&r.action, r.outcome) {
            (_, Outcome::Fail) | (Action::Read { .. }, Outcome::Unknown) => continue,
            (Action::Write { value } | Action::Cas { value, .. }, Outcome::Unknown)
                if !observed.contains(value.as_str()) =>
            {
                continue;
            }
            (Action::Read { value, .. }, _) => {
                Step::Read(value.as_deref().map(|v| intern(v, &mut ids)))
            }
            (Action::Write { value }, _) => Step::Write(intern(value, &mut ids)),
            (
                Action::Cas {
                    expected, value, ..
                },
                _,
            ) => Step::Cas(
                expected.as_deref().map(|v| intern(v, &mut ids)),
                intern(value, &mut ids),
            ),
        };
        let required = r.outcome == Outcome::Ok;
        ops.push(Op {
            step,
            call: r.call,
            ret: if required {
                r.ret.max(r.call)
            } else {
                u64::MAX
            },
            required,
            rec: n,
        });
    }
    let names: HashMap<u32, String> = ids.iter().map(|(v, i)| (*i, v.to_string())).collect();
    let n_ops = ops.len();
    match search(&ops, budget) {
        Search::Linearizable(steps) => done(n_ops, Verdict::Linearizable, steps),
        Search::GaveUp(steps) => done(
            n_ops,
            Verdict::Inconclusive(format!("no verdict after {steps} search steps")),
            steps,
        ),
        Search::Stuck {
            steps,
            depth,
            op,
            state,
        } => {
            let required = ops.iter().filter(|o| o.required).count();
            let show = |s: Option<u32>| match s {
                None => "absent".to_string(),
                Some(i) => format!("{:?}", names[&i]),
            };
            let r = recs[ops[op].rec];
            let mut why = format!(
                "not linearizable: at best {depth} operations of {n_ops} ({required} \
                 acknowledged) can be ordered; then op {} ({} by client {} via server {}, \
                 {:.3}–{:.3} s) cannot take effect: the register holds {}",
                r.id,
                describe(&r.action),
                r.client,
                r.server,
                r.call as f64 / 1e9,
                r.ret as f64 / 1e9,
                show(state),
            );
            // Operations overlapping it, for whoever reads the history.
            let near: Vec<String> = ops
                .iter()
                .filter(|o| o.call <= ops[op].ret && o.ret >= ops[op].call)
                .take(12)
                .map(|o| {
                    let r = recs[o.rec];
                    format!(
                        "op {} {} {:?} {:.3}–{}",
                        r.id,
                        describe(&r.action),
                        r.outcome,
                        r.call as f64 / 1e9,
                        if o.ret == u64::MAX {
                            "∞".to_string()
                        } else {
                            format!("{:.3}", o.ret as f64 / 1e9)
                        }
                    )
                })
                .collect();
            let _ = write!(why, "; overlapping: [{}]", near.join(", "));
            done(n_ops, Verdict::Violation(why), steps)
        }
    }
}

/// A value's number in `ids`, given on first sight.
fn intern<'a>(v: &'a str, ids: &mut HashMap<&'a str, u32>) -> u32 {
    let n = ids.len() as u32;
    *ids.entry(v).or_insert(n)
}

/// An action in a few words.
pub fn describe(a: &Action) -> String {
    match a {
        Action::Read { value: None, .. } => "read → absent".into(),
        Action::Read {
            value: Some(v),
            index,
        } => format!("read → {v:?}@{}", index.unwrap_or(0)),
        Action::Write { value } => format!("write {value:?}"),
        Action::Cas {
            index,
            expected,
            value,
        } => format!("cas@{index} {expected:?} → {value:?}"),
    }
}

enum Search {
    Linearizable(u64),
    GaveUp(u64),
    /// The deepest configuration reached: `depth` operations linearized,
    /// then `op`'s return was reached with the register holding `state`.
    Stuck {
        steps: u64,
        depth: usize,
        op: usize,
        state: Option<u32>,
    },
}

const NIL: usize = usize::MAX;

/// A list node: an operation's call or return.
#[derive(Clone, Copy)]
struct Node {
    op: usize,
    is_return: bool,
    prev: usize,
    next: usize,
}

/// The Wing–Gong–Lowe search over `ops`.
fn search(ops: &[Op], budget: u64) -> Search {
    // Node 0 is the head; then calls and returns in time order.
    let mut events: Vec<(u64, bool, usize)> = Vec::with_capacity(ops.len() * 2);
    for (i, o) in ops.iter().enumerate() {
        events.push((o.call, false, i));
        events.push((o.ret, true, i));
    }
    events.sort_unstable();
    let mut nodes = Vec::with_capacity(events.len() + 1);
    nodes.push(Node {
        op: NIL,
        is_return: false,
        prev: NIL,
        next: if events.is_empty() { NIL } else { 1 },
    });
    let mut call_node = vec![0; ops.len()];
    let mut ret_node = vec![0; ops.len()];
    for (n, &(_, is_return, op)) in events.iter().enumerate() {
        let at = n + 1;
        nodes.push(Node {
            op,
            is_return,
            prev: at - 1,
            next: if at == events.len() { NIL } else { at + 1 },
        });
        if is_return {
            ret_node[op] = at;
        } else {
            call_node[op] = at;
        }
    }
    let unlink = |nodes: &mut Vec<Node>, n: usize| {
        let Node { prev, next, .. } = nodes[n];
        nodes[prev].next = next;
        if next != NIL {
            nodes[next].prev = prev;
        }
    };
    let relink = |nodes: &mut Vec<Node>, n: usize| {
        let Node { prev, next, .. } = nodes[n];
        nodes[prev].next = n;
        if next != NIL {
            nodes[next].prev = n;
        }
    };

    // Zobrist words, from a fixed seed: a verdict does not depend on
    // the run.
    let mut rng = crate::rng::Rng::new(0x5EED_0F2B_1A5E_D001);
    let zobrist: Vec<u128> = (0..ops.len())
        .map(|_| (u128::from(rng.next_u64()) << 64) | u128::from(rng.next_u64()))
        .collect();

    let mut remaining = ops.iter().filter(|o| o.required).count();
    let mut state: Option<u32> = None;
    let mut hash: u128 = 0;
    let mut stack: Vec<(usize, Option<u32>)> = Vec::new();
    let mut seen: HashSet<(u128, Option<u32>)> = HashSet::new();
    let mut entry = nodes[0].next;
    let mut steps = 0u64;
    let mut deepest: Option<(usize, usize, Option<u32>)> = None;
    loop {
        if remaining == 0 {
            return Search::Linearizable(steps);
        }
        steps += 1;
        if steps > budget {
            return Search::GaveUp(steps);
        }
        let node = if entry == NIL {
            None
        } else {
            Some(nodes[entry])
        };
        match node {
            Some(n) if !n.is_return => {
                let op = n.op;
                if let Some(next) = apply(state, ops[op].step) {
                    let h = hash ^ zobrist[op];
                    if seen.insert((h, next)) {
                        stack.push((op, state));
                        state = next;
                        hash = h;
                        if ops[op].required {
                            remaining -= 1;
                        }
                        unlink(&mut nodes, call_node[op]);
                        unlink(&mut nodes, ret_node[op]);
                        entry = nodes[0].next;
                        continue;
                    }
                }
                entry = n.next;
            }
            // A return (or the end, which a required operation's return
            // always precedes): backtrack.
            _ => {
                if let Some(n) = node
                    && deepest.is_none_or(|(d, _, _)| stack.len() >= d)
                {
                    deepest = Some((stack.len(), n.op, state));
                }
                let Some((op, prev)) = stack.pop() else {
                    let (depth, op, state) = deepest.unwrap_or((0, 0, None));
                    return Search::Stuck {
                        steps,
                        depth,
                        op,
                        state,
                    };
                };
                state = prev;
                hash ^= zobrist[op];
                if ops[op].required {
                    remaining += 1;
                }
                relink(&mut nodes, ret_node[op]);
                relink(&mut nodes, call_node[op]);
                entry = nodes[call_node[op]].next;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The checker on hand-made histories: accepted ones, and ones it
    //! must reject. Times are in milliseconds.
    use super::*;

    /// A history builder.
    #[derive(Default)]
    struct H(Vec<Record>);

    impl H {
        fn push(&mut self, client: usize, action: Action, call: u64, ret: u64, outcome: Outcome) {
            let id = self.0.len();
            self.0.push(Record {
                id,
                client,
                server: 0,
                key: "k".into(),
                action,
                call: call * 1_000_000,
                ret: ret * 1_000_000,
                outcome,
                note: String::new(),
            });
        }
        fn write(&mut self, c: usize, v: &str, call: u64, ret: u64, o: Outcome) -> &mut Self {
            self.push(c, Action::Write { value: v.into() }, call, ret, o);
            self
        }
        fn read(&mut self, c: usize, v: Option<(&str, u64)>, call: u64, ret: u64) -> &mut Self {
            let action = Action::Read {
                value: v.map(|v| v.0.to_string()),
                index: v.map(|v| v.1),
            };
            self.push(c, action, call, ret, Outcome::Ok);
            self
        }
        fn cas(
            &mut self,
            c: usize,
            expected: Option<(&str, u64)>,
            v: &str,
            call: u64,
            ret: u64,
            o: Outcome,
        ) -> &mut Self {
            let action = Action::Cas {
                index: expected.map(|e| e.1).unwrap_or(0),
                expected: expected.map(|e| e.0.to_string()),
                value: v.into(),
            };
            self.push(c, action, call, ret, o);
            self
        }
        fn verdict(&self) -> Verdict {
            let mut r = check(&self.0, 1_000_000);
            assert_eq!(r.len(), 1);
            r.pop().unwrap().verdict
        }
        fn ok(&self) {
            assert_eq!(self.verdict(), Verdict::Linearizable);
        }
        fn rejected(&self) -> String {
            match self.verdict() {
                Verdict::Violation(why) => why,
                v => panic!("expected a violation, got {v:?}"),
            }
        }
    }

    use super::Outcome::{Fail, Ok as Acked, Unknown};

    #[test]
    fn sequential_history_is_linearizable() {
        H::default()
            .read(0, None, 0, 1)
            .write(0, "a", 2, 3, Acked)
            .read(1, Some(("a", 10)), 4, 5)
            .cas(1, Some(("a", 10)), "b", 6, 7, Acked)
            .read(0, Some(("b", 11)), 8, 9)
            .cas(0, None, "c", 10, 11, Fail)
            .read(2, Some(("b", 11)), 12, 13)
            .ok();
    }

    #[test]
    fn concurrent_reads_may_see_either_side_of_a_write() {
        H::default()
            .write(0, "a", 0, 10, Acked)
            .write(1, "b", 20, 40, Acked)
            .read(2, Some(("a", 1)), 25, 30)
            .read(3, Some(("b", 2)), 26, 31)
            .read(4, Some(("b", 2)), 50, 60)
            .ok();
        // Cas and write racing: the cas took effect first.
        H::default()
            .write(0, "a", 0, 10, Acked)
            .read(1, Some(("a", 1)), 11, 12)
            .cas(1, Some(("a", 1)), "c", 20, 40, Acked)
            .write(0, "b", 25, 30, Acked)
            .read(2, Some(("b", 3)), 50, 60)
            .ok();
    }

    #[test]
    fn a_stale_read_after_an_acknowledged_write_is_rejected() {
        let why = H::default()
            .write(0, "a", 0, 10, Acked)
            .write(0, "b", 20, 30, Acked)
            .read(1, Some(("a", 1)), 40, 50)
            .rejected();
        assert!(why.contains("op 2"), "{why}");
    }

    #[test]
    fn a_lost_write_is_rejected() {
        // Acknowledged, then the key reads absent.
        H::default()
            .write(0, "a", 0, 10, Acked)
            .read(1, None, 20, 30)
            .rejected();
        // Acknowledged, then overwritten by nothing: the older value is
        // back.
        H::default()
            .write(0, "a", 0, 10, Acked)
            .read(1, Some(("a", 1)), 11, 12)
            .write(2, "b", 20, 30, Acked)
            .read(1, Some(("a", 1)), 40, 50)
            .rejected();
    }

    #[test]
    fn a_cas_that_succeeded_on_a_wrong_value_is_rejected() {
        // The register held "b" for sure when the cas expecting "a" ran.
        H::default()
            .write(0, "a", 0, 10, Acked)
            .read(1, Some(("a", 1)), 11, 12)
            .write(0, "b", 20, 30, Acked)
            .cas(1, Some(("a", 1)), "c", 40, 50, Acked)
            .rejected();
        // Overlapping the write, the cas could go first, but then the
        // write would overwrite it and "c" could not be read last.
        H::default()
            .write(0, "a", 0, 10, Acked)
            .read(1, Some(("a", 1)), 11, 12)
            .write(0, "b", 20, 30, Acked)
            .cas(1, Some(("a", 1)), "c", 25, 50, Acked)
            .read(2, Some(("c", 3)), 60, 70)
            .rejected();
        // Create-only on a key that exists.
        H::default()
            .write(0, "a", 0, 10, Acked)
            .cas(1, None, "c", 20, 30, Acked)
            .rejected();
    }

    #[test]
    fn a_read_from_the_future_or_of_nothing_is_rejected() {
        H::default()
            .read(1, Some(("a", 1)), 0, 10)
            .write(0, "a", 20, 30, Acked)
            .rejected();
        let why = H::default()
            .write(0, "a", 0, 10, Fail)
            .read(1, Some(("a", 1)), 20, 30)
            .rejected();
        assert!(why.contains("no write"), "{why}");
    }

    #[test]
    fn a_value_read_with_two_indexes_is_rejected() {
        let why = H::default()
            .write(0, "a", 0, 10, Acked)
            .read(1, Some(("a", 1)), 20, 30)
            .read(1, Some(("a", 5)), 40, 50)
            .rejected();
        assert!(why.contains("ModifyIndex"), "{why}");
    }

    #[test]
    fn unknown_operations_may_or_may_not_take_effect() {
        // Taken effect, long after the client gave up.
        H::default()
            .write(0, "a", 0, 10, Acked)
            .write(1, "b", 20, 25, Unknown)
            .read(2, Some(("a", 1)), 30, 40)
            .read(2, Some(("b", 2)), 50, 60)
            .ok();
        // Never taken effect.
        H::default()
            .write(0, "a", 0, 10, Acked)
            .write(1, "b", 20, 25, Unknown)
            .cas(1, Some(("a", 1)), "c", 26, 27, Unknown)
            .read(2, Some(("a", 1)), 30, 40)
            .ok();
        // An unknown cas that did take effect, on the right value.
        H::default()
            .write(0, "a", 0, 10, Acked)
            .cas(1, Some(("a", 1)), "c", 20, 21, Unknown)
            .read(2, Some(("c", 2)), 30, 40)
            .ok();
        // But not before its call, and not twice.
        H::default()
            .read(2, Some(("b", 2)), 0, 5)
            .write(1, "b", 20, 25, Unknown)
            .rejected();
        H::default()
            .write(1, "b", 0, 5, Unknown)
            .read(2, Some(("b", 2)), 10, 15)
            .write(0, "a", 20, 30, Acked)
            .read(2, Some(("b", 2)), 40, 50)
            .rejected();
        // An unknown cas on a value the register no longer held.
        H::default()
            .write(0, "a", 0, 10, Acked)
            .read(1, Some(("a", 1)), 11, 12)
            .write(0, "b", 20, 30, Acked)
            .cas(1, Some(("a", 1)), "c", 40, 41, Unknown)
            .read(2, Some(("c", 3)), 50, 60)
            .rejected();
    }

    #[test]
    fn failed_operations_are_dropped() {
        H::default()
            .write(0, "a", 0, 10, Fail)
            .cas(1, None, "b", 0, 10, Fail)
            .read(2, None, 20, 30)
            .ok();
    }

    #[test]
    fn keys_are_checked_separately() {
        let mut h = H::default();
        h.write(0, "a", 0, 10, Acked)
            .read(1, Some(("a", 1)), 20, 30);
        h.0[1].key = "other".into();
        let r = check(&h.0, 1000);
        assert_eq!(r.len(), 2);
        // "other" reads a value written only to "k".
        assert!(matches!(r[1].verdict, Verdict::Violation(_)), "{r:?}");
        assert_eq!(r[0].verdict, Verdict::Linearizable);
    }

    /// Runs a linearizable register with `clients` concurrent clients and
    /// random operation lengths: each operation takes effect at a random
    /// instant inside its interval (some outcomes are then hidden as
    /// unknown). The checker must accept every such history, quickly.
    fn simulated(seed: u64, clients: usize, ops: usize) -> Vec<Record> {
        let mut rng = crate::rng::Rng::new(seed);
        // (effect time, client, action template) built per client, then
        // applied in effect-time order.
        let mut free_at = vec![0u64; clients];
        let mut planned = Vec::new();
        for n in 0..ops {
            let c = rng.below(clients);
            let call = free_at[c] + rng.next_u64() % 5;
            let ret = call + 1 + rng.next_u64() % 30;
            let at = call + rng.next_u64() % (ret - call + 1);
            free_at[c] = ret + 1;
            planned.push((at, call, ret, c, n, rng.below(100)));
        }
        planned.sort();
        let mut value: Option<(String, u64)> = None;
        let mut index = 0u64;
        let mut out = Vec::new();
        for (_at, call, ret, c, n, roll) in planned {
            let (action, outcome) = if roll < 40 {
                (
                    Action::Read {
                        value: value.as_ref().map(|v| v.0.clone()),
                        index: value.as_ref().map(|v| v.1),
                    },
                    Outcome::Ok,
                )
            } else if roll < 70 {
                index += 1;
                value = Some((format!("v{n}"), index));
                (
                    Action::Write {
                        value: format!("v{n}"),
                    },
                    Outcome::Ok,
                )
            } else {
                // A cas on the current value half the time.
                let expected = if roll < 85 { value.clone() } else { None };
                let hit = expected == value;
                if hit {
                    index += 1;
                    value = Some((format!("v{n}"), index));
                }
                (
                    Action::Cas {
                        index: expected.as_ref().map(|e| e.1).unwrap_or(0),
                        expected: expected.map(|e| e.0),
                        value: format!("v{n}"),
                    },
                    if hit { Outcome::Ok } else { Outcome::Fail },
                )
            };
            // A few acknowledged writes are reported unknown.
            let outcome = if outcome == Outcome::Ok
                && !matches!(action, Action::Read { .. })
                && rng.chance(10)
            {
                Outcome::Unknown
            } else {
                outcome
            };
            out.push(Record {
                id: 0,
                client: c,
                server: 0,
                key: "k".into(),
                action,
                call,
                ret,
                outcome,
                note: String::new(),
            });
        }
        out.sort_by_key(|r| r.call);
        for (i, r) in out.iter_mut().enumerate() {
            r.id = i;
        }
        out
    }

    #[test]
    fn simulated_linearizable_histories_pass() {
        for seed in 0..20 {
            let h = simulated(seed, 8, 2000);
            let r = check(&h, 5_000_000);
            assert_eq!(r[0].verdict, Verdict::Linearizable, "seed {seed}");
        }
    }

    #[test]
    fn a_simulated_history_with_one_stale_read_is_rejected() {
        // A final read returns the first acknowledged write's value,
        // which a later acknowledged write (strictly after it in real
        // time) replaced for good.
        let mut h = simulated(3, 8, 2000);
        let acked =
            |r: &Record| matches!(r.action, Action::Write { .. }) && r.outcome == Outcome::Ok;
        let old = h.iter().position(acked).expect("a write");
        assert!(h.iter().any(|r| acked(r) && r.call > h[old].ret));
        let Action::Write { value } = h[old].action.clone() else {
            unreachable!()
        };
        // The index it was read with, if it was (a second index would be
        // caught before the search).
        let index = h
            .iter()
            .find_map(|r| match &r.action {
                Action::Read {
                    value: Some(v),
                    index,
                } if *v == value => *index,
                _ => None,
            })
            .unwrap_or(1_000_000);
        let end = h.iter().map(|r| r.ret).max().unwrap() + 1;
        h.push(Record {
            id: h.len(),
            client: 99,
            server: 0,
            key: "k".into(),
            action: Action::Read {
                value: Some(value),
                index: Some(index),
            },
            call: end,
            ret: end + 1,
            outcome: Outcome::Ok,
            note: String::new(),
        });
        let r = check(&h, 5_000_000);
        match &r[0].verdict {
            Verdict::Violation(why) => assert!(why.contains("not linearizable"), "{why}"),
            v => panic!("expected a violation, got {v:?}"),
        }
    }
}
