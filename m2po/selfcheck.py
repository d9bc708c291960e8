"""Is the plugin really registered in verl? Checked in a fresh interpreter, as a Ray worker sees it.

verl imports `verl.plugins` entry points on `import verl` and swallows their errors at DEBUG
level, so a broken install otherwise surfaces only later, as "Unsupported loss mode: m2po".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from importlib import metadata

from m2po.configs import config_dir

ENTRY_POINT_GROUP = "verl.plugins"
ENTRY_POINT_NAME = "m2po"  # the losses, trainers and start-up checks
CPU_ENTRY_POINT_NAME = "m2po_cpu"  # the CPU backend, inert unless VERL_PLATFORM=cpu

# Runs in a fresh process: only `import verl` (and verl's own v1 trainer package, as main_ppo
# imports it), nothing of ours, then reports what verl registered.
_PROBE = r"""
import json, sys
import verl
from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY
report = {"verl": verl.__version__, "python": sys.version.split()[0], "registered": {}}
for name in LOSS_MODES:
    fn = POLICY_LOSS_REGISTRY.get(name)
    report["registered"][name] = None if fn is None else f"{fn.__module__}.{fn.__qualname__}"
import verl.utils.config
report["startup_checks"] = bool(getattr(verl.utils.config.validate_config, "_m2po_checks", False))
from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY
report["trainers"] = {name: TRAINER_REGISTRY[name].__module__ if name in TRAINER_REGISTRY else None
                      for name in OUR_TRAINER_MODES}
from omegaconf import OmegaConf
report["cpu_backend"] = {"loaded": "m2po.cpu_backend.plugin" in sys.modules,
                         "resolvers": OmegaConf.has_resolver("m2po_cpu_tiny")}
import torch, transformers
report["torch"] = torch.__version__
report["transformers"] = transformers.__version__
print("M2PO_PROBE " + json.dumps(report))
"""


def _probe_fresh_process() -> tuple[dict | None, str]:
    from m2po.verl_integration.trainer_modes import LOSS_MODES, OUR_TRAINER_MODES

    probe = f"LOSS_MODES = {LOSS_MODES!r}\nOUR_TRAINER_MODES = {OUR_TRAINER_MODES!r}\n" + _PROBE
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    for line in proc.stdout.splitlines():
        if line.startswith("M2PO_PROBE "):
            return json.loads(line[len("M2PO_PROBE ") :]), ""
    return None, (proc.stderr or proc.stdout)[-4000:]


def _diagnose() -> list[str]:
    """Why registration failed, as far as can be told from here."""
    hints = []
    policy = os.getenv("VERL_USE_EXTERNAL_PLUGINS", "auto").strip().lower()
    if policy == "none" or (policy != "auto" and ENTRY_POINT_NAME not in {p.strip() for p in policy.split(",")}):
        hints.append(f"VERL_USE_EXTERNAL_PLUGINS={policy!r} excludes the '{ENTRY_POINT_NAME}' plugin; unset it")
    entry_points = [ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name == ENTRY_POINT_NAME]
    if not entry_points:
        hints.append(
            f"no '{ENTRY_POINT_NAME}' entry point in group '{ENTRY_POINT_GROUP}' for {sys.executable}: "
            "install the package into this environment (pip install m2po, or pip install -e .)"
        )
    for ep in entry_points:
        try:
            ep.load()
        except Exception:  # noqa: BLE001 - we want the traceback verl hides
            hints.append(f"loading entry point {ep.value!r} fails:\n{traceback.format_exc()}")
    return hints


def run_check(stream=sys.stdout) -> int:
    """Print versions and registration status; 0 when the loss modes, our trainer modes and the start-up
    checks are registered by m2po (the CPU backend is reported, not required)."""
    report, error = _probe_fresh_process()
    try:
        version = metadata.version("m2po")
    except metadata.PackageNotFoundError:
        version = "not installed"
    print(f"m2po {version} (configs: {config_dir()})", file=stream)
    if report is None:
        print("FAIL: `import verl` failed in a fresh process:\n" + error, file=stream)
        return 1
    print(
        f"verl {report['verl']}, torch {report['torch']}, transformers {report['transformers']}, "
        f"python {report['python']}",
        file=stream,
    )
    ok = True
    for name, target in report["registered"].items():
        ours = target is not None and target.startswith("m2po.")
        ok &= ours
        status = "ok" if ours else ("MISSING" if target is None else f"registered by someone else: {target}")
        print(f"  loss_mode={name}: {status}{f' ({target})' if ours else ''}", file=stream)
    for name, module in report["trainers"].items():
        ours = module is not None and module.startswith("m2po.")
        ok &= ours
        print(f"  trainer.v1.trainer_mode={name}: {'ok' if ours else 'MISSING'}", file=stream)
    ok &= report["startup_checks"]
    print(
        f"  start-up checks in verl's validate_config: {'ok' if report['startup_checks'] else 'MISSING'}", file=stream
    )
    cpu = report["cpu_backend"]
    cpu_ok = cpu["loaded"] and cpu["resolvers"]
    print(
        f"  CPU backend (entry point '{CPU_ENTRY_POINT_NAME}', active only with VERL_PLATFORM=cpu): "
        f"{'ok' if cpu_ok else 'NOT LOADED (only needed for CPU runs; the losses and trainers do not depend on it)'}",
        file=stream,
    )
    if not ok:
        for hint in _diagnose():
            print("  hint: " + hint, file=stream)
        print("FAIL: M2PO is not (fully) registered in verl", file=stream)
        return 1
    print(
        "OK: a fresh `import verl` registers the M2PO losses, trainers and start-up checks "
        "(as in every Ray worker of this environment)",
        file=stream,
    )
    return 0
