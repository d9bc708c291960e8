#!/usr/bin/env bash
# The staleness sweep on Qwen2.5-Math-7B: GRPO and M2PO at s = 0, 32, 64, 128, 256, one run after
# another (s = 0 and 256 are the main experiment's scripts). Arguments go to every run.
set -euo pipefail
here=$(dirname "${BASH_SOURCE[0]}")
for method in grpo m2po; do
    for script in "$here/../qwen2.5-math-7b/${method}_s0.sh" "$here/${method}_s32.sh" "$here/${method}_s64.sh" \
                  "$here/${method}_s128.sh" "$here/../qwen2.5-math-7b/${method}_s256.sh"; do
        bash "$script" "$@"
    done
done
