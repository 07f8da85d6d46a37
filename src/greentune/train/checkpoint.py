"""Checkpoints that survive SIGKILL: `checkpoints/step-N/` appears by one atomic rename.

A checkpoint holds the trainable tensors, the AdamW state, the torch RNG states, the
data position and counters — everything needed for a resumed run to continue
bit-identically on CPU. Tensors go to safetensors and the rest to JSON: nothing is ever
unpickled. Before the rename, `manifest.json` records every file's size and sha256; a
resume verifies them (`newest_valid`) and falls back to the newest checkpoint that passes,
so a truncated or half-deleted checkpoint is skipped, never a traceback.

Distributed runs: rank 0 writes the checkpoint, holding every rank's RNG state. Under DDP
the adapter and optimiser state are whole (identical on every rank), so the checkpoint is
the same as a single process's and resumes on any number of ranks. Under FSDP they are
sharded: every rank writes its shards with torch.distributed.checkpoint into
`sharded/` (safetensors, via its HuggingFace storage writer, so still no pickle) and
resumes on the same number of ranks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from greentune.errors import UserError
from greentune.faults import maybe_fault
from greentune.fsutil import atomic_dir, temp_sibling
from greentune.train.distributed import SINGLE, DistContext

STEP_RE = re.compile(r"^step-(\d+)$")
MANIFEST = "manifest.json"
DAMAGED_SUFFIX = ".damaged"

log = logging.getLogger(__name__)


def optimizer_tensors(
    optimizer: torch.optim.Optimizer, names: dict[torch.nn.Parameter, str]
) -> dict[str, torch.Tensor]:
    out = {}
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                out[f"{names[param]}::{key}"] = value.detach().contiguous().clone()
    return out


def load_optimizer_tensors(
    optimizer: torch.optim.Optimizer, params: dict[str, torch.nn.Parameter], tensors: dict[str, torch.Tensor]
) -> None:
    optimizer.state.clear()
    for key, value in tensors.items():
        name, field = key.rsplit("::", 1)
        if name not in params:
            raise UserError(f"checkpoint has optimiser state for {name}, which this model does not train")
        optimizer.state[params[name]][field] = value.to(params[name].device)


def _rng_states(ctx: DistContext) -> dict[str, torch.Tensor]:
    """This process's RNG states; in a job, every rank's (collective), rank r>0 suffixed `.rank<r>`."""
    mine = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        if ctx.world == 1:
            mine.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        else:
            mine["cuda"] = torch.cuda.get_rng_state()
    out = {}
    for r, states in enumerate(ctx.gather(mine)):
        out.update({(k if r == 0 else f"{k}.rank{r}"): v for k, v in states.items()})
    return out


def _restore_rng(rng: dict[str, torch.Tensor], ctx: DistContext, step: int) -> None:
    suffix = "" if ctx.rank == 0 else f".rank{ctx.rank}"
    if f"cpu{suffix}" in rng:
        torch.set_rng_state(rng[f"cpu{suffix}"])
    else:  # resumed on more ranks than were saved: a fresh, deterministic stream for this rank
        torch.manual_seed(1_000_003 * step + ctx.rank)
    if not torch.cuda.is_available():
        return
    if ctx.world == 1:
        cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda") and ".rank" not in k)]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    elif f"cuda{suffix}" in rng:
        torch.cuda.set_rng_state(rng[f"cuda{suffix}"])


def _sharded_state(params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> dict:
    """Trainable parameters and their optimiser state as one flat dict of (D)Tensors for DCP."""
    names = {p: n for n, p in params.items()}
    out = {f"trainable::{n}": p.detach() for n, p in params.items()}
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                out[f"optim::{names[param]}::{key}"] = value
    return out


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    params: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    state: dict,
    extra: dict[str, torch.Tensor] | None = None,
    keep: int = 2,
    ctx: DistContext = SINGLE,
    sharded: bool = False,
) -> Path:
    """Write `ckpt_root/step-<step>` atomically, then drop all but the newest `keep`.

    Collective in a distributed job: every rank calls it; `sharded` (FSDP) has every rank
    write its shards, otherwise only rank 0 writes.
    """
    names = {p: n for n, p in params.items()}
    target = ckpt_root / f"step-{step}"
    rng = _rng_states(ctx)
    tmp = None
    if sharded:
        import torch.distributed.checkpoint as dcp

        tmp = Path(ctx.from_main(str(temp_sibling(target)) if ctx.is_main else None))
        dcp.save(
            _sharded_state(params, optimizer),
            storage_writer=dcp.HuggingFaceStorageWriter(str(tmp / "sharded"), save_distributed=True),
        )
        ctx.barrier()
    if ctx.is_main:
        with atomic_dir(target, tmp) as tmp:
            if sharded:
                state = {
                    **state,
                    "optimizer_keys": sorted(
                        k for k in _sharded_state(params, optimizer) if k.startswith("optim::")
                    ),
                }
            else:
                save_file(
                    {n: p.detach().contiguous().clone() for n, p in params.items()},
                    str(tmp / "trainable.safetensors"),
                )
                save_file(optimizer_tensors(optimizer, names), str(tmp / "optimizer.safetensors"))
            maybe_fault(f"checkpoint-write:{step}")
            save_file({k: v.contiguous() for k, v in rng.items()}, str(tmp / "rng.safetensors"))
            if extra:  # ReLoRA's merged bases: the whole base, so no copy of it (see _own_storage)
                save_file(_own_storage(extra), str(tmp / "extra.safetensors"))
            groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
            (tmp / "state.json").write_text(
                json.dumps(
                    {**state, "step": step, "param_groups": groups, "world": ctx.world, "sharded": sharded},
                    indent=2,
                )
            )
            write_manifest(tmp)
        for old in list_checkpoints(ckpt_root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    ctx.barrier()
    return target


def _own_storage(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors`, contiguous, each on a storage of its own as safetensors requires: a tensor that
    shares its storage with an earlier one (or is a view into a larger one) is copied, the others
    are written as they are (a clone of every one would double a ReLoRA base in memory)."""
    out, seen = {}, set()
    for k, v in tensors.items():
        v = v.detach()
        storage = v.untyped_storage()
        key = storage.data_ptr()
        whole = v.is_contiguous() and v.storage_offset() == 0 and v.nbytes == storage.nbytes()
        out[k] = v if whole and key not in seen else v.contiguous().clone()
        seen.add(key)
    return out


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (half-written ones only exist under temp names)."""
    if not ckpt_root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_root.iterdir() if (m := STEP_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(folder: Path) -> None:
    """`folder/manifest.json`: the size and sha256 of every file below `folder`."""
    files = {
        str(f.relative_to(folder)): {"bytes": f.stat().st_size, "sha256": _sha256(f)}
        for f in sorted(folder.rglob("*"))
        if f.is_file() and f.name != MANIFEST
    }
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=2, sort_keys=True))


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"no {path.name}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path.name} is not valid JSON ({err})") from None


def _check_state(path: Path, step: int) -> None:
    state = _read_json(path / "state.json")
    if not (
        isinstance(state, dict)
        and state.get("step") == step
        and isinstance(state.get("param_groups"), list)
        and isinstance(state.get("data"), dict)
        and all(isinstance(state.get(k), (int, float)) for k in ("tokens", "seconds"))
    ):
        raise ValueError("state.json lacks the step, counters, data position or optimiser groups")
    required = ["rng.safetensors"] + (
        [] if state.get("sharded") else ["trainable.safetensors", "optimizer.safetensors"]
    )
    for name in required:
        if not (path / name).is_file():
            raise ValueError(f"no {name}")


def _check_manifest(path: Path) -> None:
    manifest = _read_json(path / MANIFEST)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files:
        raise ValueError(f"{MANIFEST} lists no files")
    for name, want in files.items():
        f = path / name
        if not f.is_file():
            raise ValueError(f"no {name}")
        want = want if isinstance(want, dict) else {}
        size = f.stat().st_size
        if size != want.get("bytes"):
            raise ValueError(f"{name} has {size} bytes, the manifest says {want.get('bytes')}")
        if _sha256(f) != want.get("sha256"):
            raise ValueError(f"{name}: content hash differs from the manifest")


def verify_checkpoint(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be resumed from, or None when it is whole.

    Checks every file against `manifest.json` (size, then sha256) and that `state.json`
    holds what a resume reads. A checkpoint of an older greentune, without a manifest, gets
    the structural checks and a header check of each safetensors file.
    """
    m = STEP_RE.match(path.name)
    try:
        if not m:
            raise ValueError("not a step-N folder")
        if (path / MANIFEST).exists():
            _check_manifest(path)
        else:
            from safetensors import safe_open

            for f in path.glob("*.safetensors"):
                with safe_open(str(f), "pt"):
                    pass
        _check_state(path, int(m.group(1)))
    except Exception as err:  # noqa: BLE001 — any defect makes the checkpoint unusable, named
        return str(err) or type(err).__name__
    return None


