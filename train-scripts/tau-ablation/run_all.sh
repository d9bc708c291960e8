#!/usr/bin/env bash
# The tau ablation: M2PO at s = 256 with tau = 0.005, 0.01, 0.02, 0.04, 0.08, 0.16 on
# Llama-3.2-3B-Instruct and Qwen2.5-Math-7B, one run after another (tau = 0.04, the paper's value
# everywhere else, is each model's m2po_s256.sh). Arguments go to every run.
set -euo pipefail
here=$(dirname "${BASH_SOURCE[0]}")
for llm in llama3.2-3b-instruct qwen2.5-math-7b; do
    for tau in 0.005 0.01 0.02 0.04 0.08 0.16; do
        if [[ $tau == 0.04 ]]; then
            bash "$here/../$llm/m2po_s256.sh" "$@"
        else
            bash "$here/${llm}_m2po_tau${tau}_s256.sh" "$@"
        fi
    done
done
