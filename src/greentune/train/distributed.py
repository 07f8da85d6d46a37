"""Data parallelism on torch.distributed: which rank am I, how is the work split, and how
do the ranks agree.

greentune does not implement a distributed engine; it runs the recipe on torch's own:
`torchrun` starts the processes, `DistributedDataParallel` averages the adapter gradients
(frozen base replicated), FSDP2's `fully_shard` shards a base too large for one device.
This module holds the few decisions around them:

* **The recipe's `train.batch_size` is the global batch of one optimiser step.** Each of
  the W ranks takes its 1/W slice of every batch from the same seeded stream, then splits
  it into `grad_accum` micro-batches. So a recipe trains the same model on 1 or 4 ranks
  (up to float reduction order), and a DDP checkpoint resumes on any number of ranks.
* gloo on CPU, nccl on CUDA, chosen from the machine.
* Every rank checks that it runs the same recipe before any work starts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from greentune.errors import UserError

log = logging.getLogger(__name__)

# Long enough for rank 0 writing a big checkpoint while the others wait at a barrier;
# a dead rank never waits this long: torchrun tears the job down when a worker dies.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job; the default is a single process."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    backend: str | None = None

    @property
    def active(self) -> bool:
        """True when there are other ranks to talk to."""
        return self.world > 1 and dist.is_available() and dist.is_initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    # ---- collectives (no-ops for a single process) -------------------------------------
    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def sum(self, *values: float) -> list[float]:
        """Element-wise sum of `values` over ranks (float64)."""
        t = torch.tensor(values, dtype=torch.float64)
        if self.active:
            t = t.to(self.device()) if self.backend == "nccl" else t
            dist.all_reduce(t)
        return [float(v) for v in t.cpu()]

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.active:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def from_main(self, obj):
        """Rank 0's `obj`, on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


SINGLE = DistContext()


def init_from_env() -> DistContext:
    """Join the job torchrun started (its env vars), or return the single-process context."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if local_rank >= torch.cuda.device_count():
            raise UserError(
                f"{local_world} processes on this machine but {torch.cuda.device_count()} GPU(s): "
                "start one process per GPU (or hide the GPUs with CUDA_VISIBLE_DEVICES= to use CPUs)"
            )
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    ctx = DistContext(rank, world, local_rank, local_world, backend)
    log.info("rank %d of %d (local %d of %d), backend %s", rank, world, local_rank, local_world, backend)
    return ctx


def close(ctx: DistContext) -> None:
    """Leave the process group (after the last collective of the job)."""
    if ctx.active:
        dist.destroy_process_group()


def check_same_recipe(ctx: DistContext, identity: dict) -> None:
    """Refuse to start when the ranks were given different recipes (or data)."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
    digests = ctx.gather(digest)
    odd = [r for r, d in enumerate(digests) if d != digests[0]]
    if odd:
        raise UserError(
            f"ranks {odd} were given a different recipe than rank 0 "
            f"({digests[odd[0]]} vs {digests[0]}); every rank must run the same recipe"
        )


def check_divisible(ctx: DistContext, batch_size: int, grad_accum: int) -> None:
    if batch_size % ctx.world:
        raise UserError(
            f"train.batch_size {batch_size} is the global batch and must divide evenly over {ctx.world} ranks"
        )
    if (batch_size // ctx.world) < grad_accum:
        raise UserError(
            f"train.batch_size {batch_size} over {ctx.world} ranks leaves "
            f"{batch_size // ctx.world} rows per rank, fewer than train.grad_accum {grad_accum}"
        )


def adapter_digests(ctx: DistContext, params: dict[str, torch.Tensor]) -> list[str]:
    """Every rank's hash of its (whole) trainable tensors; DDP must keep them identical."""
    h = hashlib.sha256()
    for name in sorted(params):
        h.update(name.encode())
        h.update(params[name].detach().cpu().contiguous().numpy().tobytes())
    digests = ctx.gather(h.hexdigest()[:16])
    if len(set(digests)) > 1:
        raise RuntimeError(f"data-parallel ranks ended with different adapters: {digests}")
    return digests


def rank_slice(batch: dict, ctx: DistContext) -> dict:
    """This rank's contiguous 1/W of a global batch (a short last batch still splits evenly
    as far as it goes; a rank may get one row fewer)."""
    if ctx.world == 1:
        return batch
    n = batch["input_ids"].shape[0]
    bounds = [n * r // ctx.world for r in range(ctx.world + 1)]
    lo, hi = bounds[ctx.rank], bounds[ctx.rank + 1]
    return {k: v[lo:hi] for k, v in batch.items()}


# ---- wrapping the model -----------------------------------------------------------------


def frozen_buffers_to_params_(model: nn.Module) -> int:
    """Make quantised weights (`qweight` uint8 buffers) frozen parameters, so FSDP2 shards
    them too: FSDP shards parameters only, and the packed base is most of the memory."""
    n = 0
    for module in model.modules():
        buf = module._buffers.get("qweight")
        if buf is not None:
            del module._buffers["qweight"]
            module.qweight = nn.Parameter(buf, requires_grad=False)
            n += 1
    return n


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP shards one by one (HF causal LMs keep them in `model.layers`)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise UserError(f"train.parallel fsdp: cannot find the decoder layers of {type(model).__name__}")
    return list(layers)


def shard_model_(model: nn.Module, ctx: DistContext) -> None:
    """FSDP2: shard each decoder layer, then the rest, over all ranks (frozen base included)."""
    from torch.distributed.fsdp import fully_shard

    converted = frozen_buffers_to_params_(model)
    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)
    log.info(
        "FSDP2: %d decoder layers sharded over %d ranks (%d quantised weights)",
        len(decoder_layers(model)),
        ctx.world,
        converted,
    )


def wrap_objective(objective: nn.Module, ctx: DistContext, parallel: str) -> nn.Module:
    """The module the loop calls: DDP around the objective, or the objective itself (single
    process, or FSDP where the model inside is already sharded)."""
    if not ctx.active or parallel == "fsdp":
        return objective
    from torch.nn.parallel import DistributedDataParallel as DDP

    from greentune.moe.expert_lora import ExpertLoRA

    device_ids = [ctx.local_rank] if ctx.backend == "nccl" else None
    # An expert that got no tokens leaves its LoRA pair out of the graph: DDP must look for that.
    unused = any(isinstance(m, ExpertLoRA) for m in objective.modules())
    # No buffer syncing: every rank loaded the same base and seeded the same adapter init, and
    # broadcasting a (quantised) base at start or every step would cost its whole size.
    return DDP(
        objective,
        device_ids=device_ids,
        find_unused_parameters=unused,
        init_sync=False,
        forward_sync_buffers=False,
    )


# ---- launching --------------------------------------------------------------------------


def launch(argv: list[str], nproc: int) -> int:
    """`greentune train --nproc N ...`: the same command under torchrun on this machine.

    A worker that fails ends the job (torchrun stops the others); we report which rank in
    one line instead of torchrun's traceback.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"greentune-{os.getpid()}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.5,
    )
    env_threads = os.environ.get("OMP_NUM_THREADS")
    if env_threads is None:  # share the cores out instead of torchrun's default of 1 thread
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "greentune", *argv)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        code = failure.exitcode
        how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        raise UserError(
            f"rank {rank} of {nproc} failed ({how}); the other ranks were stopped. "
            "Fix the cause and continue with --resume"
        ) from None
    return 0