def newest_valid(ckpt_root: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint that passes `verify_checkpoint`, and the newer ones that did not
    (with the reason). The damaged ones are renamed `step-N.damaged`, out of the listing, so
    that pruning never counts them as one of the checkpoints to keep."""
    skipped = []
    for path in reversed(list_checkpoints(ckpt_root)):
        reason = verify_checkpoint(path)
        if reason is None:
            return path, skipped
        skipped.append((path, reason))
        aside = path.with_name(path.name + DAMAGED_SUFFIX)
        shutil.rmtree(aside, ignore_errors=True)
        path.rename(aside)
    return None, skipped


def clean_partial(ckpt_root: Path) -> None:
    """Remove temp folders left by a process killed while writing a checkpoint."""
    if ckpt_root.is_dir():
        for p in ckpt_root.iterdir():
            if p.name.startswith("."):
                shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(
    path: Path,
    params: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    ctx: DistContext = SINGLE,
) -> dict:
    """Restore tensors, optimiser state and RNG from `path`; return the JSON state (+ `extra`).

    Every rank reads `path` (the run dir must be on storage all ranks see)."""
    state = json.loads((path / "state.json").read_text())
    if state.pop("sharded", False):
        _load_sharded(path, params, optimizer, state, ctx)
    else:
        trainable = load_file(str(path / "trainable.safetensors"))
        missing = sorted(set(params) - set(trainable))
        if missing:
            raise UserError(f"{path}: checkpoint lacks {missing[0]}; was it written by another recipe?")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(trainable[name])
        load_optimizer_tensors(optimizer, params, load_file(str(path / "optimizer.safetensors")))
    state.pop("optimizer_keys", None)
    state.pop("world", None)
    for group, saved in zip(optimizer.param_groups, state.pop("param_groups")):
        group.update(saved)
    _restore_rng(load_file(str(path / "rng.safetensors")), ctx, state["step"])
    extra_path = path / "extra.safetensors"
    state["extra"] = load_file(str(extra_path)) if extra_path.exists() else {}
    return state


def _load_sharded(
    path: Path,
    params: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    state: dict,
    ctx: DistContext,
) -> None:
    import torch.distributed.checkpoint as dcp

    if state.get("world") != ctx.world:
        raise UserError(
            f"{path} holds FSDP shards of {state.get('world')} ranks; resume it with "
            f"--nproc {state.get('world')} (this job has {ctx.world})"
        )
    targets = {f"trainable::{n}": p.detach() for n, p in params.items()}
    optim_state: dict = {}
    for key in state["optimizer_keys"]:
        _, name, field = key.split("::")
        if name not in params:
            raise UserError(f"checkpoint has optimiser state for {name}, which this model does not train")
        p = params[name]
        value = torch.zeros((), dtype=torch.float32) if field == "step" else torch.zeros_like(p.detach())
        optim_state.setdefault(p, {})[field] = targets[key] = value
    dcp.load(targets, storage_reader=dcp.HuggingFaceStorageReader(str(path / "sharded")))
    optimizer.state.clear()
    for p, fields in optim_state.items():
        optimizer.state[p].update(fields)
