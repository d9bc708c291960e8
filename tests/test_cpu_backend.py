"""The CPU backend's pieces, without starting verl's trainer (that is tests/test_cpu_e2e.py):
inert unless selected, the pinned patches, the batched sampler, the tiny model, the start-up
checks and every training script's CPU smoke config."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from m2po.cpu_backend import tiny
from m2po.cpu_backend.config import cpu_config_errors
from m2po.cpu_backend.patches import (
    MASTER_PORT_FLOOR,
    MASTER_PORT_WINDOW,
    POLL_INTERVAL_ENV,
    POLL_INTERVAL_S,
    _collapse_gloo_backend,
    ephemeral_port_floor,
    master_port_window,
)
from m2po.cpu_backend.sampler import SampleRequest, request_seed, sample_batch
from m2po.cpu_backend.smoke import smoke_overrides
from m2po.configs import compose as compose_config
from m2po.data import PAPER_BENCHMARKS
from m2po.dry_run import main as dry_run_main
from tests.test_train_scripts import EXPERIMENT_SCRIPTS, SCRIPTS_DIR, _python_call

REGISTRY_PROBE = """
import json, logging, os, torch
import verl
from verl.plugin.platform.platform_manager import PlatformRegistry, get_platform
from verl.workers.engine.base import EngineRegistry
from verl.workers.engine.fsdp import transformer_impl
from verl.workers.rollout import base
from verl.workers.rollout.replica import RolloutReplicaRegistry
from verl.checkpoint_engine.base import CheckpointEngineRegistry
from verl.utils import fsdp_utils
from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer
from verl.single_controller.ray.base import RayWorkerGroup
buffer = ReplayBuffer(trainer_mode="sync", trainer_config={}, max_off_policy_threshold=None,
                      max_off_policy_strategy="drop", sampler_kwargs={})
