#!/usr/bin/env bash
# The MHGD study protocol, fixed before any result was seen: the authors' recipe, then
# one-at-a-time ablations, 5 seeds each, on one built-in setting. Each configuration is one
# `mhgd-fast study` call; they share the teacher and the baselines through the study folder, and
# rerunning resumes. Reports: runs/study-<setting>/<name>/study.md, runs/study-<setting>/summary.md.
#
# Usage: tools/run_study.sh demo|wide [flags for every call, e.g. --threads 1]
#        VARIANTS="cap0.3 heads1" tools/run_study.sh demo   # a subset (in that order)
# MHGD_FAST names the command (default: mhgd-fast).
set -euo pipefail
setting=${1:?usage: tools/run_study.sh demo|wide [flags]}
shift
declare -A FLAGS=(
  [recipe]=""                               # the authors': cap 1, scale 1, tanh, 8 heads, 40 : 100
  [cap0.3]="--transfer-cap 0.3"
  [cap0.1]="--transfer-cap 0.1"
  [scale-rsqrt-d]="--scale rsqrt-d"
  [squash-none]="--squash none"
  [stage1-x2.5]="--stage1-epochs STAGE1_LONG"  # stage 1 as long as stage 2 (100 : 100)
  [heads1]="--heads 1"
)
ORDER="recipe cap0.3 cap0.1 scale-rsqrt-d squash-none stage1-x2.5 heads1"
case "$setting" in
  demo) stage1_long=10 ;;
  wide) stage1_long=20 ;;
  *) echo "unknown setting $setting (demo or wide)" >&2; exit 2 ;;
esac
for name in ${VARIANTS:-$ORDER}; do
  [[ -v "FLAGS[$name]" ]] || { echo "unknown variant $name (known: $ORDER)" >&2; exit 2; }
  # shellcheck disable=SC2086  # the flags are words
  ${MHGD_FAST:-mhgd-fast} study --setting "$setting" --study-dir "runs/study-$setting" --name "$name" \
    --no-progress ${FLAGS[$name]//STAGE1_LONG/$stage1_long} "$@"
done
