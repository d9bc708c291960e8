#!/usr/bin/env bash
# Llama-3.2-3B-Instruct, 8xH100 | M2PO (tau 0.02) | staleness 256 updates: the tau ablation (tau 0.04 is ../llama3.2-3b-instruct/m2po_s256.sh)
# usage: bash $0 [--dry-run] [--cpu-smoke] [hydra overrides]    (see train-scripts/launch.sh)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../launch.sh"
launch llm=llama3.2-3b-instruct method=m2po m2po.stale.staleness_updates=256 actor_rollout_ref.actor.policy_loss.m2_threshold=0.02 \
    m2po.experiment.method=m2po_tau0.02 "$@"
