"""One inference evaluation: perplexity, then metered prompt processing and generation.

The steps, each engine alike (see `llamacpp_engine`, `torch_engine`):

1. held-out perplexity over the data's rows, packed as training packs them;
2. ``prompt``: the first `prompt_tokens` held-out tokens processed as one prompt, repeated
   until the window lasts `min_seconds` (so a short window is not all edge effects);
3. ``generate``: `gen_tokens` greedy tokens after that prompt, repeated the same way.

Each of 2 and 3 is one meter window; J/token = window joules ÷ tokens, tokens/s = tokens ÷
window seconds (wall clock, the same window as the energy); ``tokens_per_cpu_s`` divides by the
process's CPU seconds instead, the rate while it ran, which a machine shared with other jobs
distorts less (with one thread; with T threads it is T × the per-thread rate). Peak memory is the process's
peak resident set over the evaluation (sampled every 20 ms), and its growth over the RSS
before the model was loaded. For a run dir the whole evaluation is one ledger row, phase
``inference``, carrying the result in its ``details`` field.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

from greentune.errors import UserError
from greentune.inference.target import Target, load_tokenizer_for, resolve_target
from greentune.recipe import SEQ_LEN
from greentune.run_dir import RunDir

log = logging.getLogger(__name__)

ENGINES = ("torch", "llamacpp")
MAX_REPEATS = 10_000


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _check_args(engine: str, prompt_tokens: int, gen_tokens: int, threads: int, min_seconds: float) -> None:
    if engine not in ENGINES:
        raise UserError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if prompt_tokens < 1:
        raise UserError(f"--prompt-tokens must be at least 1, got {prompt_tokens}")
    if gen_tokens < 1:
        raise UserError(f"--gen-tokens must be at least 1, got {gen_tokens}")
    if threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}")
    if not min_seconds >= 0:
        raise UserError(f"--seconds must be 0 or more, got {min_seconds}")


def _context_length(t: Target, engine: str) -> int | None:
    if engine == "llamacpp":
        from greentune.export.llamacpp import gguf_context_length

        return gguf_context_length(t.gguf)
    if t.model_dir is None:  # a run with an adapter only: its base's config is checked when it loads
        return None
    from greentune.models.facts import load_config_dict

    return load_config_dict(t.model_dir).get("max_position_embeddings")


def _prompt_ids(rows, n: int) -> list[int]:
    """The first `n` real held-out tokens, across rows."""
    ids: list[int] = []
    for i in range(len(rows)):
        ids += rows.input_ids[i][rows.attention_mask[i].bool()].tolist()
        if len(ids) >= n:
            return ids[:n]
    raise UserError(f"the held-out data has {len(ids)} tokens, fewer than --prompt-tokens {n}")


def _repeat(meter, phase: str, fn, min_seconds: float) -> dict:
    """Call `fn()` (→ tokens) in one meter window until it lasted `min_seconds`; the window's numbers."""
    tokens, repeats = 0, 0
    window = meter.start(phase)
    t0, cpu0 = time.perf_counter(), time.process_time()
    while repeats < MAX_REPEATS and (repeats == 0 or time.perf_counter() - t0 < min_seconds):
        tokens += fn()
        repeats += 1
    cpu = time.process_time() - cpu0
    m = window.end()
    return {
        "tokens": tokens,
        "repeats": repeats,
        "seconds": m.seconds,
        "tokens_per_s": tokens / max(m.seconds, 1e-9),
        "cpu_seconds": cpu,
        "tokens_per_cpu_s": tokens / max(cpu, 1e-9),
        "joules": m.total_joules,
        "j_per_token": m.total_joules / max(tokens, 1),
        "joules_by_component": dict(m.joules),
        "estimate": m.is_estimate,
    }


def _perplexity(engine, rows, batch_size: int) -> tuple[float, int]:
    """Mean loss over the rows' target tokens, and how many (torch batches; llama.cpp row by row)."""
    if engine.name == "torch":
        from greentune.train.loop import evaluate_loss

        return evaluate_loss(engine.model, rows, batch_size, device=engine.device)
    total, count = 0.0, 0
    for i in range(len(rows)):
        real = rows.attention_mask[i].bool()
        ids = rows.input_ids[i][real].tolist()
        targets = (rows.labels[i][real] != -100).tolist()
        s, n = engine.score(ids, targets)
        total, count = total + s, count + n
    if count == 0:
        raise UserError("the held-out data has no scored tokens")
    return -total / count, count


