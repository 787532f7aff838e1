#!/usr/bin/env bash
# Side-by-side: serf's real Go engine (the peer harness) and tomo's two
# profiles on the same files, in one run, with the acceptance flags of
# issue 2 (1000 rounds, one random peer per round, seed 1). Prints a
# Markdown table; the raw JSON lines go to $OUT (default /tmp/tomo-compare).
#
#   sims/compare.sh                 # needs ../shared, Go and golang-github-hashicorp-serf-dev
#   SEEDS="1 2 3 4 5" sims/compare.sh   # several seeds, means reported
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DS="${DATASETS:-$ROOT/../shared/datasets}"
HARNESS_DIR="${HARNESS_DIR:-$ROOT/../shared/peers/serf-vivaldi}"
OUT="${OUT:-/tmp/tomo-compare}"
SEEDS="${SEEDS:-1}"
FLAGS=(-rounds 1000 -k 1 -select random)
mkdir -p "$OUT"
if [ -z "${SUMMARY_ONLY:-}" ]; then
BIN_DIR="$OUT/bin" "$HARNESS_DIR/run.sh" build
H="$OUT/bin/serf-vivaldi"
(cd "$ROOT" && cargo build --release --quiet)
T="$ROOT/target/release/tomo"

: > "$OUT/all.jsonl"
run() { # name, extra flags...
  local name=$1; shift
  for s in $SEEDS; do
    "$H" "${FLAGS[@]}" -seed "$s" "$@" | sed "s/^{/{\"case\":\"$name\",\"engine\":\"serf-harness\",/" >> "$OUT/all.jsonl"
    for p in tomo serf; do
      # tomo takes the harness's flags with two dashes
      local args=()
      for a in "${FLAGS[@]}" "$@"; do case $a in -matrix) args+=(--dataset);; -*) args+=("-$a");; *) args+=("$a");; esac; done
      # --holdout 0: the harness probes every pair, so tomo must too here
      "$T" sim "${args[@]}" --seed "$s" --profile $p --holdout 0 | sed "s/^{/{\"case\":\"$name\",\"engine\":\"tomo-$p\",/" >> "$OUT/all.jsonl"
    done
  done
}
for f in azure.ltm planetlab490.median.ltm wondernetwork242.min.ltm seattle99.median.ltm; do
  run "$f" -matrix "$DS/$f"
done
run "seattle99 +observe series" -matrix "$DS/seattle99.median.ltm" -observe "$DS/seattle99.series.ltm.gz"
run "planetlab490 +observe series" -matrix "$DS/planetlab490.median.ltm" -observe "$DS/planetlab490.series.ltm.gz"
fi

python3 - "$OUT/all.jsonl" <<'PY'
import json, sys, collections, statistics as st
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    d = json.loads(line)
    rows[(d["case"], d["engine"])].append(d)
keys = ["median_rel_err", "p90_rel_err", "p99_rel_err", "nn_accuracy", "nn_recall_at_5", "stretch_median", "stretch_p99"]
print("| dataset | engine | runs | median err | p90 err | p99 err | NN top-1 | recall@5 | stretch median | stretch p99 | updates/s |")
print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
cases = list(dict.fromkeys(c for c, _ in rows))
for c in cases:
    for e in ["serf-harness", "tomo-serf", "tomo-tomo"]:
        R = rows.get((c, e))
        if not R: continue
        m = lambda k: st.mean(r["result"][k] for r in R)
        ups = st.mean(r["updates_per_s"] for r in R)
        print(f"| {c} | {e} | {len(R)} | " + " | ".join(f"{m(k):.4f}" if k.endswith("err") else f"{m(k):.3f}" for k in keys) + f" | {ups:,.0f} |")
print()
print("Acceptance (tomo default vs serf harness, same run):")
for c in cases:
    S, T = rows.get((c, "serf-harness")), rows.get((c, "tomo-tomo"))
    if not S or not T: continue
    s = lambda k: st.mean(r["result"][k] for r in S); t = lambda k: st.mean(r["result"][k] for r in T)
    sups = st.mean(r["updates_per_s"] for r in S); tups = st.mean(r["updates_per_s"] for r in T)
    checks = [("median <= serf", t("median_rel_err") <= s("median_rel_err"), f'{t("median_rel_err"):.4f} vs {s("median_rel_err"):.4f}')]
    if "seattle" in c and "observe" in c:  # the bar the issue sets for the heavy-tailed series
        checks.append(("median <= 0.5 serf", t("median_rel_err") <= 0.5 * s("median_rel_err"), f'ratio {t("median_rel_err")/s("median_rel_err"):.2f}'))
    checks += [
              ("p99 <= 0.6 serf", t("p99_rel_err") <= 0.6 * s("p99_rel_err"), f'ratio {t("p99_rel_err")/s("p99_rel_err"):.2f}'),
              ("nn >= 1.5 serf", t("nn_accuracy") >= 1.5 * s("nn_accuracy"), f'ratio {t("nn_accuracy")/max(s("nn_accuracy"),1e-9):.2f}'),
              ("recall@5 >= 0.8", t("nn_recall_at_5") >= 0.8, f'{t("nn_recall_at_5"):.3f}'),
              ("updates/s >= 10 serf", tups >= 10 * sups, f'ratio {tups/sups:.1f}')]
    print(f"- {c}: " + "; ".join(f"{n} {'PASS' if ok else 'MISS'} ({v})" for n, ok, v in checks))
PY
