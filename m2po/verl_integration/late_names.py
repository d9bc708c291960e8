"""Names verl resolves late, checked at start-up.

verl 0.9.1 looks several names up only when it first needs them: the policy loss at the first actor
update (`verl/workers/utils/losses.py`), which in a stale@256 run comes after the 64-batch warm-up;
the trainer class, the rollout replica and the custom reward function once Ray and the workers are
up. A typo in any of them passes verl's own `validate_config` and costs the GPUs' time until then.
Here each is checked against what verl will look it up in, from the driver, before Ray starts
(`startup_checks`), with the allowed values and the nearest one.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os

from omegaconf import DictConfig, OmegaConf

from m2po.verl_integration.trainer_modes import OUR_TRAINER_MODES, trainer_mode

PKG_PREFIX, FILE_PREFIX = "pkg://", "file://"  # verl.utils.import_utils.load_module's two forms
# What verl 0.9.1 registers itself (trainer/ppo/v1/trainer_*.py, workers/rollout/replica.py): a name
# among these (or ours) needs no import of the registry (verl.trainer.ppo.v1 costs ~2 s at start-up).
VERL_TRAINER_MODES = ("sync", "separate_async", "colocate_async")
VERL_ROLLOUTS = ("vllm", "sglang", "trtllm")


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions)."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def nearest(value: str, allowed) -> str | None:
    """The allowed value with the fewest edits from `value` if that is a typo's worth (at most 2, or a
    quarter of the length), else the closest by difflib's ratio (>= 0.6), else None."""
    value, allowed = str(value), sorted({str(a) for a in allowed})
    if not allowed:
        return None
    best = min(allowed, key=lambda a: (edit_distance(value, a), a))
    if edit_distance(value, best) <= max(2, len(value) // 4):
        return best
    close = difflib.get_close_matches(value, allowed, n=1, cutoff=0.6)
    return close[0] if close else None


def did_you_mean(value: str, allowed) -> str:
    """' (did you mean 'x'?)' for the nearest allowed value, or ''."""
    close = nearest(value, allowed)
    return f" (did you mean {close!r}?)" if close else ""


def unknown_name(key: str, value, allowed) -> str:
    allowed = sorted(str(a) for a in allowed)
    return f"{key}={value!r} is not a name verl 0.9.1 knows{did_you_mean(value, allowed)}; allowed: {', '.join(allowed)}"


def registered_policy_losses() -> set[str]:
    from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY

    return set(POLICY_LOSS_REGISTRY)


def known_advantage_estimators() -> set[str]:
    from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY, AdvantageEstimator

    # compute_advantage handles GAE and GRPO itself, everything else through the registry
    return set(ADV_ESTIMATOR_REGISTRY) | {AdvantageEstimator.GAE.value, AdvantageEstimator.GRPO.value}


def registered_trainers() -> set[str]:
    from verl.trainer.ppo.v1 import trainer_base  # importing it registers ours (post-import hook)

    return set(trainer_base.TRAINER_REGISTRY)


def registered_rollouts() -> set[str]:
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    return set(RolloutReplicaRegistry._registry)  # the CPU backend registers "hf" there when active


def _module_file(path: str) -> str | None:
    """The source file verl's `load_module` would execute for `path`, without executing it."""
    if path.startswith(PKG_PREFIX):
        name = path[len(PKG_PREFIX):].replace("/", ".")
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            return None
        return spec.origin if spec is not None and spec.origin and os.path.isfile(spec.origin) else None
    path = path[len(FILE_PREFIX):] if path.startswith(FILE_PREFIX) else path
    return path if os.path.isfile(path) else None


def top_level_names(source: str) -> set[str] | None:
    """Names a module defines at its top level (functions, classes, assignments, imports); None when
    it may define others in ways not visible statically (`from x import *`, a module `__getattr__`)."""
    names: set[str] = set()
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                if alias.name == "*":
                    return None
                names.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            return None  # conditional definitions: not worth guessing
    return None if "__getattr__" in names else names


def custom_reward_errors(config: DictConfig) -> list[str]:
    section = "reward.custom_reward_function"
    path = OmegaConf.select(config, f"{section}.path", default=None)
    if not path:
        return []
    name = OmegaConf.select(config, f"{section}.name", default=None)
    if not name:
        return [f"{section}.name is not set: verl needs the name of the function in {section}.path={path!r}"]
    module_file = _module_file(str(path))
    if module_file is None:
        form = "a module that cannot be found" if str(path).startswith(PKG_PREFIX) else "a file that does not exist"
        return [f"{section}.path={path!r} is {form} (relative paths are from the directory main_ppo starts in: "
                f"{os.getcwd()})"]
    with open(module_file, encoding="utf-8") as f:
        try:
            names = top_level_names(f.read())
        except SyntaxError as error:
            return [f"{section}.path={path!r}: {module_file} does not parse: {error}"]
    if names is not None and name not in names:
        functions = sorted(n for n in names if not n.startswith("_"))
        return [f"{section}.name={name!r} is not defined in {module_file}{did_you_mean(name, functions)}; "
                f"it defines: {', '.join(functions) or 'nothing public'}"]
    return []


def late_name_errors(config: DictConfig) -> list[str]:
    """One message per name in `config` that verl would fail to resolve only after start-up."""
    errors = []
    loss_mode = OmegaConf.select(config, "actor_rollout_ref.actor.policy_loss.loss_mode", default=None)
    if loss_mode is not None and loss_mode not in (losses := registered_policy_losses()):
        errors.append(unknown_name("actor_rollout_ref.actor.policy_loss.loss_mode", loss_mode, losses))
    estimator = OmegaConf.select(config, "algorithm.adv_estimator", default=None)
    if estimator is not None and str(estimator) not in (estimators := known_advantage_estimators()):
        errors.append(unknown_name("algorithm.adv_estimator", estimator, estimators))
    mode = trainer_mode(config)
    if mode not in ("v0", *VERL_TRAINER_MODES, *OUR_TRAINER_MODES) and mode not in (trainers := registered_trainers()):
        errors.append(unknown_name("trainer.v1.trainer_mode", mode, trainers))
    rollout = OmegaConf.select(config, "actor_rollout_ref.rollout.name", default=None)
    # on the CPU backend (VERL_PLATFORM=cpu) its own start-up check names the rollouts it runs; it
    # registers its `hf` rollout when verl is imported with the variable set, which a process that set
    # it later (a test, a notebook) has not done
    cpu_backend = os.environ.get("VERL_PLATFORM", "").lower() == "cpu"
    if (rollout is not None and rollout not in VERL_ROLLOUTS and not cpu_backend
            and rollout not in (rollouts := registered_rollouts())):
        errors.append(unknown_name("actor_rollout_ref.rollout.name", rollout, rollouts))
    return errors + custom_reward_errors(config)
