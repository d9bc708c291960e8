#!/usr/bin/env bash
# Qwen2.5-Math-7B, 8xH100 | M2PO (tau 0.08) | staleness 256 updates: the tau ablation (tau 0.04 is ../qwen2.5-math-7b/m2po_s256.sh)
# usage: bash $0 [--dry-run] [--cpu-smoke] [hydra overrides]    (see train-scripts/launch.sh)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../launch.sh"
launch llm=qwen2.5-math-7b method=m2po m2po.stale.staleness_updates=256 actor_rollout_ref.actor.policy_loss.m2_threshold=0.08 \
    m2po.experiment.method=m2po_tau0.08 "$@"
