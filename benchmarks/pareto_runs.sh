#!/usr/bin/env bash
# The paired runs behind results/quality/pareto.json: every method on the same calls.
#
#   bash benchmarks/pareto_runs.sh LANE [TASK...]   # LANE: 3a (GSM8K, MMLU, SQuAD with 3 agents)
#                                                   #       5a (the same with 5 agents)
#   python -m kvcomm_app.analysis.pareto results/quality/pareto-runs/*-[35]a.json \
#       --json results/quality/pareto.json --plot results/quality/pareto.png
#
# Each task runs once per lane: its dense run leads and every method replays the dense run's
# calls on an engine and pool of its own (kvcomm eval --paired), so methods are compared on
# identical inputs. One torch thread per run; the two lanes can run side by side on 2 cores.
# QUESTIONS overrides the measured questions per run (default 24 with 3 agents, 16 with 5);
# TASKs pick some of the lane's tasks; EXTRA_METHODS adds methods (e.g. "cacheblend:0.4").
set -euo pipefail
cd "$(dirname "$0")/.."
lane=${1:?usage: pareto_runs.sh 3a|5a}
case $lane in
  3a) agents=3; questions=${QUESTIONS:-24}; tasks="squad gsm8k mmlu" ;;
  5a) agents=5; questions=${QUESTIONS:-16}; tasks="gsm8k mmlu squad" ;;
  *) echo "unknown lane $lane (use 3a or 5a)" >&2; exit 2 ;;
esac
shift
if [ $# -gt 0 ]; then tasks="$*"; fi
out=results/quality/pareto-runs
mkdir -p "$out"
variants=()
for m in cacheblend:0.05 cacheblend:0.15 cacheblend:0.25 \
         hybrid-deviation:0.05 hybrid-deviation:0.15 hybrid-deviation:0.25 \
         epic:4 anchors-or-base-deviation:0.15 ${EXTRA_METHODS:-}; do
  variants+=(--paired-variant "method=$m")
done
for task in $tasks; do
  name=$task-${agents}a
  echo "== $name: $questions questions, $(date -u +%H:%M:%S)"
  kvcomm eval --task "$task" --agents "$agents" --questions "$questions" --warmup 4 \
    --max-new-tokens 48 --paired --paired-only --no-judge-shadow --threads 1 --no-progress \
    "${variants[@]}" --fidelity-json "$out/$name.json" --json "$out/$name.summary.json"
done
