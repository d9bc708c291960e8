"""One RL run of the testbed, mirroring verl's dataflow with the package's own code.

Per iteration: sample prompts x samples with the current policy, recompute the behaviour
log-probs with the training model (as verl's `old_log_prob`), score, GRPO advantages (verl's
`compute_grpo_outcome_advantage`), push into the `StaleRolloutBuffer`, pop the batch that is due,
and train on it in `mini_batches` optimizer updates through verl's registered policy losses
(`vanilla`, `no_trust_region`, `m2po`) called with verl's signature.

Crash safety: every `checkpoint_every` iterations the model, optimizer, RNG, stale buffer and
progress are written atomically; the same command resumes from there and trains exactly the
batches an uninterrupted run would have (their content hashes are in metrics.jsonl).
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage, get_policy_loss_fn
from verl.workers.config import FSDPActorConfig

import m2po.verl_integration  # noqa: F401  (registers m2po / no_trust_region, as `import verl` would)
from m2po.buffer import PolicyVersion, StaleRolloutBuffer
from m2po.utils.atomic_io import atomic_directory, atomic_write_bytes
from m2po.testbed.config import METHODS, TestbedConfig
from m2po.testbed.model import response_log_probs, sample, save_pretrained
from m2po.testbed.evaluation import evaluate
from m2po.testbed.sft import load_base
from m2po.verl_integration.config import actor_config

CHECKPOINT = "checkpoint"
METRICS = "metrics.jsonl"
DONE = "done.json"
FINAL_POLICY = "final_model"  # the trained policy (save_pretrained), for re-evaluation
CONSOLE_KEYS = ("accuracy", "rollout_reward", "stale/staleness_updates", "actor/pg_loss", "actor/pg_clipfrac",
                "actor/m2po/m2_before", "grad_norm")


def testbed_actor_config(config: TestbedConfig, loss_mode: str) -> FSDPActorConfig:
    rl = config.rl
    batch = rl.prompts_per_iteration * rl.samples_per_prompt
    return actor_config(
        loss_mode,
        clip_ratio=rl.clip_ratio,
        rollout_n=rl.samples_per_prompt,
        mini_batch_size=batch // rl.mini_batches,
        m2_threshold=rl.m2_threshold,
        m2po_variant=rl.m2po_variant,
        # one loss call per mini-batch is the mini-batch scope; per micro-batch, each call is its own scope
        m2_scope="mini_batch" if rl.m2_micro_batch is None else "micro_batch",
    )


@torch.no_grad()
def generate_batch(model, config: TestbedConfig, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Rollouts of the current policy with everything training needs (verl's field names)."""
    task, rl = config.task, config.rl
    operands = task.sample_operands(rl.prompts_per_iteration, generator)
    operands = operands.repeat_interleave(rl.samples_per_prompt, dim=0)
    prompts = task.encode_prompts(operands)
    responses, response_mask = sample(model, prompts, task.response_len, generator)
    old_log_probs = torch.where(response_mask, response_log_probs(model, prompts, responses), 0.0)
    rewards = task.rewards(operands, responses, response_mask)
    last = response_mask.sum(dim=1) - 1
    token_rewards = torch.zeros(response_mask.shape).scatter_(1, last.unsqueeze(1), rewards.unsqueeze(1))
    index = np.repeat(np.arange(rl.prompts_per_iteration), rl.samples_per_prompt)
    advantages, _ = compute_grpo_outcome_advantage(token_rewards, response_mask, index)
    return {
        "prompts": prompts,
        "responses": responses,
        "response_mask": response_mask,
        "old_log_probs": old_log_probs,
        "advantages": advantages,
        "rewards": rewards,
    }


