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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from greentune.errors import UserError
from greentune.models.loader import default_device

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

    def on_main(self, fn) -> None:
        """Run `fn` on rank 0; a UserError there is raised on every rank, so all stop cleanly."""
        err = None
        if self.is_main:
            try:
                fn()
            except UserError as e:
                err = str(e)
        err = self.from_main(err)
        if err:
            raise UserError(err)


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


@contextmanager
def joined() -> Iterator[DistContext]:
    """`init_from_env` for the life of the block, and the group left however it ends."""
    ctx = init_from_env()
    try:
        yield ctx
    finally:
        close(ctx)


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

    device_ids = [ctx.local_rank] if ctx.backend == "nccl" else None
    # A module whose parameters a step may leave out of the graph says so (`leaves_graph_sometimes`,
    # e.g. an expert LoRA whose expert got no tokens): DDP must then look for unused parameters.
    unused = any(getattr(m, "leaves_graph_sometimes", False) for m in objective.modules())
    # No buffer syncing: every rank loaded the same base and seeded the same adapter init, and
    # broadcasting a (quantised) base at start or every step would cost its whole size.
    return DDP(
        objective,
        device_ids=device_ids,
        find_unused_parameters=unused,
        init_sync=False,
        forward_sync_buffers=False,
    )


# ---- the pipeline's one seam ------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """What a distributed job changes about each phase of the pipeline, asked in one place.

    On a single process every answer is the plain one (no checks, the default device, no
    sharding, no gathering, rank 0 is this process), so the pipeline never branches on
    ranks itself. `parallel` is the recipe's `train.parallel`."""

    ctx: DistContext = SINGLE
    parallel: str = "ddp"

    @property
    def is_main(self) -> bool:
        return self.ctx.is_main

    @property
    def sharded(self) -> bool:
        """FSDP: the base is sharded over the ranks while it trains."""
        return self.ctx.world > 1 and self.parallel == "fsdp"

    def check(self, recipe, run_dir, resume: bool) -> None:
        """Every rank runs the same recipe, whose batch splits over the ranks and whose
        method the parallelism can train."""
        if self.ctx.world == 1:
            return
        identity = {"recipe": recipe.identity(), "run_dir": str(run_dir.resolve()), "resume": resume}
        check_same_recipe(self.ctx, identity)
        check_divisible(self.ctx, recipe.train.batch_size, recipe.train.grad_accum)
        if self.sharded and recipe.method.relora is not None:
            raise UserError(
                "method.relora merges into the whole base, which train.parallel fsdp shards over "
                "the ranks; use train.parallel ddp for ReLoRA"
            )

    def device(self) -> torch.device:
        return self.ctx.device() if self.ctx.world > 1 else default_device()

    def load_device(self, device: torch.device) -> torch.device:
        """FSDP moves each decoder layer to the device as it shards it, so a base larger than
        one device only ever has one whole layer there: it loads on the CPU."""
        return torch.device("cpu") if self.sharded else device

    def on_main(self, fn) -> None:
        self.ctx.on_main(fn)

    def main_then_all(self, fn) -> None:
        """`fn` on rank 0 while the others wait (a shared file only one rank must write)."""
        if self.is_main:
            fn()
        self.ctx.barrier()

    def shard_(self, model: nn.Module) -> None:
        if self.sharded:
            shard_model_(model, self.ctx)

    def seed_ranks(self, seed: int) -> None:
        """Dropout masks differ between ranks, reproducibly (the adapters were initialised alike)."""
        if self.ctx.world > 1:
            torch.manual_seed(seed + 7919 * (self.ctx.rank + 1))

    def gather_for_merge(self, model: nn.Module, outputs: dict) -> dict[str, torch.Tensor] | None:
        """The job's last collectives, after training: the whole trained tensors on the CPU
        when FSDP sharded them (rank 0 rebuilds its own copy from them), else None; DDP's
        ranks prove they hold the same adapter (`outputs["adapter_digest_by_rank"]`). Then
        the ranks leave the group: from here rank 0 merges, exports and reports alone."""
        if self.ctx.world == 1:
            return None
        trained = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        if self.sharded:
            trained = {n: t.full_tensor().cpu() for n, t in trained.items()}
        else:
            outputs["adapter_digest_by_rank"] = adapter_digests(self.ctx, trained)
        self.ctx.barrier()
        close(self.ctx)
        return trained if self.sharded else None

    def calibrates_this_machine(self) -> bool:
        """Only a single-process run measures this machine as the planner models it."""
        if self.ctx.world > 1:
            log.info("a %d-rank run is not recorded as a planner calibration of this machine", self.ctx.world)
        return self.ctx.world == 1

    def summary(self) -> dict:
        return {"ranks": self.ctx.world, "parallel": self.parallel if self.ctx.world > 1 else None}
