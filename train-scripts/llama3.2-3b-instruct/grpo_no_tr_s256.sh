#!/usr/bin/env bash
# Llama-3.2-3B-Instruct, 8xH100 | GRPO without trust region | staleness 256 updates
# usage: bash $0 [--dry-run] [--cpu-smoke] [hydra overrides]    (see train-scripts/launch.sh)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../launch.sh"
launch llm=llama3.2-3b-instruct method=grpo_no_tr m2po.stale.staleness_updates=256 "$@"
