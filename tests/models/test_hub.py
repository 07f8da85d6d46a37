"""Hub model ids resolve through huggingface_hub's own cache, offline; failures are one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from greentune.cli import main
from greentune.errors import UserError
from greentune.models.hub import CONFIG_FILES, META_FILES, parse_hub_id, resolve_model

REPO = "tiny-org/tiny-llama"


def test_hub_ids_are_told_from_local_paths(tmp_path, monkeypatch):
    assert parse_hub_id("mistralai/Mixtral-8x7B-v0.1") == ("mistralai/Mixtral-8x7B-v0.1", None)
    assert parse_hub_id("org/name@v1.0") == ("org/name", "v1.0")
    for local in ("./org/name", "/abs/path", "name", "a/b/c", "org/name@"):
        assert parse_hub_id(local) is None, local
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert parse_hub_id("org/name") is None  # an existing folder wins
    assert resolve_model("org/name").commit is None


def test_resolves_from_the_cache_offline(offline_hub, tiny_llama_dir):
    commit = offline_hub.add(REPO, tiny_llama_dir)
    r = resolve_model(REPO)
    assert (r.repo_id, r.commit) == (REPO, commit)
    assert r.path == offline_hub.hub_cache / "models--tiny-org--tiny-llama" / "snapshots" / commit
    assert (r.path / "model.safetensors").is_file()
    assert resolve_model(f"{REPO}@{commit}").path == r.path
    assert resolve_model(REPO, revision=commit).path == r.path


def test_not_cached_offline_is_one_line(offline_hub):
    with pytest.raises(UserError) as err:
        resolve_model("nobody/nothing")
    msg = str(err.value)
    assert msg.startswith("nobody/nothing: not in the Hugging Face cache") and "HF_HUB_OFFLINE=1" in msg
    assert "hf download nobody/nothing" in msg and "\n" not in msg


def test_config_only_snapshot_serves_the_planner_not_the_trainer(offline_hub, tiny_llama_dir):
    offline_hub.add(REPO, tiny_llama_dir, only=["config.json"])
    assert (resolve_model(REPO, config_only=True).path / "config.json").is_file()
    with pytest.raises(UserError, match=r"the cached snapshot lacks \*\.safetensors and HF_HUB_OFFLINE=1"):
        resolve_model(REPO)


def test_download_patterns_never_match_pickles():
    """What a typical repo holds, filtered by huggingface_hub's own matcher with greentune's patterns."""
    from huggingface_hub.utils import filter_repo_objects

    repo = [
        "config.json",
        "generation_config.json",
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "tokenizer.model",
        "special_tokens_map.json",
        "original/consolidated.00.pth",
        "training_args.bin",
        "README.md",
        "model.ckpt",
        "flax_model.msgpack",
        "tf_model.h5",
    ]
    meta = set(filter_repo_objects(repo, allow_patterns=META_FILES))
    assert meta == {
        "config.json",
        "generation_config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "tokenizer.model",
        "special_tokens_map.json",
    }
    assert set(filter_repo_objects(repo, allow_patterns=CONFIG_FILES)) == {"config.json"}
    weights = set(
        filter_repo_objects(
            repo + ["sub/model.safetensors"], allow_patterns=["*.safetensors"], ignore_patterns=["*/*"]
        )
    )
    assert weights == {"model-00001-of-00002.safetensors"}


def _recipe(tmp_path, base, train_path, **extra):
    p = tmp_path / "hub.yaml"
    p.write_text(
        yaml.safe_dump(
            {
                "base_model": base,
                "data": {"train": str(train_path), "max_seq_len": 32},
                "method": {"lora": {"rank": 2, "alpha": 4}},
                "energy": {"measure_savings": False},
                "train": {"steps": 2, "batch_size": 2, "warmup": 0, "checkpoint_every": 2},
                **extra,
            }
        )
    )
    return p


@pytest.mark.slow
def test_train_eval_export_plan_from_a_hub_id(offline_hub, tiny_llama_dir, text_jsonl, tmp_path, capsys):
    commit = offline_hub.add(REPO, tiny_llama_dir)
    run = tmp_path / "run"
    assert main(["train", str(_recipe(tmp_path, REPO, text_jsonl)), "--run-dir", str(run), "--quiet"]) == 0
    recorded = yaml.safe_load((run / "recipe.yaml").read_text())
    assert (recorded["base_model"], recorded["base_model_commit"]) == (REPO, commit)
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["base_model"], summary["base_model_commit"]) == (REPO, commit)
    # the run dir's recipe.yaml is itself a recipe that pins the same commit
    from greentune.recipe import load_recipe

    assert load_recipe(run / "recipe.yaml").base_model_commit == commit
    # --resume of the finished run agrees it is the same recipe (same commit)
    assert (
        main(
            ["train", str(_recipe(tmp_path, REPO, text_jsonl)), "--run-dir", str(run), "--resume", "--quiet"]
        )
        == 0
    )
    capsys.readouterr()

    assert main(["eval", REPO, "--data", str(text_jsonl), "--max-seq-len", "32", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == REPO and report["tokens"] > 0

    out = tmp_path / "m.gguf"
    assert main(["export", REPO, "--format", "gguf", "--quant", "q8_0", "--out", str(out)]) == 0
    assert out.is_file()
    capsys.readouterr()

    assert main(["plan", "--model", REPO, "--hardware", "H100", "--tokens", "1000000", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == f"{REPO}@{commit[:12]}"


def test_missing_hub_model_in_a_recipe_is_one_line_exit_2(offline_hub, text_jsonl, tmp_path, capsys):
    code = main(
        ["train", str(_recipe(tmp_path, "nobody/nothing", text_jsonl)), "--run-dir", str(tmp_path / "r")]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err.startswith("greentune: error: nobody/nothing: not in the Hugging Face cache")
    assert not (tmp_path / "r").exists()


def test_the_environment_is_honoured_by_a_fresh_process(offline_hub, tiny_llama_dir):
    """HF_HOME and HF_HUB_OFFLINE as a user sets them, read by huggingface_hub at import."""
    commit = offline_hub.add(REPO, tiny_llama_dir, only=["config.json"])
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("HF_HUB_CACHE")  # derived from HF_HOME, as for a user
    proc = subprocess.run(
        [sys.executable, "-m", "greentune", "plan", "--model", REPO, "--hardware", "H100", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["model"] == f"{REPO}@{commit[:12]}"
    proc = subprocess.run(
        [sys.executable, "-m", "greentune", "plan", "--model", "nobody/nothing"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2 and "HF_HUB_OFFLINE=1" in proc.stderr and "Traceback" not in proc.stderr


class FakeHub:
    """Stands in for the network side of `snapshot_download`: serves `repo`'s files through
    huggingface_hub's own pattern filter, so what greentune asks for is what it gets."""

    def __init__(self, repo: Path, tmp: Path, error=None):
        self.repo, self.snapshot, self.error, self.asked = repo, tmp / "snap" / ("c" * 40), error, []

    def __call__(
        self, repo_id, revision=None, allow_patterns=None, ignore_patterns=None, local_files_only=False, **kw
    ):
        from huggingface_hub.errors import LocalEntryNotFoundError
        from huggingface_hub.utils import filter_repo_objects

        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        if self.error is not None:
            raise self.error
        names = [str(p.relative_to(self.repo)) for p in self.repo.rglob("*") if p.is_file()]
        picked = sorted(
            filter_repo_objects(names, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns)
        )
        self.asked.append(picked)
        for name in picked:
            (self.snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            (self.snapshot / name).write_bytes((self.repo / name).read_bytes())
        return str(self.snapshot)


def test_download_fetches_config_tokenizer_and_indexed_shards_only(tmp_path, monkeypatch, tiny_llama_dir):
    import shutil

    import huggingface_hub

    repo = tmp_path / "repo"
    shutil.copytree(tiny_llama_dir, repo)
    (repo / "model.safetensors").rename(repo / "model-00001-of-00001.safetensors")
    (repo / "model.safetensors.index.json").write_text(
        json.dumps(
            {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00001.safetensors"}}
        )
    )
    for extra in ("pytorch_model.bin", "consolidated.safetensors", "original/model.safetensors", "README.md"):
        (repo / extra).parent.mkdir(exist_ok=True)
        (repo / extra).write_bytes(b"not wanted")
    fake = FakeHub(repo, tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    r = resolve_model("org/model")
    assert r.commit == "c" * 40 and r.path == fake.snapshot
    assert "config.json" in fake.asked[0] and "tokenizer.json" in fake.asked[0]
    assert fake.asked[1] == ["model-00001-of-00001.safetensors"]
    got = {str(p.relative_to(fake.snapshot)) for p in fake.snapshot.rglob("*") if p.is_file()}
    assert not got & {
        "pytorch_model.bin",
        "consolidated.safetensors",
        "original/model.safetensors",
        "README.md",
    }
    assert resolve_model("org/model", config_only=True) and fake.asked[-1] == ["config.json"]


@pytest.mark.parametrize(
    "error,needles",
    [
        (
            "gated",
            ("org/model is gated: accept its licence on https://huggingface.co/org/model", "`hf auth login`"),
        ),
        (
            "missing",
            ("org/model: no such model on the Hugging Face Hub, or it is private", "hf download org/model"),
        ),
    ],
)
def test_gated_or_missing_repo_is_one_line(tmp_path, monkeypatch, error, needles):
    import httpx2 as httpx
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    response = httpx.Response(
        403 if error == "gated" else 404, request=httpx.Request("GET", "https://huggingface.co")
    )
    exc = (GatedRepoError if error == "gated" else RepositoryNotFoundError)("no", response=response)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", FakeHub(tmp_path, tmp_path, error=exc))
    with pytest.raises(UserError) as err:
        resolve_model("org/model")
    assert all(n in str(err.value) for n in needles) and "\n" not in str(err.value)
