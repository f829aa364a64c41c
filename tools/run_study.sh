#!/usr/bin/env bash
# The MHGD study protocol (fixed before any result was seen): the authors' recipe, then
# one-at-a-time ablations, 5 seeds each, on one built-in setting. Every configuration is one
# `mhgd-fast study` call; they share the teacher and the baselines through the study folder.
# Usage: tools/run_study.sh demo|wide [extra flags for every call, e.g. --threads 1]
# Rerunning resumes; reports land in runs/study-<setting>/ (summary.md compares the configurations).
set -euo pipefail
setting=${1:?usage: tools/run_study.sh demo|wide [flags]}
shift
MHGD_FAST=${MHGD_FAST:-mhgd-fast}
run() { name=$1; shift; $MHGD_FAST study --setting "$setting" --study-dir "runs/study-$setting" --name "$name" --no-progress "$@"; }
common=("$@")
run recipe "${common[@]}"
run cap0.3 --transfer-cap 0.3 "${common[@]}"
run cap0.1 --transfer-cap 0.1 "${common[@]}"
run scale-rsqrt-d --scale rsqrt-d "${common[@]}"
run squash-none --squash none "${common[@]}"
if [ "$setting" = demo ]; then  # the stage-1 and head ablations: demo setting only (time budget)
  run stage1-x2.5 --stage1-epochs 10 "${common[@]}"
  run heads1 --heads 1 "${common[@]}"
fi
