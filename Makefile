# One command per job; each creates .venv from scratch when it is missing or pyproject.toml changed.
#   make main-job  the embedded CPU experiment (stale-data RL on a tiny model) -> outputs/testbed/
#   make verl-job  the same experiment through verl's own trainer on CPU, cross-checked against main-job's
#                  results (run main-job first; ~2.5 h on 2 cores: 93 min measured for 200 steps) -> outputs/testbed-verl/
#   make test    install everything (CPU) and run the whole test suite  <- CI runs this
#   make check   verify that `import verl` registers the M2PO losses
#   make cpu-smoke  verl's real trainer on CPU: a few steps of the Qwen2.5-Math-7B M2PO s256 settings, tiny model
#   make bench   CPU benchmark of the policy losses (table + benchmarks/results/*.json)
#   make bench-buffer  the stale buffer at the paper's scale (64 x 2048 x 4k tokens; ~8 GB of temporary disk)
#   make bench-verl    where a step of verl's trainer goes on CPU, verl's defaults vs the CPU backend
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch; set TORCH_PIP_ARGS (e.g. an extra index) where plain PyPI would
# resolve torch to a CUDA build.
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: main-job verl-job test check bench bench-buffer bench-verl cpu-smoke install clean

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PIP) -c constraints-cpu.txt -e ".[test]"
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m m2po check
	$(PY) -m pytest -q

main-job: $(VENV)/.installed
	$(PY) -m m2po.testbed

verl-job: $(VENV)/.installed
	$(PY) -m m2po.testbed --engine verl

check: $(VENV)/.installed
	$(PY) -m m2po check

cpu-smoke: $(VENV)/.installed
	PYTHON=$(PY) bash train-scripts/qwen2.5-math-7b/m2po_s256.sh --cpu-smoke

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_policy_loss.py

bench-buffer: $(VENV)/.installed
	$(PY) benchmarks/bench_stale_buffer.py

bench-verl: $(VENV)/.installed
	$(PY) benchmarks/bench_verl_cpu_step.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis benchmarks/results
