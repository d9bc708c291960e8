"""Testbed configuration: dataclasses validated at construction, and the named presets."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

from m2po.algorithm import PAPER_M2_THRESHOLD
from m2po.buffer import WARMUP_BASE_POLICY, StalenessConfig
from m2po.testbed.model import ModelConfig
from m2po.testbed.task import TASKS, AdditionTask, CopyThenAddTask, task_to_json

# method name -> (verl loss_mode, stale?): what the testbed's own loop runs
METHODS = {
    "grpo_s0": ("vanilla", False),
    "grpo_stale": ("vanilla", True),
    "no_tr_stale": ("no_trust_region", True),
    "m2po_stale": ("m2po", True),
}


@dataclass(frozen=True)
class VerlMethod:
    """How a method runs through verl's trainer (`--engine verl`, m2po.testbed.verl_engine)."""

    loss_mode: str  # verl's policy_loss.loss_mode
    stale: bool  # stale@k through the m2po_stale trainer (k = RLConfig.staleness_updates)
    asynchronous: bool  # verl's separate_async trainer (m2po_separate_async): the staleness it produces
    label: str


# The testbed's four methods plus verl's asynchronous trainer, which only exists in verl.
VERL_METHODS = {
    "grpo_s0": VerlMethod("vanilla", False, False, "GRPO, on-policy (s=0)"),
    "grpo_stale": VerlMethod("vanilla", True, False, "GRPO, stale"),
    "no_tr_stale": VerlMethod("no_trust_region", True, False, "GRPO no trust region, stale"),
    "m2po_stale": VerlMethod("m2po", True, False, "M2PO, stale"),
    "grpo_async": VerlMethod("vanilla", False, True, "GRPO, separate_async"),
    "m2po_async": VerlMethod("m2po", False, True, "M2PO, separate_async"),
}
ENGINES = {"testbed": METHODS, "verl": VERL_METHODS}


# What a testbed policy is and how its accuracy is measured; part of the base policy's cache key.
# Version 2: the softmax over the whole vocabulary, as verl computes it (version 1 masked every logit
# but digits and EOS), evaluated with fresh sampling draws (version 1 reused one draw).
POLICY_DEFINITION = "full-vocabulary softmax, fresh evaluation draws (v2)"


@dataclass(frozen=True)
class SFTConfig:
    """The supervised fine-tuning that yields the weak base policy (`TestbedConfig.sft`; not the
    stale@k warm-up, which is `RLConfig.warmup`)."""

    # Half the SFT answers are right, half random wrong numbers: the base policy puts real mass on
    # the right answer but samples it rarely (~9%), like a base LLM that RL can sharpen. (A short
    # SFT on correct answers only gives ~30% with systematic errors that RL barely moves; 20%
    # correct answers are too weak a signal to learn addition at all at this scale.)
    steps: int = 800
    batch_size: int = 128
    lr: float = 1e-3
    correct_fraction: float = 0.5  # the rest of the SFT answers are random wrong numbers

    def __post_init__(self):
        if self.steps < 0 or self.batch_size < 1:
            raise ValueError(f"sft.steps must be >= 0 and sft.batch_size >= 1, got {self}")
        if not 0.0 <= self.correct_fraction <= 1.0:
            raise ValueError(f"sft.correct_fraction must be in [0, 1], got {self.correct_fraction}")