def second_moments(log_probs, behaviour_log_probs, response_mask, answer_start: int) -> dict[str, float]:
    """Mean `(log pi_theta - log pi_behav)^2` before an update, whatever the loss: over every valid
    token (`m2_all`, what M2PO bounds before it picks its trust region) and over the tokens from
    `answer_start` on (`m2_answer`; the same as m2_all when the response is all answer).
    `(batch, response_len)` inputs."""
    squared = torch.where(response_mask, log_probs - behaviour_log_probs, 0.0).square()
    answer = response_mask.clone()
    answer[:, :answer_start] = False
    return {
        "testbed/m2_all": float(squared.sum() / response_mask.sum().clamp(min=1)),
        "testbed/m2_answer": float(squared[answer].sum() / answer.sum().clamp(min=1)),
    }


def gradient_carriers(log_prob_grad, log_probs, behaviour_log_probs, advantages, response_mask,
                      large_ratio: float) -> dict[str, float]:
    """Which tokens carry an update's gradient, by the loss's own gradient with respect to each token's
    log-prob (`log_prob_grad`, `d loss / d log pi_theta`: `-A r / n` for a token the loss keeps, 0 for a
    clipped or masked one). Shares of `sum |grad|` held by the trust-region tokens (`A > 0, r > 1` or
    `A < 0, r < 1`: those PPO can clip and M2PO can mask), by the negative-advantage tokens whose ratio
    rose (`A < 0, r > 1`: PPO's ratio clip and M2PO's mask never act on them; verl's `vanilla` dual clip
    does above `clip_ratio_c` = 3) and by those of them
    above `large_ratio`; the largest ratio and the largest single token's share.
    `(batch, response_len)` inputs."""
    weight = torch.where(response_mask, log_prob_grad.abs(), 0.0)
    total = weight.sum().clamp(min=torch.finfo(weight.dtype).tiny)
    ratio = torch.where(response_mask, (log_probs - behaviour_log_probs).exp(), 0.0)
    trust_region = response_mask & (((advantages > 0) & (ratio > 1)) | ((advantages < 0) & (ratio < 1)))
    negative_up = response_mask & (advantages < 0) & (ratio > 1)
    return {
        "testbed/grad_share_trust_region": float(weight[trust_region].sum() / total),
        "testbed/grad_share_neg_adv_ratio_up": float(weight[negative_up].sum() / total),
        "testbed/grad_share_neg_adv_large_ratio": float(weight[negative_up & (ratio > large_ratio)].sum() / total),
        "testbed/max_ratio": float(ratio.max()),
        "testbed/max_token_grad_share": float(weight.max() / total),
    }


# Metrics kept as the largest over an iteration's updates (the rest are averaged).
MAX_OVER_UPDATES = ("grad_norm", "testbed/max_ratio")


def train_on(model, optimizer, batch, config: TestbedConfig, loss_fn, actor: FSDPActorConfig,
             observer=None) -> dict[str, float]:
    """`mini_batches` optimizer updates on one batch; returns metrics averaged over them, and the
    largest of `MAX_OVER_UPDATES` as `<key>_max`. `observer(mini_batch, log_probs)`, when given, sees
    each mini-batch and its log-probs at the weights it is trained at, before its update."""
    rl = config.rl
    size = len(batch["prompts"]) // rl.mini_batches
    collected: dict[str, list[float]] = {}
    for start in range(0, len(batch["prompts"]), size):
        mini = {name: tensor[start : start + size] for name, tensor in batch.items()}
        mask = mini["response_mask"]
        actor.global_batch_info.update(dp_size=1, batch_num_tokens=int(mask.sum()), global_batch_size=size)
        log_probs = response_log_probs(model, mini["prompts"], mini["responses"])
        log_probs.retain_grad()
        if observer is not None:
            observer(mini, log_probs.detach())
        diagnostics = second_moments(log_probs.detach(), mini["old_log_probs"], mask, config.task.answer_start)
        loss, metrics = _mini_batch_loss(loss_fn, actor, mini, log_probs, rl.m2_micro_batch or size)
        optimizer.zero_grad()
        loss.backward()
        max_norm = rl.grad_clip if rl.grad_clip is not None else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
        diagnostics.update(gradient_carriers(log_probs.grad, log_probs.detach(), mini["old_log_probs"],
                                             mini["advantages"], mask, large_ratio=1 + rl.clip_ratio))
        metrics = dict(metrics, **diagnostics, **{"actor/pg_loss": float(loss.detach()), "grad_norm": float(grad_norm)})
        for key, value in metrics.items():
            collected.setdefault(key, []).append(float(value))
    averaged = {key: float(np.mean(values)) for key, values in collected.items()}
    averaged.update({f"{key}_max": float(np.max(collected[key])) for key in MAX_OVER_UPDATES})
    return averaged