def _open_engine(t: Target, engine: str, n_ctx: int, threads: int):
    if engine == "llamacpp":
        from greentune.inference.llamacpp_engine import LlamaCppEngine

        return LlamaCppEngine(t.gguf, n_ctx=n_ctx, threads=threads)
    from greentune.inference.torch_engine import TorchEngine

    return TorchEngine(t.run_dir if t.run_dir is not None else t.model_dir, threads)


def _check_target(t: Target, engine: str, target) -> None:
    if engine == "llamacpp":
        from greentune.export.llamacpp import require_gguf

        if t.gguf is None:
            raise UserError(f"{target}: no exported GGUF found (export it first: greentune export {target})")
        require_gguf(t.gguf)
    elif t.model_dir is None and not (t.run_dir is not None and RunDir(t.run_dir).adapter.is_dir()):
        raise UserError(
            f"{target}: the torch engine needs a run dir or model folder (got a GGUF file without one)"
        )


DEFAULT_PROMPT_TOKENS, DEFAULT_GEN_TOKENS = 256, 128


def _fit_lengths(prompt_tokens: int | None, gen_tokens: int | None, ctx: int | None) -> tuple[int, int]:
    """The prompt and generation lengths: the user's, refused when they exceed the model's
    context; the defaults, shortened to fit a small context (half prompt, up to half generation)."""
    if (
        ctx is not None
        and prompt_tokens is not None
        and gen_tokens is not None
        and prompt_tokens + gen_tokens > ctx
    ):
        raise UserError(
            f"--prompt-tokens {prompt_tokens} + --gen-tokens {gen_tokens} exceed the model's context "
            f"of {ctx} tokens"
        )
    room = ctx if ctx is not None else DEFAULT_PROMPT_TOKENS + DEFAULT_GEN_TOKENS
    if prompt_tokens is None:
        prompt_tokens = max(1, min(DEFAULT_PROMPT_TOKENS, room // 2, room - (gen_tokens or 1)))
    if gen_tokens is None:
        gen_tokens = max(1, min(DEFAULT_GEN_TOKENS, room - prompt_tokens))
    if ctx is not None and prompt_tokens + gen_tokens > ctx:
        raise UserError(
            f"--prompt-tokens {prompt_tokens} + --gen-tokens {gen_tokens} exceed the model's context "
            f"of {ctx} tokens"
        )
    return prompt_tokens, gen_tokens


def evaluate_inference(
    target: str | Path,
    data: str | Path,
    *,
    engine: str = "torch",
    prompt_tokens: int | None = None,
    gen_tokens: int | None = None,
    threads: int | None = None,
    max_seq_len: int | None = None,
    batch_size: int = 8,
    min_seconds: float = 2.0,
    gguf_quant: str | None = None,
    max_rows: int | None = None,
    record: bool = True,
    meter=None,
) -> dict:
    """The numbers of the module docstring for `target` on `data` (a dict, JSON-ready).

    `max_rows` limits the perplexity to the first rows (None: all). With `record` and a run
    dir, the evaluation is appended to the run's ledger. Raises UserError for bad input.
    """
    from greentune.energy import Meter
    from greentune.energy.hardware import describe_hardware
    from greentune.energy.savings import PeakRss
    from greentune.evaluate import load_eval_rows

    threads = usable_cpus() if threads is None else int(threads)
    _check_args(engine, prompt_tokens or 1, gen_tokens or 1, threads, float(min_seconds))
    t = resolve_target(target, gguf_quant)
    _check_target(t, engine, target)
    recipe = RunDir(t.run_dir).read_recipe() if t.run_dir else None
    ctx = _context_length(t, engine)
    if max_seq_len is None:  # the run's rows, at most the model's positions
        max_seq_len = recipe.data.max_seq_len if recipe is not None else SEQ_LEN
        max_seq_len = min(int(max_seq_len), int(ctx)) if ctx is not None else max_seq_len
    elif ctx is not None and max_seq_len > ctx:
        raise UserError(
            f"--max-seq-len {max_seq_len} must be between 1 and the model's {ctx} positions ({target})"
        )
    user_prompt = prompt_tokens is not None
    prompt_tokens, gen_tokens = _fit_lengths(prompt_tokens, gen_tokens, ctx)
    rows = load_eval_rows(data, load_tokenizer_for(t), int(max_seq_len))
    if not user_prompt:  # a small held-out file: a shorter default prompt, not a refusal
        prompt_tokens = max(1, min(prompt_tokens, int(rows.attention_mask.sum()) if len(rows) else 1))
    prompt = _prompt_ids(rows, int(prompt_tokens))
    if max_rows is not None:
        from greentune.data.packing import PackedData

        rows = PackedData(rows.input_ids[:max_rows], rows.labels[:max_rows], rows.attention_mask[:max_rows])

    own_meter = meter is None
    meter = meter or Meter.auto()
    try:
        with PeakRss() as rss:
            rss_start = rss.peak
            whole = meter.start("inference")
            eng = _open_engine(
                t, engine, n_ctx=max(int(max_seq_len), prompt_tokens + gen_tokens) + 8, threads=threads
            )
            try:
                t0 = time.perf_counter()
                loss, count = _perplexity(eng, rows, batch_size)
                eval_seconds = time.perf_counter() - t0
                pp = _repeat(meter, "prompt", lambda: eng.prompt(prompt), min_seconds)
                eng.prepare_generation(prompt)
                tg = _repeat(meter, "generate", lambda: eng.generate(prompt, gen_tokens), min_seconds)
                pp["engine_tokens_per_s"] = eng.engine_tokens_per_s("prompt")
                tg["engine_tokens_per_s"] = eng.engine_tokens_per_s("generate")
            finally:
                eng.close()
            measurement = whole.end()
    finally:
        if own_meter:
            meter.close()
    hw = describe_hardware()
    result = {
        "engine": engine,
        "format": eng.format,
        "model": t.label or eng.description,
        "data": str(data),
        "file": str(t.gguf) if engine == "llamacpp" else None,
        "model_bytes": int(eng.model_bytes),
        "threads": threads,
        "prompt_tokens": int(prompt_tokens),
        "gen_tokens": int(gen_tokens),
        "loss": loss,
        "perplexity": math.exp(loss),
        "tokens": count,
        "seconds": eval_seconds,
        "tokens_per_s": count / max(eval_seconds, 1e-9),
        "prompt": pp,
        "generate": tg,
        "j_per_1k_generated": 1000.0 * tg["j_per_token"],
        "peak_rss_bytes": int(rss.peak),
        "rss_growth_bytes": int(max(0, rss.peak - rss_start)),
        "energy_source": dict(measurement.source),
        "estimate": measurement.is_estimate,
        "machine": f"{hw['cpu']} ({hw['usable_cpus']} usable CPUs)"
        + (f", {', '.join(hw['gpus'])}" if hw["gpus"] else ""),
        "measured_at": measurement.end,
    }
    if engine == "llamacpp":
        result["modelled"] = _modelled(t.gguf, threads, prompt_tokens, gen_tokens)
        result["streaming_gbs"] = record_streaming_rate(
            t.gguf, threads, prompt_tokens, gen_tokens, tg["tokens_per_s"]
        )
    if record and t.run_dir is not None:
        result["ledger"] = str(record_inference(t.run_dir, measurement, result))
    return result


def _modelled(gguf: Path, threads: int, prompt_tokens: int, gen_tokens: int) -> dict:
    """The planner's projection of this file here (at a bandwidth probed now) and on the target laptop."""
    from greentune.plan.inference import measure_bandwidth, projections_for_file

    bw = measure_bandwidth(threads, megabytes=256, repeats=3)
    out = projections_for_file(gguf, threads, prompt_tokens, gen_tokens, bandwidth_gbs=bw)
    out["this_bandwidth_probe_gbs"] = bw
    return out


STREAMING_MIN_BYTES = 64 * 2**20  # below this a model sits in the CPU's caches: its decode is overhead-bound


def record_streaming_rate(
    gguf: Path, threads: int, prompt_tokens: int, gen_tokens: int, decode_tokens_per_s: float
) -> float:
    """The weight-streaming rate (GB/s) this decode implied; for a file too big for the caches
    (`STREAMING_MIN_BYTES`) it is stored as this machine's serving calibration for its format,
    which `greentune plan` then projects with. Optional bookkeeping: a failure is one warning."""
    from greentune.plan.calibrate import store_streaming_rate
    from greentune.plan.hardware import detect_this
    from greentune.plan.inference import effective_bandwidth_gbs, profile_from_gguf

    prof = profile_from_gguf(gguf)
    gbs = effective_bandwidth_gbs(prof, decode_tokens_per_s, prompt_tokens, gen_tokens)
    if prof.file_bytes >= STREAMING_MIN_BYTES:
        try:
            store_streaming_rate(detect_this(), prof.format, gbs, threads)
        except (OSError, ValueError) as err:
            log.warning("serving calibration not stored: %s", err)
    return gbs


def record_inference(run_dir: Path, measurement, result: dict) -> Path:
    """Append the `inference` row (energy of the whole evaluation, `details` = `result`) to the run's
    ledger."""
    from greentune.energy import Factors, Ledger
    from greentune.fsutil import read_jsonl

    rows = read_jsonl(RunDir(run_dir).ledger)
    last = rows[-1] if rows else {}
    factors = Factors.for_region(
        last.get("region"), pue=last.get("pue"), wue_onsite=last.get("wue_onsite_l_per_kwh")
    )
    ledger = Ledger(run_dir, factors)
    ledger.record(measurement, phase="inference", details={k: v for k, v in result.items() if k != "ledger"})
    return ledger.path


def format_result(r: dict) -> str:
    """The human-readable lines `greentune eval` prints."""
    tag = " (estimate: no energy counter on this machine)" if r["estimate"] else ""
    lines = [
        f"perplexity {r['perplexity']:.4f}  loss {r['loss']:.4f}  {r['tokens']:,} tokens  "
        f"{r['tokens_per_s']:,.0f} tokens/s  ({r['model']})",
        f"{r['engine']} {r['format']}, {r['threads']} thread(s), {r['machine']}{tag}:",
    ]
    for name, key in (("prompt", "prompt"), ("generation", "generate")):
        p = r[key]
        lines.append(
            f"  {name:<10} {p['tokens_per_s']:>10,.1f} tokens/s  {p['j_per_token']:.3g} J/token  "
            f"({p['tokens']:,} tokens in {p['seconds']:.2f} s)"
        )
    lines.append(
        f"  cost to serve {r['j_per_1k_generated']:.3g} J per 1,000 generated tokens; peak memory "
        f"{r['peak_rss_bytes'] / 2**20:,.0f} MiB ({r['rss_growth_bytes'] / 2**20:,.0f} MiB over the start)"
    )
    m = r.get("modelled")
    if m:
        here = m["this"]
        laptop = next(v for k, v in m.items() if k not in ("this", "this_bandwidth_probe_gbs"))
        lines.append(
            f"  modelled (plan.inference): here {here['decode_tokens_per_s']:,.0f} tokens/s decode at "
            f"{m['this_bandwidth_probe_gbs']:.1f} GB/s probed "
            f"({here['decode_tokens_per_s'] / max(r['generate']['tokens_per_s'], 1e-9):.2f}× "
            f"the measured); {laptop['device']} {laptop['decode_tokens_per_s']:,.0f} tokens/s, "
            f"{laptop['j_per_1k_generated']:.3g} J per 1,000 generated tokens"
        )
    if r.get("ledger"):
        lines.append(f"  recorded in {r['ledger']} (phase inference)")
    return "\n".join(lines)


def run_eval_command(ns) -> int:
    """`greentune eval` with its parsed arguments (cli.py wires the parser)."""
    result = evaluate_inference(
        ns.target,
        ns.data,
        engine=ns.engine,
        prompt_tokens=ns.prompt_tokens,
        gen_tokens=ns.gen_tokens,
        threads=ns.threads,
        max_seq_len=ns.max_seq_len,
        batch_size=ns.batch_size,
        min_seconds=ns.seconds,
        gguf_quant=ns.gguf,
    )
    print(json.dumps(result, indent=2) if ns.json else format_result(result))
    return 0