@dataclass(frozen=True)
class RLConfig:
    iterations: int = 400
    prompts_per_iteration: int = 16
    samples_per_prompt: int = 8
    mini_batches: int = 4  # optimizer updates per iteration (staleness counts these)
    # The addition task's settings. 5e-5: stale GRPO lags, no-TR keeps pace then wobbles, M2PO tracks
    # on-policy. At 1e-4 no-TR collapses in every seed but M2PO drops too; 3e-4 and up collapse even
    # on-policy (docs/testbed.md). The copy_add preset clips at 1.0 as published.
    lr: float = 5e-5
    grad_clip: float | None = None  # None: no clipping
    clip_ratio: float = 0.2  # GRPO's epsilon
    m2_threshold: float = PAPER_M2_THRESHOLD
    m2po_variant: str = "mask"
    # None: each loss call is a whole mini-batch (M2PO's cut over the mini-batch, verl's m2_scope=mini_batch);
    # k: the loss is called per k-sequence micro-batch with the gradient accumulated, as verl calls it, so
    # M2PO's cut is per micro-batch (m2_scope=micro_batch). Nothing else changes (the same normalisation).
    m2_micro_batch: int | None = None
    staleness_updates: int = 64  # k for the *_stale methods
    warmup: str = WARMUP_BASE_POLICY
    eval_every: int = 10
    eval_problems: int = 1024
    checkpoint_every: int = 20

    def __post_init__(self):
        positive = ("iterations", "prompts_per_iteration", "samples_per_prompt", "mini_batches", "eval_every",
                    "eval_problems", "checkpoint_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"rl.{name} must be >= 1, got {getattr(self, name)}")
        if (self.prompts_per_iteration * self.samples_per_prompt) % self.mini_batches:
            raise ValueError(
                f"rl.prompts_per_iteration x rl.samples_per_prompt ({self.prompts_per_iteration * self.samples_per_prompt})"
                f" must be divisible by rl.mini_batches ({self.mini_batches})"
            )
        self.staleness(stale=True)  # k a multiple of u, a known warm-up: the buffer's own checks
        if self.lr <= 0:
            raise ValueError(f"rl.lr must be > 0, got {self.lr}")
        if self.grad_clip is not None and not 0 < self.grad_clip < float("inf"):
            raise ValueError(f"rl.grad_clip must be a positive number or None (no clipping), got {self.grad_clip}")
        mini_batch = self.prompts_per_iteration * self.samples_per_prompt // self.mini_batches
        if self.m2_micro_batch is not None and not (
            isinstance(self.m2_micro_batch, int) and self.m2_micro_batch >= 1 and mini_batch % self.m2_micro_batch == 0
        ):
            raise ValueError(
                f"rl.m2_micro_batch must divide the mini-batch of {mini_batch} sequences (or be None: one loss call per "
                f"mini-batch), got {self.m2_micro_batch!r}"
            )

    def staleness(self, stale: bool) -> StalenessConfig:
        """A run's stale@k: k = `staleness_updates` for the *_stale methods, 0 on-policy; u = `mini_batches`."""
        return StalenessConfig(self.staleness_updates if stale else 0, self.mini_batches, self.warmup, key_prefix="rl")


@dataclass(frozen=True)
class TestbedConfig:
    __test__ = False  # not a pytest class, despite the name
    task: AdditionTask = field(default_factory=lambda: AdditionTask(num_digits=2))
    model: ModelConfig = field(default_factory=ModelConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    methods: tuple[str, ...] = tuple(METHODS)
    seeds: tuple[int, ...] = (0, 1, 2)
    base_seed: int = 1234  # the base policy (model init + SFT data) is shared by every run
    engine: str = "testbed"  # testbed: the package's own loop (m2po.testbed.rl); verl: verl's main_ppo

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {list(ENGINES)}, got {self.engine!r}")
        allowed = ENGINES[self.engine]
        unknown = [m for m in self.methods if m not in allowed]
        if unknown:
            raise ValueError(f"methods {unknown} unknown for engine {self.engine!r}; allowed: {list(allowed)}")
        if not self.seeds:
            raise ValueError("seeds must not be empty")

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["task"] = task_to_json(self.task)
        if out["rl"]["m2_micro_batch"] is None:  # the default: results folders written before the key stay valid
            del out["rl"]["m2_micro_batch"]
        return out

    def experiment_json(self) -> dict:
        """What makes two engines' runs comparable: task, model, SFT, RL settings, base seed."""
        return self.experiment_json_of(self.to_json())

    @staticmethod
    def experiment_json_of(config_json: dict) -> dict:
        return {key: config_json.get(key) for key in ("task", "model", "sft", "rl", "base_seed")}

    def base_policy_key(self) -> str:
        """Cache key of the base policy: everything it depends on."""
        payload = json.dumps([task_to_json(self.task), dataclasses.asdict(self.model),
                              dataclasses.asdict(self.sft), self.base_seed, POLICY_DEFINITION], sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


# copy_add shows the paper's regime (few decision tokens among many predictable ones) more clearly
# than addition: docs/testbed.md compares the two, measured.
DEFAULT_TASK = "copy_add"


def preset(name: str, task: str = DEFAULT_TASK) -> TestbedConfig:
    """"default": the README experiment (3 seeds, ~12 min on 2 cores); "quick": the CI smoke run (~1 min).
    `task`: "addition" (answer only) or "copy_add" (operands restated before the answer)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")
    if name not in ("default", "quick"):
        raise ValueError(f"preset must be 'default' or 'quick', got {name!r}")
    if task == "addition":
        config = TestbedConfig()
    else:
        # 20-token responses cost ~2.3x the addition task's per iteration: fewer iterations, a
        # smaller held-out set, and an SFT that learns the restatement (lr 2e-3, 1,000 steps: base
        # accuracy 0.082 on the 512 held-out problems, restatement exact in 98% of samples and
        # 0.011 nats per restated token in a design probe; docs/testbed.md).
        # lr 5e-5 with the published gradient clipping at 1.0, 300 iterations: the sweep's choice by the
        # criterion fixed before it ran (m2po/testbed/sweep.py; docs/testbed.md, "The paper's regime").
        config = TestbedConfig(
            task=CopyThenAddTask(num_digits=2, copies=4),
            sft=SFTConfig(steps=1000, lr=2e-3),
            rl=RLConfig(iterations=300, lr=5e-5, grad_clip=1.0, eval_every=10, eval_problems=512),
        )
    if name == "quick":
        config = dataclasses.replace(
            config,
            sft=dataclasses.replace(config.sft, steps=200),
            rl=dataclasses.replace(config.rl, iterations=24, staleness_updates=16, eval_every=8, eval_problems=256,
                                   checkpoint_every=8),
            seeds=(0,),
        )
    return config