print(json.dumps({
    "platforms": sorted(PlatformRegistry.registered_names()),
    "replicas": sorted(RolloutReplicaRegistry._registry),
    "rollouts": sorted(name for name, _ in base._ROLLOUT_REGISTRY),
    "cpu_engines": sorted(b for b, keys in EngineRegistry._engines["language_model"].items() if "cpu" in keys),
    "init_process_group_patched": hasattr(torch.distributed.init_process_group, "_m2po_cpu_patch"),
    "offload_policy": transformer_impl.CPUOffloadPolicy.__name__,
    "snapshot_patched": hasattr(fsdp_utils.fsdp2_sharded_save_to_cpu, "_m2po_cpu_patch"),
    "master_port_patched": hasattr(RayWorkerGroup._get_master_addr_port, "_m2po_cpu_patch"),
    "checkpoint_engines": sorted(CheckpointEngineRegistry._registry),
    "device": get_platform().device_name,
    "replay_poll_s": buffer.poll_interval,
    "tq_threads": os.environ.get("TQ_NUM_THREADS"),
    "token_builder_warning_filtered": any(
        not f.filter(logging.makeLogRecord({"msg": "No model-specific Continuous Token builder is registered"}))
        for f in logging.getLogger("verl.utils.tokenizer.continuous_token_wiring").filters),
}))
"""


def _probe(**env_changes) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("VERL_PLATFORM", "TQ_NUM_THREADS")}
    env.update(env_changes)
    out = subprocess.run([sys.executable, "-c", REGISTRY_PROBE], capture_output=True, text=True, env=env, cwd="/", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_unselected_backend_leaves_verl_unchanged():
    state = _probe()
    assert "cpu" not in state["platforms"]
    assert "hf" not in state["replicas"] and "hf" not in state["rollouts"]
    assert state["cpu_engines"] == []
    assert not state["init_process_group_patched"] and state["offload_policy"] == "CPUOffloadPolicy"
    assert not state["snapshot_patched"] and "m2po_cpu" not in state["checkpoint_engines"]
    assert not state["master_port_patched"]
    assert state["device"] == "cuda"  # verl's own fallback on a machine without accelerators
    assert state["replay_poll_s"] == 2.0 and not state["token_builder_warning_filtered"]
    assert state["tq_threads"] is None


def test_selected_backend_registers_platform_engines_rollout_and_patches():
    state = _probe(VERL_PLATFORM="cpu")
    assert "cpu" in state["platforms"] and state["device"] == "cpu"
    assert "hf" in state["replicas"] and "hf" in state["rollouts"]
    assert state["cpu_engines"] == ["fsdp", "fsdp2"]
    assert state["init_process_group_patched"] and state["offload_policy"] == "UnpinnedCPUOffloadPolicy"
    assert state["snapshot_patched"] and "m2po_cpu" in state["checkpoint_engines"]
    assert state["master_port_patched"]
    assert state["replay_poll_s"] == POLL_INTERVAL_S < 2.0 and state["token_builder_warning_filtered"]
    # TransferQueue's threads: the physical cores (at most 8), inherited by the local Ray cluster's workers
    import psutil

    assert state["tq_threads"] == str(min(8, psutil.cpu_count(logical=False)))
    # the knob that restores verl's own poll (for timing comparisons)
    assert _probe(VERL_PLATFORM="cpu", **{POLL_INTERVAL_ENV: "2"})["replay_poll_s"] == 2.0


def test_other_verl_versions_are_refused_by_name(monkeypatch):
    import verl

    from m2po.cpu_backend import check_verl_version

    monkeypatch.setattr(verl, "__version__", "0.10.0")
    with pytest.raises(RuntimeError, match=r"refuses verl 0\.10\.0: install verl==0\.9\.1"):
        check_verl_version()


@pytest.mark.parametrize(
    ("backend", "expected"),
    [("cpu:gloo,cpu:gloo", "gloo"), ("cpu:gloo,cuda:nccl", "cpu:gloo,cuda:nccl"), ("gloo", "gloo"), (None, None)],
)
def test_only_an_all_gloo_backend_string_is_collapsed(backend, expected):
    assert _collapse_gloo_backend(backend) == expected


@given(ephemeral_floor=st.integers(0, 65536), seed=st.integers(0, 2**32 - 1))
def test_master_port_window_lies_below_the_kernels_ephemeral_ports(ephemeral_floor, seed):
    window = master_port_window(ephemeral_floor, random.Random(seed))
    if ephemeral_floor - MASTER_PORT_FLOOR < 2 * MASTER_PORT_WINDOW:
        assert window is None  # verl's own bind(0)
    else:
        start, end = window
        assert MASTER_PORT_FLOOR <= start and end <= ephemeral_floor and end - start == MASTER_PORT_WINDOW
    assert master_port_window(None) is None


def test_master_port_window_leaves_the_runs_random_state_alone():
    random.seed(7)
    expected = random.random()
    random.seed(7)
    assert master_port_window(32768) is not None
    assert random.random() == expected


def test_ephemeral_port_floor_reads_the_kernels_range(tmp_path):
    path = tmp_path / "ip_local_port_range"
    path.write_text("32768\t60999\n")
    assert ephemeral_port_floor(str(path)) == 32768
    path.write_text("")
    assert ephemeral_port_floor(str(path)) is None
    assert ephemeral_port_floor(str(tmp_path / "absent")) is None


def test_worker_groups_scan_a_window_unless_the_user_set_a_range(monkeypatch):
    from verl.single_controller.ray.base import RayWorkerGroup

    from m2po.cpu_backend import patches

    calls = []
    monkeypatch.setattr(RayWorkerGroup, "_get_master_addr_port",
                        lambda self, pg, bundle_index=0, master_port_range=None: calls.append(master_port_range))
    monkeypatch.setattr(patches, "ephemeral_port_floor", lambda: 32768)
    patches._patch_master_port_choice()
    RayWorkerGroup._get_master_addr_port(None, "pg", bundle_index=0, master_port_range=None)
    RayWorkerGroup._get_master_addr_port(None, "pg", bundle_index=0, master_port_range=[40000, 40010])
    (start, end), users = calls
    assert MASTER_PORT_FLOOR <= start < end <= 32768 and users == [40000, 40010]


# --------------------------------------------------------------------------- tiny model and sampler


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    patch = pytest.MonkeyPatch()
    patch.setenv("M2PO_CACHE", str(tmp_path_factory.mktemp("m2po-cache")))
    yield tiny.ensure_built()
    patch.undo()


@pytest.fixture(scope="module")
def tiny_model(tiny_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(os.path.join(tiny_dir, "model"), attn_implementation="sdpa").eval()


def test_tiny_tokenizer_is_character_level_chatml(tiny_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(tiny_dir, "model"))
    text = tokenizer.apply_chat_template([{"role": "user", "content": "3+4="}], add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\n3+4=<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 23 and tokenizer.decode(ids) == text
    assert len(tokenizer.encode("\n", add_special_tokens=False)) == 1  # verl's Qwen/ChatML builder needs this
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"


def test_tiny_dataset_rows_are_verl_rows_with_single_digit_answers(tiny_dir):
    import pandas as pd

    from m2po.cpu_backend.smoke_reward import compute_score

    rows = pd.read_parquet(os.path.join(tiny_dir, "train.parquet")).to_dict(orient="records")
    assert len(rows) == tiny.TRAIN_ROWS
    for row in rows:
        a, b = row["prompt"][0]["content"].rstrip("=").split("+")
        assert row["reward_model"]["ground_truth"] == str(int(a) + int(b)) and int(a) + int(b) <= 9
    assert compute_score(tiny.DATA_SOURCE, "so 7.", "7") == 1.0 and compute_score(tiny.DATA_SOURCE, "8", "7") == 0.0
    assert {row["data_source"] for row in rows} == {tiny.DATA_SOURCE}
    # validation rows are named after the paper's eight benchmarks, two each (what `m2po report` reads)
    val = pd.read_parquet(os.path.join(tiny_dir, "val.parquet")).to_dict(orient="records")
    assert sorted(row["data_source"] for row in val) == sorted(PAPER_BENCHMARKS * (tiny.VAL_ROWS // 8))


def _requests(prompts, seeds, temperature=1.0, max_tokens=6, top_k=-1, top_p=1.0):
    return [
        SampleRequest(p, max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, want_log_probs=True, seed=s)
        for p, s in zip(prompts, seeds)
    ]


PROMPTS = [[1, 10, 20, 2], [1, 11, 12, 13, 14, 15, 2], [1, 30, 2], [1, 10, 20, 2]]


@settings(max_examples=10, deadline=None)
@given(st.lists(st.integers(0, 2**31), min_size=4, max_size=4), st.sampled_from([0.0, 0.7, 1.0]))
def test_batched_sampling_equals_sampling_each_request_alone(tiny_model, seeds, temperature):
    eos = {2}
    together = sample_batch(tiny_model, _requests(PROMPTS, seeds, temperature), eos, pad_token_id=0)
    alone = [sample_batch(tiny_model, _requests([p], [s], temperature), eos, 0)[0] for p, s in zip(PROMPTS, seeds)]
    for (ids_b, lps_b, aborted_b), (ids_a, lps_a, aborted_a) in zip(together, alone):
        assert not aborted_b and not aborted_a
        assert ids_b == ids_a
        assert torch.allclose(torch.tensor(lps_b), torch.tensor(lps_a), atol=1e-5)


def test_sampled_log_probs_are_the_models_at_the_temperature(tiny_model):
    temperature = 0.7
    (ids, log_probs, _), = sample_batch(tiny_model, _requests([PROMPTS[1]], [5], temperature, max_tokens=8), {-1}, 0)
    assert len(ids) == 8  # no EOS in the set: the length budget stops it
    sequence = torch.tensor([PROMPTS[1] + ids])
    with torch.no_grad():
        logits = tiny_model(sequence).logits[0, len(PROMPTS[1]) - 1 : -1] / temperature
    expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids)[:, None]).squeeze(-1)
    assert torch.allclose(torch.tensor(log_probs), expected, atol=1e-5)


def test_sampling_stops_at_eos_and_top_k_1_is_greedy(tiny_model):
    greedy, = sample_batch(tiny_model, _requests([PROMPTS[0]], [1], temperature=0.0, max_tokens=10), set(), 0)
    top1, = sample_batch(tiny_model, _requests([PROMPTS[0]], [2], temperature=1.0, max_tokens=10, top_k=1), set(), 0)
    assert greedy[0] == top1[0]
    stop = greedy[0][3]
    (ids, _, _), = sample_batch(tiny_model, _requests([PROMPTS[0]], [1], temperature=0.0, max_tokens=10), {stop}, 0)
    assert ids == greedy[0][: greedy[0].index(stop) + 1]


def test_a_set_stop_event_ends_decoding_with_the_partial_responses(tiny_model):
    stop = threading.Event()
    stop.set()  # set before the first token: every unfinished row comes back empty and aborted
    results = sample_batch(tiny_model, _requests(PROMPTS[:2], [1, 2]), {-1}, 0, stop=stop)
    assert [(ids, aborted) for ids, _, aborted in results] == [([], True), ([], True)]


class _HookedModel(torch.nn.Module):
    """The tiny model, calling `hook()` at the start of its `at`-th forward pass."""

    def __init__(self, model, at, hook):
        super().__init__()
        self.model, self.at, self.hook, self.calls = model, at, hook, 0

    def forward(self, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            self.hook()
        return self.model(**kwargs)


def test_abort_mid_decode_returns_exactly_the_tokens_sampled_so_far(tiny_model):
    full = sample_batch(tiny_model, _requests(PROMPTS[:2], [3, 4], max_tokens=8), {-1}, 0)
    stop = threading.Event()
    partial = sample_batch(_HookedModel(tiny_model, 3, stop.set), _requests(PROMPTS[:2], [3, 4], max_tokens=8), {-1}, 0, stop)
    for (ids, lps, _), (part_ids, part_lps, aborted) in zip(full, partial):
        assert aborted and len(part_ids) == 3 and part_ids == ids[:3]  # same seeds: a prefix of the full answer
        assert torch.allclose(torch.tensor(part_lps), torch.tensor(lps[:3]), atol=1e-6)


def _server(tiny_dir):
    from types import SimpleNamespace

    from m2po.cpu_backend.rollout import HFSamplingServer
    from verl.workers.config import HFModelConfig

    config = SimpleNamespace(max_model_len=None, prompt_length=16, response_length=8, seed=0, max_num_seqs=8)
    model_config = HFModelConfig(path=os.path.join(tiny_dir, "model"))
    return HFSamplingServer(config=config, model_config=model_config, replica_rank=0)


def test_server_abort_pauses_answers_partial_and_resume_continues(tiny_dir):
    """verl's partial rollout (vLLM's semantics): abort answers every request with what it has and
    stop_reason 'aborted', requests arriving while paused wait for resume_generation, and each answer
    carries the training step of the weights that generated it."""

    async def scenario():
        server = _server(tiny_dir)
        # the third forward pass waits until generation is aborted: the abort lands mid-decode
        server.model = _HookedModel(server.model, 3, lambda: server._stop.wait(timeout=60))
        await server.set_global_steps(3)
        params = {"max_tokens": 8, "temperature": 1.0, "logprobs": True}
        running = asyncio.ensure_future(server.generate(PROMPTS[1], params, request_id="a"))
        while server.model.calls < 3:
            await asyncio.sleep(0.01)
        await server.abort_all_requests()
        first = await running
        assert first.stop_reason == "aborted" and len(first.token_ids) == 3
        assert len(first.log_probs) == len(first.token_ids) and first.extra_fields["global_steps"] == 3
        parked = asyncio.ensure_future(server.generate(PROMPTS[0], params, request_id="b"))
        await asyncio.sleep(0.3)
        assert not parked.done()  # waits for resume_generation
        await server.set_global_steps(4)  # a weight update while paused
        await server.resume_generation()
        second = await parked
        assert second.stop_reason == "completed" and second.extra_fields["global_steps"] == 4
        await server.abort_all_requests(reject_request=True)
        rejected = await server.generate(PROMPTS[0], params, request_id="c")
        assert rejected.stop_reason == "aborted" and rejected.token_ids == []

    asyncio.run(scenario())


def test_request_seeds_separate_versions_prompts_and_repeats():
    seeds = {request_seed(42, v, p, k) for v in (0, 1) for p in ([1, 2], [1, 3]) for k in (0, 1)}
    assert len(seeds) == 8 and request_seed(42, 0, [1, 2], 0) == request_seed(42, 0, [1, 2], 0)


# --------------------------------------------------------------------------- config checks and scripts


def _cpu_config(*overrides):
    return compose_config("m2po_trainer", ["+cpu=tiny", *overrides])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("actor_rollout_ref.rollout.name=vllm", "rollout.name='vllm' does not run on CPU"),
        ("actor_rollout_ref.rollout.name=sglang", "the CPU backend's rollout is 'hf'"),
        ("trainer.nnodes=2", "trainer.nnodes=2: the CPU backend runs on one machine"),
        ("actor_rollout_ref.model.lora_rank=8", "LoRA weight sync to the rollout is not supported on CPU"),
        ("trainer.v1.trainer_mode=fully_async", "trainer_mode='fully_async' is not supported on CPU"),
        ("actor_rollout_ref.hybrid_engine=false", "needs trainer.v1.trainer_mode in ['separate_async', 'm2po_separate_async']"),
        ("actor_rollout_ref.actor.strategy=fsdp", "only fsdp2 works"),
        ("actor_rollout_ref.rollout.tensor_model_parallel_size=2", "tensor_model_parallel_size=2"),
        ("actor_rollout_ref.model.override_config.attn_implementation=flash_attention_2", "use sdpa"),
        ("ray_kwargs.ray_init.num_cpus=4", "num_cpus=4 is too few logical CPUs for Ray to place this run (needs at least 6"),
        ("ray_kwargs.ray_init.num_gpus=0", "num_gpus=0 logical slots for 1 training workers"),
    ],
)
def test_unsupported_combinations_are_named(override, message, monkeypatch):
    monkeypatch.setenv("VERL_PLATFORM", "cpu")
    errors = cpu_config_errors(_cpu_config(override))
    assert len(errors) == 1 and message in errors[0], errors


SEPARATE_ON_CPU = [
    "trainer.v1.trainer_mode=m2po_separate_async",
    "actor_rollout_ref.hybrid_engine=false",
    "actor_rollout_ref.rollout.checkpoint_engine.backend=m2po_cpu",
    "actor_rollout_ref.rollout.nnodes=1",
    "actor_rollout_ref.rollout.n_gpus_per_node=1",
]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("actor_rollout_ref.hybrid_engine=true", "on CPU the standalone replicas serve every rollout"),
        ("actor_rollout_ref.rollout.checkpoint_engine.backend=nccl", "backend='nccl': NCCL, NIXL and the other GPU"),
        ("actor_rollout_ref.rollout.n_gpus_per_node=0", "rollout.n_gpus_per_node must be >= 1"),
        ("ray_kwargs.ray_init.num_gpus=1", "num_gpus=1 logical slots for 1 training workers (trainer.n_gpus_per_node) and 1 standalone rollout"),
        ("ray_kwargs.ray_init.num_cpus=7", "needs at least 8: 3 per training worker, 2 per standalone rollout slot"),
    ],
)
def test_separate_async_on_cpu_needs_the_standalone_pool_and_object_store_sync(override, message, monkeypatch):
    monkeypatch.setenv("VERL_PLATFORM", "cpu")
    assert cpu_config_errors(_cpu_config(*SEPARATE_ON_CPU)) == []
    config = _cpu_config(*SEPARATE_ON_CPU)
    assert config.ray_kwargs.ray_init.num_gpus == 2  # the overlay declares trainer + standalone rollout slots
    errors = cpu_config_errors(_cpu_config(*SEPARATE_ON_CPU, override))
    assert len(errors) == 1 and message in errors[0], errors


@pytest.mark.parametrize("mode", ["colocate_async", "m2po_colocate_async", "sync", "m2po_stale"])
def test_colocated_trainers_run_on_the_hybrid_rollout(mode, monkeypatch):
    monkeypatch.setenv("VERL_PLATFORM", "cpu")
    config = _cpu_config(f"trainer.v1.trainer_mode={mode}")
    assert cpu_config_errors(config) == [] and config.ray_kwargs.ray_init.num_gpus == 1


def test_overlay_alone_is_supported_and_asks_for_the_selector(monkeypatch):
    monkeypatch.setenv("VERL_PLATFORM", "cpu")
    assert cpu_config_errors(_cpu_config()) == []
    monkeypatch.delenv("VERL_PLATFORM")
    errors = cpu_config_errors(_cpu_config())
    assert len(errors) == 1 and "set VERL_PLATFORM=cpu" in errors[0]
    # and it is what verl's driver hits first: reading trainer.device
    with pytest.raises(Exception, match="set VERL_PLATFORM=cpu"):
        _cpu_config().trainer.device


def _script_overrides(script, tmp_path):
    return _python_call(script, "--dry-run", tmp_path=tmp_path)[4:]


@pytest.mark.parametrize("script", EXPERIMENT_SCRIPTS)
def test_every_script_has_a_cpu_smoke_config(script, tmp_path, tiny_dir, monkeypatch, capsys):
    """The smoke settings keep the script's algorithm (loss, k, warm-up, u, n) and pass every check
    verl and m2po run at start-up; asynchronous scripts are refused by name."""
    monkeypatch.setenv("VERL_PLATFORM", "cpu")
    overrides = _script_overrides(script, tmp_path)
    original = compose_config("m2po_paper", overrides)
    smoke = compose_config("m2po_paper", [*smoke_overrides(original), *overrides])
    code = dry_run_main(["--quiet", *smoke_overrides(original), *overrides])
    err = capsys.readouterr().err
    assert code == 0, err
    assert cpu_config_errors(smoke) == []

    def updates_per_step(c):
        return c.data.train_batch_size // c.actor_rollout_ref.actor.ppo_mini_batch_size * c.actor_rollout_ref.actor.ppo_epochs

    for key in (
        "actor_rollout_ref.actor.policy_loss",
        "m2po.stale",
        "algorithm.adv_estimator",
        "actor_rollout_ref.rollout.n",
        "actor_rollout_ref.actor.ppo_epochs",
        "actor_rollout_ref.actor.loss_agg_mode",
    ):
        assert OmegaConf.select(smoke, key) == OmegaConf.select(original, key), key
    assert updates_per_step(smoke) == updates_per_step(original)
    assert smoke.data.train_batch_size < original.data.train_batch_size
    assert smoke.actor_rollout_ref.rollout.name == "hf" and smoke.trainer.n_gpus_per_node == 1
    for role in ("actor", "ref"):  # one worker: no sequence parallelism (the 32B scripts split 4 ways)
        assert smoke.actor_rollout_ref[role].fsdp_config.ulysses_sequence_parallel_size == 1
    for key in ("trainer.v1.trainer_mode", "algorithm.rollout_correction", "actor_rollout_ref.rollout.calculate_log_probs"):
        assert OmegaConf.select(smoke, key) == OmegaConf.select(original, key), key  # the ratio the loss sees
    if script.startswith("async/"):  # verl's separate_async: one worker + one standalone replica
        assert smoke.actor_rollout_ref.rollout.n_gpus_per_node == 1 and not smoke.actor_rollout_ref.hybrid_engine
        assert smoke.trainer.v1.separate_async.parameter_sync_step == updates_per_step(smoke)


def test_cpu_smoke_dry_run_through_the_script(tmp_path):
    result = subprocess.run(
        ["bash", os.path.join(SCRIPTS_DIR, "qwen2.5-math-7b/m2po_s256.sh"), "--cpu-smoke", "--dry-run",
         "trainer.total_training_steps=5"],
        env={**os.environ, "PYTHON": sys.executable, "M2PO_CACHE": str(tmp_path)},
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dry run OK: qwen2.5-math-7b-m2po-s256-cpu-smoke (loss_mode=m2po, staleness=256 updates" in result.stderr
    assert "total_training_steps: 5" in result.stdout and "name: hf" in result.stdout


ISOLATION_PROBE = """
import json, sys
import m2po.cpu_backend.config as cpu_config

