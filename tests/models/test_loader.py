import shutil

import pytest
import torch

from greentune.errors import UserError
from greentune.models.loader import check_model_dir, load_model, load_tokenizer


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_loads_safetensors_model_and_tokenizer(tiny_llama_dir):
    model = load_model(tiny_llama_dir)
    tok = load_tokenizer(tiny_llama_dir)
    ids = torch.tensor([tok("def f(x): return x")["input_ids"]])
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tok))
    assert next(model.parameters()).dtype == torch.float32


def test_sharded_checkpoint_loads(tmp_path, tiny_llama_dir):
    model = load_model(tiny_llama_dir)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    again = load_model(tmp_path / "sharded")
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n


def test_missing_dir():
    with pytest.raises(UserError, match="model not found: /nonexistent/model"):
        check_model_dir("/nonexistent/model")


def test_pickle_only_checkpoint_is_refused(tmp_path, tiny_llama_dir):
    d = _copy(tiny_llama_dir, tmp_path / "m")
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(
        UserError, match="only pickled weights .*never unpickles.*convert them to safetensors"
    ):
        load_model(d)


def test_corrupt_safetensors_header(tmp_path, tiny_llama_dir):
    d = _copy(tiny_llama_dir, tmp_path / "m")
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[:8] + b"{garbage" + raw[16:])
    with pytest.raises(UserError, match="corrupt safetensors file"):
        load_model(d)
    (d / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UserError, match="corrupt safetensors file .*tensors end at byte"):
        load_model(d)


def test_missing_tokenizer(tmp_path, tiny_llama_dir):
    d = _copy(tiny_llama_dir, tmp_path / "m")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (d / f).unlink()
    with pytest.raises(UserError, match="no tokenizer"):
        load_tokenizer(d)
