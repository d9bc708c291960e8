#!/usr/bin/env bash
# Launch verl's own trainer with M2PO: any hydra override of verl's ppo_trainer works here.
#
#   bash train-scripts/run_m2po.sh data.train_files=... actor_rollout_ref.model.path=...
#   bash train-scripts/run_m2po.sh --dry-run [overrides...]   # compose + validate + print the config, run nothing
#
# --dry-run means what it means for every experiment script (train-scripts/launch.sh): verl's and
# M2PO's start-up checks on the composed config (python -m m2po.dry_run), no GPU, model or data.
# Needs the m2po package installed in the active Python environment (`m2po check` verifies).
set -euo pipefail

PYTHON=${PYTHON:-python}
if [[ "${1:-}" == "--dry-run" ]]; then
    shift
    exec "$PYTHON" -m m2po.dry_run --config-name m2po_trainer "$@"
fi

config_dir=$("$PYTHON" -m m2po config-dir)
exec "$PYTHON" -m verl.trainer.main_ppo --config-path "$config_dir" --config-name m2po_trainer "$@"
