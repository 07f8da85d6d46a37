"""Token cache: `greentune train` start-up on a ~200 MB corpus, first run vs second run.

    python benchmarks/data_cache.py               # 200 MB; a few minutes on 2 busy CPU cores
    python benchmarks/data_cache.py --mb 20       # smoke run

1. Writes a `.jsonl` corpus of `--mb` MB of unique documents: each a random selection of
   real standard-library docstring and source paragraphs (`greentune.demo.corpus`), so no
   two documents are alike and the tokenizer's in-batch de-duplication cannot help.
2. Trains a byte-level BPE tokenizer (`--vocab`) on that text and builds a tiny Llama with it.
3. Calls `greentune.pipeline.train` twice on the same recipe (new run dir each time, one
   fresh GREENTUNE_CACHE) and stops each once its data is ready, timing the
   `build_datasets` call the pipeline makes (the same function, arguments and cache
   `greentune train` uses) and the start-up from the `train` call to that point (recipe,
   model checks, tokenizer, data). Run 1 tokenises into the cache; run 2 finds it.

Prints both runs' seconds and the speed-ups; `--uncached` also times the in-memory path
(`cache=False`) once, to show what the first run costs against no cache at all.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path


def write_corpus(path: Path, megabytes: float, seed: int = 0) -> int:
    from greentune.demo import corpus

    pool = [
        p
        for t in corpus.docstrings(limit_chars=3_000_000) + corpus.source_snippets(limit_chars=3_000_000)
        for p in t.split("\n\n")
        if p.strip()
    ]
    rng = random.Random(seed)
    target, written, n = int(megabytes * 1e6), 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            text = "\n\n".join(rng.sample(pool, rng.randint(3, 12)))
            line = json.dumps({"text": text}) + "\n"
            f.write(line)
            written += len(line.encode())
            n += 1
    return n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=200.0, help="corpus size in MB (default 200)")
    ap.add_argument("--vocab", type=int, default=8192, help="BPE vocabulary size (default 8192)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--workdir", default=None, help="keep files here (default: a temporary folder)")
    ap.add_argument(
        "--uncached",
        action="store_true",
        help="also time build_datasets(cache=False), the in-memory path, as the first run's baseline",
    )
    args = ap.parse_args()

    import os

    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        os.environ["GREENTUNE_CACHE"] = str(work / "cache")  # a cold cache for run 1
        from transformers import AutoTokenizer

        from greentune import pipeline
        from greentune.demo import corpus
        from greentune.models import tiny

        data = work / "corpus.jsonl"
        t0 = time.perf_counter()
        docs = write_corpus(data, args.mb)
        print(
            f"corpus: {data.stat().st_size / 1e6:,.1f} MB, {docs:,} documents "
            f"({time.perf_counter() - t0:.1f} s)"
        )
        tiny.build_tokenizer(corpus.docstrings(limit_chars=2_000_000), work / "tok", vocab_size=args.vocab)
        tok = AutoTokenizer.from_pretrained(work / "tok")
        tiny.build_tiny_model("llama", work / "model", tokenizer=tok, max_positions=args.seq_len)
        recipe = work / "recipe.yaml"
        recipe.write_text(
            yaml.safe_dump(
                {
                    "base_model": str(work / "model"),
                    "data": {"train": str(data), "max_seq_len": args.seq_len},
                    "method": {"lora": {"rank": 4, "alpha": 8}},
                    "energy": {"measure_savings": False},
                    "train": {"steps": 1, "batch_size": 8, "warmup": 0, "checkpoint_every": 1},
                }
            )
        )

        class DataReady(Exception):
            """Raised once the data is built: start-up is over, the rest of a run is not measured."""

        build = pipeline.build_datasets

        def timed_build(*a, **kw):
            t = time.perf_counter()
            out = build(*a, **kw)
            raise DataReady(time.perf_counter() - t, len(out[0]), out[0].n_tokens)

        pipeline.build_datasets = timed_build
        runs = []
        for run in (1, 2):
            t = time.perf_counter()
            try:
                pipeline.train(recipe, run_dir=work / f"run{run}", progress=False)
                raise SystemExit("train returned without building data")
            except DataReady as ready:
                data_s, rows, tokens = ready.args
            runs.append((data_s, time.perf_counter() - t))
            print(
                f"run {run}: build_datasets {data_s:8.2f} s   start-up (train() called -> data ready) "
                f"{runs[-1][1]:8.2f} s   ({rows:,} train rows, {tokens:,} tokens)"
            )
        if args.uncached:
            from greentune.recipe import load_recipe

            r = load_recipe(recipe)
            t = time.perf_counter()
            build(
                r.data.train,
                r.data.eval,
                tok,
                r.data.max_seq_len,
                r.data.pack,
                r.train.seed,
                r.data.eval_fraction,
                cache=False,
            )
            plain = time.perf_counter() - t
            print(
                f"in memory, no cache: build_datasets {plain:8.2f} s (run 1 through the cache took "
                f"{runs[0][0] / plain:.2f}x as long)"
            )
        cache_mb = sum(f.stat().st_size for f in (work / "cache" / "tokens").rglob("*") if f.is_file()) / 1e6
        print(f"token cache on disk: {cache_mb:,.0f} MB")
        (d1, s1), (d2, s2) = runs
        print(
            f"second run vs first: build_datasets {d1 / d2:,.1f}x faster ({d1:.1f} s -> {d2:.2f} s), "
            f"start-up {s1 / s2:,.1f}x faster ({s1:.1f} s -> {s2:.2f} s)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
