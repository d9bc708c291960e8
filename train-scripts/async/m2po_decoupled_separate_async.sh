#!/usr/bin/env bash
# Qwen2.5-Math-7B, one 8xH100 node: 4 train + 4 rollout (+async_layout=two_nodes: 8 + 8) | M2PO, AReaL's decoupled variant (mask on pi_prox / pi_behav, clip against pi_prox) | verl's separate_async, up to 64 versions (256 updates) stale
# usage: bash $0 [--dry-run] [--cpu-smoke] [hydra overrides]    (see train-scripts/launch.sh)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../launch.sh"
launch llm=qwen2.5-math-7b method=m2po +async=separate_decoupled "$@"
