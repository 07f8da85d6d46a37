"""What a trained model costs to run: `greentune eval --engine llamacpp|torch`.

    from greentune.inference import evaluate_inference
    result = evaluate_inference("runs/x", "eval.jsonl", engine="llamacpp", prompt_tokens=256, gen_tokens=128)
    result["generate"]["j_per_token"], result["perplexity"]

Both engines report the same numbers on the same tokens (the held-out rows packed as
training packs them): held-out perplexity, prompt-processing and generation tokens/s,
joules per token of each (from `energy.meter`: measured where a counter exists, else the
labelled estimate), and peak resident memory. `llamacpp` runs the exported GGUF in
llama.cpp (xllamacpp, in process) and takes the perplexity from llama.cpp's own logits;
`torch` runs the PyTorch model (fp32 on CPU). A run dir gets an `inference` row in its
ledger carrying these numbers (see `record`).
"""

from greentune.inference.run import evaluate_inference, run_eval_command

__all__ = ["evaluate_inference", "run_eval_command"]
