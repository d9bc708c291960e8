"""The `hf` rollout: verl's rollout interfaces served by a batched HF-transformers sampler on CPU.

Three pieces, as for verl's vLLM backend:
- `HFSamplingServer`, a Ray actor that owns an fp32 copy of the policy and answers verl's
  token-in/token-out `generate` calls. Requests that arrive together are sampled together by
  `m2po.cpu_backend.sampler` (one forward pass per token for the whole batch, with a KV cache).
- `HFReplica` (verl `RolloutReplica`): starts one server per replica.
- `HFServerAdapter` (verl `BaseRollout`), living in each training worker: forwards weight updates
  from the trainer to its replica's server through Ray's object store, and sleep/wake.

Sampling is reproducible and independent of how requests happen to be batched: each request draws
from its own generator, seeded by (rollout seed, training step of the weights, prompt tokens, how
many identical prompts were already sampled at that step). The training step is the one verl passes
with each weight update, so a run resumed from a checkpoint generates the same samples as an
uninterrupted run (tested end to end), although its server has seen fewer weight syncs.

Partial rollout, as verl's asynchronous trainers use it (vLLM's semantics): `abort_all_requests` stops
the running batch at the next token and answers every request with the tokens generated so far and
`stop_reason="aborted"` (verl's client resubmits prompt + partial response later); requests that
arrive while generation is paused wait until `resume_generation`. Weights therefore never change in
the middle of a request's segment, and each answer carries the training step of the weights that
generated it (`extra_fields["global_steps"]`), from which verl tags every trajectory's versions.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import threading
from collections import defaultdict
from typing import Any, Optional

import ray
import torch
from verl.workers.rollout import base as rollout_base
from verl.workers.rollout.base import BaseRollout
from verl.workers.rollout.replica import RolloutReplica, RolloutReplicaRegistry
from verl.workers.rollout.utils import ensure_async_iterator

from m2po.cpu_backend.sampler import SampleRequest, request_seed, sample_batch

logger = logging.getLogger(__name__)

SERVER_NAME_PREFIX = "m2po_hf_rollout_server_"
SYNC_LOG_ENV = "M2PO_CPU_ROLLOUT_SYNC_LOG"
# How long the server waits for concurrent requests to join a batch.
BATCH_WINDOW_S = 0.02


class HFSamplingServer:
    """Ray actor: a batched token-in/token-out sampler with verl's rollout-server methods."""

    def __init__(self, config, model_config, replica_rank: int):
        from transformers import AutoModelForCausalLM
        from verl.utils.config import omega_conf_to_dataclass
        from verl.workers.config import HFModelConfig

        if not isinstance(model_config, HFModelConfig):
            model_config = omega_conf_to_dataclass(model_config, dataclass_type=HFModelConfig)
        torch.set_num_threads(max(1, int(os.environ.get("M2PO_CPU_ROLLOUT_THREADS", "1"))))
        self.config = config
        self.replica_rank = replica_rank
        path = model_config.local_path
        self.model = AutoModelForCausalLM.from_pretrained(
            path, torch_dtype=torch.float32, attn_implementation="sdpa", local_files_only=True
        ).eval()
        tokenizer = model_config.tokenizer
        eos = model_config.generation_config.eos_token_id if model_config.generation_config is not None else None
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_token_ids = set(eos if isinstance(eos, (list, tuple)) else [eos])
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_token_ids)
        self.max_model_len = config.max_model_len or (config.prompt_length + config.response_length)
        self.weight_version = 0  # weight syncs received
        self.global_steps: Optional[int] = None  # verl's training step of the current weights
        self.awake = True
        self._occurrences: dict[tuple, int] = defaultdict(int)
        self._pending: list[SampleRequest] = []
        self._drainer: Optional[asyncio.Task] = None
        # Partial rollout: the gate is open while generation runs; `abort_all_requests` closes it
        # and stops the running batch, `resume_generation` opens it again.
        self._gate = asyncio.Event()
        self._gate.set()
        self._reject_while_paused = False
        self._stop = threading.Event()
        self._batch_running = False
        # served since the last weight sync, reported with it: shows that requests are batched
        self._served_requests = 0
        self._served_batches = 0

    # -- generation -----------------------------------------------------------------------------
    async def generate(
        self,
        prompt_ids: list[int],
        sampling_params: dict[str, Any],
        request_id: str,
        image_data=None,
        video_data=None,
        audio_data=None,
        mm_processor_kwargs=None,
        priority: int = 0,
        **_unused,
    ):
        from verl.workers.rollout.replica import TokenOutput

        if image_data is not None or video_data is not None or audio_data is not None:
            raise NotImplementedError("the CPU 'hf' rollout serves text-only prompts")
        if not self._gate.is_set():
            if self._reject_while_paused:  # leaving the load balancer: verl's client retries elsewhere
                return TokenOutput(
                    token_ids=[], log_probs=[], stop_reason="aborted", extra_fields={"global_steps": self.global_steps}
                )
            await self._gate.wait()
        if not self.awake:
            raise RuntimeError("the 'hf' rollout server got a generate call while asleep (weights not synced)")
        prompt_ids = [int(t) for t in prompt_ids]
        room = self.max_model_len - len(prompt_ids)
        if room < 1:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room within max_model_len {self.max_model_len}")
        params = dict(sampling_params)
        max_tokens = params.pop("max_tokens", params.pop("max_new_tokens", None))
        if max_tokens is None:
            max_tokens = min(
                self.config.response_length, self.config.prompt_length + self.config.response_length - len(prompt_ids)
            )
        temperature = float(params.get("temperature", 1.0))
        key = (tuple(prompt_ids), temperature > 0)
        occurrence = self._occurrences[key]
        self._occurrences[key] += 1
        request = SampleRequest(
            prompt_ids=prompt_ids,
            max_tokens=max(1, min(int(max_tokens), room)),
            temperature=temperature,
            top_k=int(params.get("top_k", -1) or -1),
            top_p=float(params.get("top_p", 1.0)),
            want_log_probs=bool(params.get("logprobs", False)),
            seed=request_seed(self.config.seed + self.replica_rank, self._weights_step(), prompt_ids, occurrence),
            future=asyncio.get_running_loop().create_future(),
        )
        self._pending.append(request)
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain())
        token_ids, log_probs, aborted = await request.future
        return TokenOutput(
            token_ids=token_ids,
            log_probs=log_probs,
            stop_reason="aborted" if aborted else "completed",
            extra_fields={"global_steps": self.global_steps},
        )

    async def _drain(self):
        while self._pending:
            await asyncio.sleep(BATCH_WINDOW_S)
            limit = max(1, self.config.max_num_seqs)
            batch, self._pending = self._pending[:limit], self._pending[limit:]
            if not batch:
                continue
            self._batch_running = True
            try:
                results = await asyncio.to_thread(
                    sample_batch, self.model, batch, self.eos_token_ids, self.pad_token_id, self._stop
                )
            except Exception as error:  # every waiting request sees the failure
                for request in batch:
                    request.future.set_exception(error)
                continue
            finally:
                self._batch_running = False
            self._served_requests += len(batch)
            self._served_batches += 1
            for request, result in zip(batch, results):
                request.future.set_result(result)

    # -- weights --------------------------------------------------------------------------------
    def update_weights(self, state_dict: dict[str, torch.Tensor], global_steps: Optional[int] = None) -> str:
        """Load the trainer's weights (HF names); every parameter of the server must be covered."""
        own = self.model.state_dict()
        unknown = sorted(set(state_dict) - set(own))
        if unknown:
            raise KeyError(f"weight update has names the rollout model lacks: {unknown[:5]}")
        missing = sorted(
            name for name in set(own) - set(state_dict) if not self._is_tied(name)
        )
        if missing:
            raise KeyError(f"weight update lacks parameters of the rollout model: {missing[:5]}")
        with torch.no_grad():
            for name, tensor in state_dict.items():
                own[name].copy_(tensor.to(own[name].dtype))
        before = self._weights_step()
        self.weight_version += 1
        if global_steps is not None:
            self.global_steps = global_steps
        if self._weights_step() != before:
            self._occurrences.clear()
        checksum = self.weights_checksum()
        self._report_sync(checksum)
        self._served_requests = self._served_batches = 0
        return checksum

    def _report_sync(self, checksum: str) -> None:
        """One line per sync in the log, and in `$M2PO_CPU_ROLLOUT_SYNC_LOG` (JSONL) when set: the
        evidence that trained weights reach the rollout (Ray may drop a log's last lines at exit)."""
        print(f"[m2po cpu rollout] replica {self.replica_rank} weights v{self.weight_version} checksum {checksum}", flush=True)
        path = os.environ.get(SYNC_LOG_ENV)
        if path:
            record = {
                "replica": self.replica_rank,
                "weight_version": self.weight_version,
                "global_steps": self.global_steps,
                "checksum": checksum,
                "requests_since_last_sync": self._served_requests,
                "batches_since_last_sync": self._served_batches,
            }
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def _weights_step(self):
        """What seeds sampling: verl's training step if it sent one, else the count of syncs."""
        return ("step", self.global_steps) if self.global_steps is not None else ("sync", self.weight_version)

    def _is_tied(self, name: str) -> bool:
        return name == "lm_head.weight" and getattr(self.model.config, "tie_word_embeddings", False)

    def weights_checksum(self) -> str:
        digest = hashlib.sha256()
        for name, tensor in sorted(self.model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    def stats(self) -> dict:
        return {"weight_version": self.weight_version, "requests": self._served_requests, "batches": self._served_batches}

    # -- verl's server control methods: nothing to free on CPU ----------------------------------
    async def wake_up(self, tags: list[str] | None = None):
        self.awake = True

    async def sleep(self):
        self.awake = False

    async def set_global_steps(self, global_steps: int):
        if ("step", global_steps) != self._weights_step():
            self._occurrences.clear()
        self.global_steps = global_steps

    async def clear_kv_cache(self):
        return None

    async def release_kv_cache(self):
        return None

    async def resume_kv_cache(self):
        return None

    async def wait_for_requests_to_drain(self):
        while self._pending or (self._drainer is not None and not self._drainer.done()):
            await asyncio.sleep(BATCH_WINDOW_S)

    async def abort_all_requests(self, reset_prefix_cache: bool = True, reject_request: bool = False):
        """Pause generation: answer every request with its partial response (`stop_reason="aborted"`)
        and hold new ones until `resume_generation` (or turn them away, `reject_request=True`)."""
        self._gate.clear()
        self._reject_while_paused = reject_request
        self._stop.set()
        pending, self._pending = self._pending, []
        for request in pending:
            request.future.set_result(([], [] if request.want_log_probs else None, True))
        while self._batch_running:  # the running batch stops before its next token
            await asyncio.sleep(BATCH_WINDOW_S / 4)
        self._stop.clear()
        return {}

    async def resume_generation(self):
        self._reject_while_paused = False
        self._gate.set()

    async def start_profile(self, **kwargs):
        return None

    async def stop_profile(self):
        return None


class HFReplica(RolloutReplica):
    """One `HFSamplingServer` per replica, on the replica's node (single node only)."""

    async def launch_servers(self):
        if self.nnodes != 1:
            raise ValueError(
                f"the CPU 'hf' rollout runs on one node; this replica spans {self.nnodes} "
                "(set actor_rollout_ref.rollout.tensor_model_parallel_size=1)"
            )
        name = f"{SERVER_NAME_PREFIX}{self.replica_rank}{self.name_suffix}"
        server = (
            ray.remote(HFSamplingServer)
            .options(name=name, num_cpus=0, max_concurrency=self.max_concurrency)
            .remote(config=self.config, model_config=self.model_config, replica_rank=self.replica_rank)
        )
        await server.stats.remote()  # surfaces a failed start here, with its traceback
        self.servers = [server]
        self._server_handle = server
        self._server_address = name

    async def sleep(self):
        await self.servers[0].wait_for_requests_to_drain.remote()
        await self.servers[0].sleep.remote()


class HFServerAdapter(BaseRollout):
    """In each training worker: sends the trainer's weights to this rank's replica server."""

    def __init__(self, config, model_config, device_mesh, replica_rank: int = -1):
        super().__init__(config, model_config, device_mesh)
        rank = int(os.environ.get("RANK", "0"))
        world = self.config.tensor_model_parallel_size * self.config.data_parallel_size
        world *= self.config.pipeline_model_parallel_size
        self.replica_rank = rank // world if replica_rank == -1 else replica_rank
        self.owns_server = rank % world == 0
        self.server = None

    def _server(self):
        if self.server is None:
            self.server = ray.get_actor(f"{SERVER_NAME_PREFIX}{self.replica_rank}")
        return self.server

    async def resume(self, tags: list[str]):
        if self.owns_server and self.config.free_cache_engine:
            await self._server().wake_up.remote(tags=tags)

    async def release(self):
        if self.owns_server and self.config.free_cache_engine:
            await self._server().sleep.remote()

    @torch.no_grad()
    async def update_weights(self, weights, wire_format: str = "named_tensors", global_steps=None, **kwargs):
        if wire_format != "named_tensors":
            raise ValueError(f"the CPU 'hf' rollout takes full named tensors, not {wire_format!r}")
        if kwargs.get("peft_config") is not None:
            raise NotImplementedError("the CPU 'hf' rollout does not sync LoRA adapters (use model.lora.merge=True)")
        # Every rank iterates: with FSDP the generator gathers full tensors collectively. A
        # checkpoint engine (standalone rollout) hands the weights over as an async generator.
        state_dict = {}
        async for name, tensor in ensure_async_iterator(weights):
            state_dict[name] = tensor.detach().to("cpu", copy=True)
        if self.owns_server:
            await self._server().update_weights.remote(ray.put(state_dict), global_steps)


def register_rollout() -> None:
    from m2po.cpu_backend import ROLLOUT_NAME

    RolloutReplicaRegistry.register(ROLLOUT_NAME, lambda: HFReplica)
    # verl's BaseRollout registry is a private dict of dotted paths (listed in patches.PATCHES)
    rollout_base._ROLLOUT_REGISTRY[(ROLLOUT_NAME, "async")] = f"{__name__}.{HFServerAdapter.__qualname__}"