def broken(*args, **kwargs):
    raise RuntimeError("simulated CPU backend failure")

cpu_config.register_resolvers = broken  # the first thing the m2po_cpu entry point calls
import verl
import verl.utils.config
from omegaconf import OmegaConf
from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY
from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY
print(json.dumps({
    "cpu_plugin_failed": "m2po.cpu_backend.plugin" not in sys.modules and not OmegaConf.has_resolver("m2po_cpu_tiny"),
    "losses": [name for name in ("m2po", "no_trust_region") if name in POLICY_LOSS_REGISTRY],
    "trainers": [name for name in ("m2po_stale", "m2po_separate_async", "m2po_colocate_async") if name in TRAINER_REGISTRY],
    "startup_checks": bool(getattr(verl.utils.config.validate_config, "_m2po_checks", False)),
}))
"""


def test_a_failing_cpu_backend_cannot_disable_the_losses_or_trainers():
    """The CPU backend is its own entry point: when it raises (verl swallows plugin errors), the
    losses, our trainers and the start-up checks are registered all the same."""
    env = {k: v for k, v in os.environ.items() if k not in ("VERL_USE_EXTERNAL_PLUGINS", "VERL_PLATFORM")}
    out = subprocess.run([sys.executable, "-c", ISOLATION_PROBE], capture_output=True, text=True, env=env, cwd="/",
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    state = json.loads(out.stdout.strip().splitlines()[-1])
    assert state == {
        "cpu_plugin_failed": True,
        "losses": ["m2po", "no_trust_region"],
        "trainers": ["m2po_stale", "m2po_separate_async", "m2po_colocate_async"],
        "startup_checks": True,
    }