def _mini_batch_loss(loss_fn, actor, mini, log_probs, micro_batch: int):
    """The mini-batch's loss as verl computes it: one loss call per `micro_batch` sequences, each normalised
    by the whole mini-batch's tokens (`actor.global_batch_info`), summed; the metrics averaged over the calls.
    With `micro_batch` = the mini-batch this is one call (M2PO's cut over the mini-batch)."""
    losses, collected = [], {}
    for start in range(0, len(log_probs), micro_batch):
        part = slice(start, start + micro_batch)
        loss, metrics = loss_fn(
            old_log_prob=mini["old_log_probs"][part], log_prob=log_probs[part], advantages=mini["advantages"][part],
            response_mask=mini["response_mask"][part], loss_agg_mode="token-mean", config=actor, rollout_is_weights=None,
        )
        losses.append(loss)
        for key, value in metrics.items():
            collected.setdefault(key, []).append(float(value))
    return torch.stack(losses).sum(), {key: float(np.mean(values)) for key, values in collected.items()}


def _save_checkpoint(run_dir, model, optimizer, generator, buffer, iteration, updates):
    with atomic_directory(os.path.join(run_dir, CHECKPOINT)) as tmp:
        state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}  # tied weights
        save_file(state, os.path.join(tmp, "model.safetensors"))
        torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        save_file({"generator": generator.get_state()}, os.path.join(tmp, "rng.safetensors"))
        buffer.save(os.path.join(tmp, "stale_buffer"))
        progress = json.dumps({"iteration": iteration, "updates": updates}).encode()
        atomic_write_bytes(os.path.join(tmp, "progress.json"), progress)


def _load_checkpoint(run_dir, model, optimizer, generator, buffer):
    path = os.path.join(run_dir, CHECKPOINT)
    if not os.path.isfile(os.path.join(path, "progress.json")):
        return 0, 0
    model.load_state_dict(load_file(os.path.join(path, "model.safetensors")))
    optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), weights_only=True))
    generator.set_state(load_file(os.path.join(path, "rng.safetensors"))["generator"])
    buffer.load(os.path.join(path, "stale_buffer"))
    with open(os.path.join(path, "progress.json")) as f:
        progress = json.load(f)
    return progress["iteration"], progress["updates"]


def _truncate_metrics(path: str, iteration: int) -> None:
    """Drop lines logged after the checkpoint we resume from (the crashed run's tail)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the crash
            break
        if record["iteration"] < iteration:
            kept.append(line if line.endswith("\n") else line + "\n")
    atomic_write_bytes(path, "".join(kept).encode())


def _tracker(loggers: tuple[str, ...], config: TestbedConfig, method: str, seed: int, run_dir: str):
    """verl's own experiment trackers (tensorboard, wandb, ...), when asked for."""
    if not loggers:
        return None
    from verl.utils.tracking import Tracking

    os.environ["TENSORBOARD_DIR"] = os.path.join(run_dir, "tensorboard")
    return Tracking(project_name="m2po-testbed", experiment_name=f"{method}-seed{seed}",
                    default_backend=list(loggers), config=config.to_json())


