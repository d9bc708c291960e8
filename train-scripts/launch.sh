# Shared launcher, sourced by every experiment script (one line each):
#
#   launch llm=<model> method=<loss> m2po.stale.staleness_updates=<k> "$@"
#
# All shared hyper-parameters live in configs/m2po_paper.yaml, per-model ones in configs/llm/,
# per-loss ones in configs/method/. Arguments given to an experiment script:
#   --dry-run        compose and validate the complete config on CPU (no GPU, model or data
#                    needed), print it, run nothing
#   --cpu-smoke      run this experiment's algorithm settings (loss, staleness, warm-up, updates
#                    per step) for a few real steps of verl's main_ppo on CPU, with a tiny model
#                    and task built offline (VERL_PLATFORM=cpu, overlay +cpu=tiny); with --dry-run,
#                    print that config instead
#   anything else    a hydra override applied last, e.g. actor_rollout_ref.model.path=/ckpt/qwen
#                    trainer.nnodes=2 trainer.n_gpus_per_node=8 data.train_files=...
# PYTHON selects the interpreter (default: python); DATA_DIR the data folder (default: data);
# VERL_FILE_LOGGER_ROOT where verl's metrics file goes (default: checkpoints, see below).

launch() {
    local python=${PYTHON:-python}
    local dry_run=0 cpu_smoke=0
    local overrides=()
    local arg
    for arg in "$@"; do
        case "$arg" in
            --dry-run) dry_run=1 ;;
            --cpu-smoke) cpu_smoke=1 ;;
            --*) echo "unknown option $arg (supported: --dry-run, --cpu-smoke; everything else is a hydra override)" >&2; return 2 ;;
            *) overrides+=("$arg") ;;
        esac
    done
    if ((cpu_smoke)); then
        # The smoke settings go first so that every override given to the script still wins.
        local smoke
        smoke=$("$python" -m m2po.cpu_backend.smoke --config-name m2po_paper "${overrides[@]}") || return 2
        mapfile -t smoke <<<"$smoke"
        overrides=("${smoke[@]}" "${overrides[@]}")
        export VERL_PLATFORM=cpu
    fi
    if ((dry_run)); then
        exec "$python" -m m2po.dry_run --config-name m2po_paper "${overrides[@]}"
    fi
    # verl's file logger writes <root>/<project>/<experiment>.jsonl: with the root "checkpoints" that is
    # beside the run's folder (trainer.default_local_dir), where `m2po report <folder>` looks.
    export VERL_FILE_LOGGER_ROOT=${VERL_FILE_LOGGER_ROOT:-checkpoints}
    local config_dir
    config_dir=$("$python" -m m2po config-dir)
    exec "$python" -m verl.trainer.main_ppo --config-path "$config_dir" --config-name m2po_paper "${overrides[@]}"
}
