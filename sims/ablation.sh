#!/usr/bin/env bash
# Which of tomo's departures from serf earns its place: start from serf's
# profile and add one change at a time (cumulative), then vary each choice
# around tomo's defaults. Means over seeds (default 1 2 3) of the acceptance
# runs (1000 rounds, k 1, random peers) on the real datasets.
#   sims/ablation.sh > /tmp/ablation.md
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DS="${DATASETS:-$ROOT/../shared/datasets}"
SEEDS="${SEEDS:-1..3}"
(cd "$ROOT" && cargo build --release --quiet)
T="$ROOT/target/release/tomo"

# name | profile | --set overrides
CASES=(
  "serf 0.9.4|serf|"
  "+ no adjustment term|serf|adjustment_window=0"
  "+ gravity 512 ms (every 8th update)|serf|adjustment_window=0 gravity_rho=16.1908616200621 gravity_every=8"
  "+ 25th-percentile-of-4 filter|serf|adjustment_window=0 gravity_rho=16.1908616200621 gravity_every=8 latency_filter_size=4 latency_filter_quantile=0.25"
  "+ short-link weighting (alpha 2)|serf|adjustment_window=0 gravity_rho=16.1908616200621 gravity_every=8 latency_filter_size=4 latency_filter_quantile=0.25 short_link_alpha=2"
  "+ close-peer replay (8 peers, every 4th update, weight 0.4)|serf|adjustment_window=0 gravity_rho=16.1908616200621 gravity_every=8 latency_filter_size=4 latency_filter_quantile=0.25 short_link_alpha=2 neighbors=8 refine_every=4 refine_weight=0.4"
  "+ smoothed published coordinate (0.05)|tomo|ramp_updates=0"
  "+ start-up ramp over 200 updates = tomo|tomo|"
  "tomo, ramp over 50 updates|tomo|ramp_updates=50"
  "tomo, ramp over 1000 updates|tomo|ramp_updates=1000"
  "tomo, alpha 1|tomo|short_link_alpha=1"
  "tomo, alpha 3|tomo|short_link_alpha=3"
  "tomo, no replay|tomo|refine_every=0"
  "tomo, replay weight 0.2|tomo|refine_weight=0.2"
  "tomo, replay weight 0.8|tomo|refine_weight=0.8"
  "tomo, replay every 2nd update, weight 0.2|tomo|refine_every=2 refine_weight=0.2"
  "tomo, 4 close peers|tomo|neighbors=4"
  "tomo, 16 close peers|tomo|neighbors=16"
  "tomo, no smoothing|tomo|publish_smoothing=1"
  "tomo, smoothing 0.2|tomo|publish_smoothing=0.2"
  "tomo, smoothing 0.02|tomo|publish_smoothing=0.02"
  "tomo, serf's median-of-3 filter|tomo|latency_filter_size=3 latency_filter_quantile=0.5"
  "tomo, minimum-of-4 filter|tomo|latency_filter_quantile=0"
  "tomo, with serf's adjustment term|tomo|adjustment_window=20"
)
SETS=("azure.ltm|" "planetlab490.median.ltm|" "wondernetwork242.min.ltm|" "seattle99.median.ltm|" "seattle99.median.ltm|seattle99.series.ltm.gz")

printf '| variant | azure med / p99 / NN / r@5 | planetlab490 | wondernetwork242.min | seattle99.median | seattle99 + series (med / p99 / NN) |\n'
printf '| --- | --- | --- | --- | --- | --- |\n'
for c in "${CASES[@]}"; do
  IFS='|' read -r name profile sets <<<"$c"
  args=(--profile "$profile" --bench-updates 0 --rounds 1000 --k 1 --select random --holdout 0 --sweep "seed=$SEEDS")
  for s in $sets; do args+=(--set "$s"); done
  row="| $name |"
  for d in "${SETS[@]}"; do
    IFS='|' read -r m o <<<"$d"
    extra=()
    [ -n "$o" ] && extra=(--observe "$DS/$o")
    row+=$("$T" sim --dataset "$DS/$m" "${extra[@]}" "${args[@]}" | python3 -c '
import json, sys, statistics as st
R = [json.loads(l)["result"] for l in sys.stdin]
m = lambda k: st.mean(r[k] for r in R)
obs = len(sys.argv) > 1
print(" %.4f / %.3f / %.2f%s |" % (m("median_rel_err"), m("p99_rel_err"), m("nn_accuracy"), "" if obs else " / %.2f" % m("nn_recall_at_5")), end="")
' ${o:+obs})
  done
  echo "$row"
done