def run(config: TestbedConfig, method: str, seed: int, base_path: str, run_dir: str, progress: bool = True,
        loggers: tuple[str, ...] = ()) -> dict:
    """Train one (method, seed); resumable; returns the final summary (also in done.json).
    `loggers`: extra verl tracker backends (e.g. "tensorboard", "wandb") besides metrics.jsonl."""
    done_path = os.path.join(run_dir, DONE)
    if os.path.exists(done_path):
        with open(done_path) as f:
            return json.load(f)
    os.makedirs(run_dir, exist_ok=True)
    rl = config.rl
    loss_mode, stale = METHODS[method]
    staleness = rl.staleness(stale)
    buffer = StaleRolloutBuffer(staleness, required_fields=("old_log_probs",))
    model, base_accuracy = load_base(base_path)
    optimizer = torch.optim.AdamW(model.parameters(), lr=rl.lr, betas=(0.9, 0.999), weight_decay=0.01)
    generator = torch.Generator().manual_seed(1_000_003 * (seed + 1))
    loss_fn = get_policy_loss_fn(loss_mode)
    actor = testbed_actor_config(config, loss_mode)

    start, updates = _load_checkpoint(run_dir, model, optimizer, generator, buffer)
    metrics_path = os.path.join(run_dir, METRICS)
    _truncate_metrics(metrics_path, start)
    tracker = _tracker(loggers, config, method, seed, run_dir)
    bar = tqdm(range(start, rl.iterations), desc=f"{method} seed {seed}", disable=None if progress else True, leave=False,
               initial=start, total=rl.iterations)
    with open(metrics_path, "a") as log:
        for iteration in bar:
            version = PolicyVersion(global_step=iteration, updates=updates)
            model.eval()
            for _ in range(buffer.warmup_batches_needed()):
                buffer.push(generate_batch(model, config, generator), version)
            fresh = generate_batch(model, config, generator)
            buffer.push(fresh, version)
            record = {"iteration": iteration, "rollout_reward": float(fresh["rewards"].mean())}
            item = buffer.pop_ready(version)
            if item is not None:
                model.train()
                record.update(train_on(model, optimizer, item.batch, config, loss_fn, actor))
                updates += rl.mini_batches
                record["trained_hash"] = item.content_hash
                record["trained_reward"] = float(item.batch["rewards"].mean())
            record.update(buffer.metrics())
            record["updates"] = updates
            if (iteration + 1) % rl.eval_every == 0 or iteration + 1 == rl.iterations:
                model.eval()
                # fresh sampling draws per evaluation and seed, shared by the methods at one iteration
                record["accuracy"] = evaluate(model, config.task, rl.eval_problems, seed=0, draw=(seed, iteration))
            log.write(json.dumps(record) + "\n")
            if tracker is not None:
                tracker.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=iteration)
            if "accuracy" in record:
                bar.write(f"[{method} s{seed}] step:{iteration + 1} - " + " - ".join(
                    f"{k}:{record[k]:.4g}" for k in CONSOLE_KEYS if k in record))
            if (iteration + 1) % rl.checkpoint_every == 0 and iteration + 1 < rl.iterations:
                log.flush()
                os.fsync(log.fileno())
                _save_checkpoint(run_dir, model, optimizer, generator, buffer, iteration + 1, updates)
    if tracker is not None:
        tracker.finish()
    with atomic_directory(os.path.join(run_dir, FINAL_POLICY)) as tmp:
        save_pretrained(model, tmp)
    summary = {"method": method, "seed": seed, "base_accuracy": base_accuracy, "updates": updates}
    atomic_write_bytes(done_path, json.dumps(summary).encode())
    shutil.rmtree(os.path.join(run_dir, CHECKPOINT), ignore_errors=True)
    return summary


def read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, METRICS)) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_runs(out_dir: str, seeds_by_method: dict) -> dict[str, dict[int, list[dict]]]:
    """method -> seed -> records of the runs in `<out_dir>/runs/<method>-seed<k>`."""
    return {method: {int(seed): read_metrics(os.path.join(out_dir, "runs", f"{method}-seed{seed}")) for seed in seeds}
            for method, seeds in seeds_by_method.items()}
