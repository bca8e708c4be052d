"""Every python snippet of the README runs as written, with stand-ins for what it leaves to the reader:
paths (`path/to/mixtral` is the shipped tiny-mixtral, `path/to/converted` its conversion), inputs
(`input_ids`, `trace`, `prompts`, ...) and, on a machine without CUDA, the lines that say they need
a GPU. A snippet that cannot run here is named with the reason, never dropped silently."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import moe_infer

README = Path(__file__).resolve().parents[1] / "README.md"
# the first line of a snippet -> why it cannot run in this test
NOT_HERE = {
    "from openai import OpenAI": "needs a running server: tests/test_serve*.py run the client against one",
    "import moe_infer\nmodel = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(f\"cuda:":
        "needs torchrun and a process per GPU: tests/test_parallel.py runs the same calls on gloo",
}
# stand-ins that differ between snippets: a snippet holding the key gets the value run before it
PRELUDES = {"ex.cache.prefetch(layer_idx, expert_ids": "expert_ids = [0, 1]  # experts of one layer"}
# a line that uses the GPU tier or CUDA: runs only where CUDA is
NEEDS_CUDA = re.compile(r"gpu_memory=|on CUDA|cuda")


def snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def _reason(snippet: str) -> str | None:
    return next((why for start, why in NOT_HERE.items() if snippet.startswith(start)), None)


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    from moe_infer.experts.convert import convert
    from moe_infer.traces.profiler import record_trace

    work = tmp_path_factory.mktemp("readme")
    tiny = moe_infer.assets.path("tiny-mixtral")
    convert(tiny, work / "converted")
    convert(tiny, work / "converted-int4", quantize="int4")
    model, tokenizer = moe_infer.assets.load_model("tiny-mixtral")
    text = work / "text.py"
    text.write_text("def main():\n    return [i * i for i in range(10)]\n" * 8)
    record_trace(model, work / "trace.safetensors", texts=[str(text)], tokenizer=tokenizer, model_name="tiny-mixtral",
                 seq_len=64, progress=False)
    trace = moe_infer.Trace.load(work / "trace.safetensors")
    generator = torch.Generator().manual_seed(0)
    experts, hidden_size, intermediate, tokens, top_k = 4, 32, 64, 5, 2
    namespace = {
        "input_ids": torch.tensor([list(b"def main(")]),
        "model_in_memory": model,
        "hidden": torch.randn(tokens, hidden_size, generator=generator),
        "w13": torch.randn(experts, 2 * intermediate, hidden_size, generator=generator) / hidden_size ** 0.5,
        "w2": torch.randn(experts, hidden_size, intermediate, generator=generator) / intermediate ** 0.5,
        "expert_ids": torch.stack([torch.randperm(experts, generator=generator)[:top_k] for _ in range(tokens)]),
        "expert_weights": torch.rand(tokens, top_k, generator=generator).softmax(-1),
        "trace": trace, "other_trace": trace, "training_trace": trace,
        "prompts": ["def main(", "import os\n"],
        "layer_idx": 0, "expert": 0, "slots": 2,
    }
    paths = {"path/to/mixtral-converted": work / "converted", "path/to/converted": work / "converted",
             "path/to/mixtral-int4": work / "converted-int4", "path/to/Mixtral-8x7B": tiny, "path/to/mixtral": tiny}
    return work, namespace, paths


def _prepared(snippet: str, paths: dict) -> str:
    for placeholder, path in paths.items():  # longest first: "path/to/mixtral" is a prefix of others
        snippet = snippet.replace(f'"{placeholder}"', repr(str(path)))
    snippet = snippet.replace("PlacementPlan.load(...)", "PlacementPlan.load('plan.safetensors')")
    snippet = "".join(f"{code}\n" for key, code in PRELUDES.items() if key in snippet) + snippet
    if not torch.cuda.is_available():
        snippet = "\n".join("pass  # needs CUDA: " + line if NEEDS_CUDA.search(line) else line
                            for line in snippet.splitlines())
    return snippet


def test_the_readme_has_snippets_and_every_exception_is_named():
    found = snippets()
    assert len(found) >= 8
    for start in NOT_HERE:
        assert any(snippet.startswith(start) for snippet in found), f"NOT_HERE names a snippet the README lost: {start}"


@pytest.mark.parametrize("index", range(len(snippets())))
def test_readme_snippet_runs(index, stand_ins, monkeypatch):
    snippet = snippets()[index]
    if _reason(snippet):
        pytest.skip(_reason(snippet))
    work, namespace, paths = stand_ins
    monkeypatch.chdir(work)
    monkeypatch.setenv("MOE_INFER_CACHE", str(work / "cache"))
    from moe_infer.distributed.placement import PlacementPlan
    from transformers import AutoModelForCausalLM

    scope = {"torch": torch, "moe_infer": moe_infer, "AutoModelForCausalLM": AutoModelForCausalLM,
             "PlacementPlan": PlacementPlan, **namespace}
    # `model` where a snippet uses one it did not make (a wrapped model, as "model: wrapped" says)
    supplied = scope["model"] = moe_infer.wrap(moe_infer.assets.load_model("tiny-mixtral")[0])
    try:
        exec(compile(_prepared(snippet, paths), f"README.md python snippet {index}", "exec"), scope)
    finally:  # join the cache threads of every model the snippet left wrapped
        for model in {id(m): m for m in (supplied, scope.get("model"), scope.get("in_memory"))
                      if m is not None}.values():
            if moe_infer.is_wrapped(model):
                moe_infer.executor(model).close()


def readme_commands() -> list[str]:
    """Every `moe-infer ...` line of the README's bash snippets (continuations joined, comments and
    `[optional ...]` parts dropped)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line.startswith("moe-infer "):
                commands.append(re.sub(r"\s*\[[^\]]*\]", "", line))
    return commands


def test_every_readme_command_parses():
    """The commands and flags the README shows exist, with values the parser accepts (running them is
    what the other tests of each command do)."""
    import shlex

    from moe_infer.benchmarks import BENCHMARKS
    from moe_infer.cli import build_parser

    commands = readme_commands()
    assert len(commands) >= 20
    for command in commands:
        argv = shlex.split(command)[1:]
        if "--help" in argv:
            continue
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exit_info:
            pytest.fail(f"README command does not parse (exit {exit_info.code}): {command}")
        if args.command == "bench":
            assert args.name in BENCHMARKS, command
