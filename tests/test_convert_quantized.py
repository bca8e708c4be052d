"""`moe-infer convert --quantize int8|int4`: the quantized store's files and manifest, `verify`, `load`
(the same logits as quantizing the model in memory), its size against bf16, and bad input."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import tiny_models

import moe_infer
from moe_infer import assets
from moe_infer.cli import main
from moe_infer.errors import CheckpointError, ConfigError
from moe_infer.experts.convert import convert
from moe_infer.experts.quant import QuantizedWeight, QuantScheme, part_specs
from moe_infer.experts.store import ExpertStore, verify


def expert_bytes(root: str) -> int:
    with open(os.path.join(root, "moe_infer.json")) as f:
        return sum(entry["nbytes"] for entry in json.load(f)["experts"])


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The shipped tiny-mixtral converted to bf16, int8 and int4 through the CLI."""
    root = tmp_path_factory.mktemp("quantized")
    src = str(assets.path("tiny-mixtral"))
    out = {}
    for name, flags in (("bf16", ["--dtype", "bfloat16"]), ("int8", ["--quantize", "int8"]),
                        ("int4", ["--quantize", "int4"])):
        out[name] = str(root / name)
        assert main(["convert", src, out[name], "--verify", "--no-progress", *flags]) == 0
    return out


def test_the_held_out_check(converted, capsys):
    """convert --quantize int4, verify, load: expert bytes on disk <= 0.3x bf16, and the loaded model
    computes exactly what quantizing the model in memory computes."""
    assert main(["verify", converted["int4"]]) == 0
    assert "OK" in capsys.readouterr().out
    assert expert_bytes(converted["int4"]) <= 0.3 * expert_bytes(converted["bf16"])
    assert expert_bytes(converted["int8"]) <= 0.55 * expert_bytes(converted["bf16"])
    ids = torch.tensor([list(b"def main(argv):\n    return parse(argv)\n")])
    for name in ("int8", "int4"):
        model = moe_infer.load(converted[name])
        in_memory = moe_infer.wrap(assets.load_model("tiny-mixtral")[0], quantize=name)
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, in_memory(ids).logits, rtol=0, atol=0)
        assert moe_infer.executor(model).stats()["quantization"] == QuantScheme(name).as_json()


def test_the_store_holds_the_documented_layout(converted):
    with open(os.path.join(converted["int4"], "moe_infer.json")) as f:
        manifest = json.load(f)
    assert manifest["quantization"] == {"method": "int4", "group_size": 128, "compute_dtype": "float32"}
    assert manifest["dtype"] == "float32"
    with ExpertStore.open(converted["int4"]) as store:
        layout = store.layout(0)
        h, i = layout.hidden_size, layout.intermediate_size
        specs = {f"w13.{r}": s for r, s in part_specs(QuantScheme("int4"), 2 * i, h).items()}
        specs.update({f"w2.{r}": s for r, s in part_specs(QuantScheme("int4"), h, i).items()})
        assert [(kind, dtype, tuple(shape)) for kind, dtype, shape, _ in layout.parts] == \
               [(kind, dtype, shape) for kind, (dtype, shape) in specs.items()]
        expert = store.read(0, 3)
        assert isinstance(expert.w13, QuantizedWeight) and expert.w13.shape == (2 * i, h)
        assert store.expert_nbytes(0) == store.stored_nbytes(0) == layout.nbytes


def test_a_store_that_disagrees_with_its_manifest_is_refused(converted, tmp_path):
    bad = str(tmp_path / "bad")
    shutil.copytree(converted["int4"], bad)
    path = os.path.join(bad, "moe_infer.json")
    with open(path) as f:
        manifest = json.load(f)
    manifest["quantization"] = {"method": "int8", "compute_dtype": "float32"}  # the files hold int4
    with open(path, "w") as f:
        json.dump(manifest, f)
    with pytest.raises(CheckpointError, match="w13.scales .* a int8 expert holds|int8 expert"):
        ExpertStore.open(bad)
    manifest["quantization"] = {"method": "int4", "group_size": 7, "compute_dtype": "float32"}
    with open(path, "w") as f:
        json.dump(manifest, f)
    with pytest.raises(CheckpointError, match="group_size=7"):
        verify(bad)


def test_bad_options_and_reuse(converted, tmp_path):
    src = str(assets.path("tiny-mixtral"))
    with pytest.raises(ConfigError, match="group_size=64 applies to quantize='int4' only"):
        convert(src, str(tmp_path / "x"), quantize="int8", group_size=64)
    with pytest.raises(ConfigError, match="quantize and fp8='keep'"):
        convert(src, str(tmp_path / "x"), quantize="int4", fp8="keep")
    assert not os.path.exists(tmp_path / "x")
    assert convert(src, converted["int4"], quantize="int4")["skipped"]  # the same conversion is reused
    with pytest.raises(CheckpointError, match="different conversion"):
        convert(src, converted["int4"], quantize="int4", group_size=64)


def test_group_size_and_biases(tmp_path):
    """GPT-OSS experts (biases, interleaved gate/up) in int4 groups of 32: loading computes the model
    with its experts quantized in memory."""
    hf, out = str(tmp_path / "hf"), str(tmp_path / "q")
    tiny_models.build("gpt_oss", 0).save_pretrained(hf)
    convert(hf, out, quantize="int4", group_size=32)
    model = moe_infer.load(out)
    reference = moe_infer.wrap(tiny_models.build("gpt_oss", 0), quantize=QuantScheme("int4", 32))
    ids = torch.randint(3, tiny_models.VOCAB_SIZE, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def two_layers(tmp_path_factory):
    """A 2-layer tiny Mixtral (H 64, I 32, 8 experts) converted to bf16 and int4: the cache tests run
    the fused kernels in Triton's interpreter, whose time grows with the layers (the shipped model's 6
    took minutes on a loaded machine)."""
    root = tmp_path_factory.mktemp("two-layers")
    tiny_models.build("mixtral", seed=4).save_pretrained(root / "hf")
    out = {"bf16": str(root / "bf16"), "int4": str(root / "int4")}
    convert(str(root / "hf"), out["bf16"], dtype="bfloat16")
    convert(str(root / "hf"), out["int4"], quantize="int4")
    return out


@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_cache_budgets_count_quantized_bytes(two_layers, kernel):
    """A budget over a quantized store holds quantized experts: slots of the stored size (over 3x
    more int4 experts per byte than bf16 at these shapes), the same logits as without a cache, through
    the torch path and through the fused quantized kernels over the slot pool (Triton's interpreter
    here)."""
    converted = two_layers
    ids = torch.randint(3, tiny_models.VOCAB_SIZE, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = moe_infer.load(converted["int4"])(ids).logits
    per_expert = {name: expert_bytes(converted[name]) // 16 for name in ("bf16", "int4")}
    budget = 6 * per_expert["int4"]
    model = moe_infer.load(converted["int4"], cpu_memory=budget, kernel=kernel)
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, expected, **({} if kernel == "triton" else dict(rtol=0, atol=0)))
    stats = moe_infer.executor(model).stats()
    tier = stats["tiers"]["cpu"]
    assert tier["slot_bytes"] <= per_expert["int4"] + 64 and tier["slots"] == 6 >= 3 * (budget // per_expert["bf16"])
    assert tier["peak_bytes"] <= budget and stats["kernel"] == kernel
