"""Hub ids as model names, resolved offline against a Hugging Face hub cache that the test writes
(`models--org--name/refs/main`, `snapshots/<rev>/<file> -> ../../blobs/<sha256>`), the layout where
most users' models live."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

import moe_infer
from moe_infer.errors import CheckpointError, MissingFile
from moe_infer.experts.hub_layouts import SourceCheckpoint
from moe_infer.hub import is_hub_id

REVISION = "0123456789abcdef0123456789abcdef01234567"
FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def write_hub_cache(cache: Path, repo_id: str, source: Path) -> Path:
    """The hub cache entry of `repo_id` holding `source`'s FILES, as huggingface_hub lays it out;
    returns the snapshot folder."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / REVISION
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    for name in FILES:
        if not (source / name).exists():
            continue
        data = (source / name).read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        os.symlink(f"../../blobs/{blob}", snapshot / name)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path):
    cache = tmp_path / "hub"
    snapshot = write_hub_cache(cache, "org/tiny-mixtral", moe_infer.assets.path("tiny-mixtral"))
    return cache, snapshot


def test_hub_ids_are_told_from_paths(tmp_path):
    assert is_hub_id("mistralai/Mixtral-8x7B-v0.1") and is_hub_id("org/name.v2")
    assert not is_hub_id("tiny-mixtral")  # a bare name is a shipped or mistyped local name
    assert not is_hub_id("/abs/path") and not is_hub_id("../up/x") and not is_hub_id("a/b/c")
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "local").mkdir()
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert not is_hub_id("org/local")  # an existing local path wins
    finally:
        os.chdir(cwd)


def test_a_snapshot_whose_files_link_into_its_blobs_is_accepted(hub_cache):
    _, snapshot = hub_cache
    source = SourceCheckpoint(str(snapshot))
    try:
        assert "model.embed_tokens.weight" in source.keys()
    finally:
        source.close()


def test_a_snapshot_link_outside_its_blobs_is_refused(hub_cache, tmp_path):
    _, snapshot = hub_cache
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "model.safetensors").write_bytes((snapshot / "model.safetensors").read_bytes())
    os.unlink(snapshot / "model.safetensors")
    os.symlink(elsewhere / "model.safetensors", snapshot / "model.safetensors")
    with pytest.raises(CheckpointError, match="shard 'model.safetensors' escapes the model directory") as error:
        SourceCheckpoint(str(snapshot))
    assert "index" not in str(error.value)  # a single-file checkpoint has no index to cite
    # a plain directory linking to a blobs folder that is not its own hub repository's: refused too
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_bytes((snapshot / "config.json").read_bytes())
    os.symlink(os.path.realpath(snapshot.parents[1] / "blobs" / os.readlink(snapshot / "config.json").split("/")[-1]),
               plain / "model.safetensors")
    with pytest.raises(CheckpointError, match="escapes the model directory"):
        SourceCheckpoint(str(plain))


def _offline(cache: Path, tmp_path: Path) -> dict:
    return {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
            "MOE_INFER_CACHE": str(tmp_path / "moe_infer_cache")}


def test_load_convert_and_model_flags_resolve_hub_ids_offline(hub_cache, tmp_path):
    cache, _ = hub_cache
    code = (
        "import torch, moe_infer\n"
        "from moe_infer.models import load_model\n"
        "ids = torch.tensor([list(b'def main(')])\n"
        "reference, _ = moe_infer.assets.load_model('tiny-mixtral')\n"
        "expected = reference(ids).logits\n"
        "loaded = moe_infer.load('org/tiny-mixtral')\n"  # converted once into MOE_INFER_CACHE
        "torch.testing.assert_close(loaded(ids).logits, expected, rtol=1e-5, atol=1e-5)\n"
        "in_memory = moe_infer.load('org/tiny-mixtral', in_memory=True)\n"
        "torch.testing.assert_close(in_memory(ids).logits, expected, rtol=1e-5, atol=1e-5)\n"
        "model, tokenizer = load_model('org/tiny-mixtral')\n"
        "assert tokenizer is not None\n"
        "torch.testing.assert_close(model(ids).logits, expected)\n"
        "print('OK')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env=_offline(cache, tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("OK")
    converted = tmp_path / "converted"
    result = subprocess.run([sys.executable, "-m", "moe_infer", "convert", "org/tiny-mixtral", str(converted),
                             "--no-progress"], capture_output=True, text=True, timeout=300,
                            env=_offline(cache, tmp_path))
    assert result.returncode == 0, result.stderr
    assert (converted / "moe_infer.json").is_file()


def test_a_hub_id_missing_from_the_cache_offline_is_one_error(hub_cache, tmp_path):
    cache, _ = hub_cache
    result = subprocess.run([sys.executable, "-m", "moe_infer", "convert", "org/absent", str(tmp_path / "out"),
                             "--no-progress"], capture_output=True, text=True, timeout=120,
                            env=_offline(cache, tmp_path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "org/absent" in line and "not in the local hub cache" in line
    assert not (tmp_path / "out").exists()
    assert issubclass(MissingFile, FileNotFoundError)
