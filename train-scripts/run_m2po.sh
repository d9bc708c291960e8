#!/usr/bin/env bash
# Launch verl's own trainer with M2PO: any hydra override of verl's ppo_trainer works here.
#
#   bash train-scripts/run_m2po.sh data.train_files=... actor_rollout_ref.model.path=...
#   bash train-scripts/run_m2po.sh --dry-run [overrides...]   # compose + print the config, run nothing
#
# Needs the m2po package installed in the active Python environment (`m2po check` verifies).
set -euo pipefail

PYTHON=${PYTHON:-python}
dry_run=()
if [[ "${1:-}" == "--dry-run" ]]; then
    dry_run=(--cfg job)
    shift
fi

config_dir=$("$PYTHON" -m m2po config-dir)
exec "$PYTHON" -m verl.trainer.main_ppo \
    --config-path "$config_dir" --config-name m2po_trainer \
    "${dry_run[@]}" "$@"
