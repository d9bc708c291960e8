#!/usr/bin/env bash
# Qwen3-Base-4B, 8xH100 | GSPO (clip 3e-4/4e-4, sequence-level) | staleness 256 updates
# usage: bash $0 [--dry-run] [--cpu-smoke] [hydra overrides]    (see train-scripts/launch.sh)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../launch.sh"
launch llm=qwen3-base-4b method=gspo m2po.stale.staleness_updates=256 "$@"
