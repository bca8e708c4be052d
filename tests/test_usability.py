"""What a new user meets first: a cheap `import moe_infer`, `--help` that answers without loading
torch, help that shows defaults and explains the MoEConfig flags, errors of the command that got
them, and outputs with the usual file mode."""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moe_infer
from moe_infer.benchmarks import BENCHMARKS
from moe_infer.cli import build_parser, main
from moe_infer.config import MoEConfig

REPO = Path(__file__).resolve().parents[1]
PACKAGE_FOLDERS = ["moe_infer", "cache", "experts", "kernels", "predictors", "routing"]
INTERNAL_REFERENCES = re.compile(r"DESIGN|\bissues? \d|shared/")


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO.parent)


def test_import_is_lazy_and_subpackages_are_attributes():
    result = run_python(
        "import sys, moe_infer\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, sorted(sys.modules)\n"
        "assert moe_infer.MoEConfig().cache_policy == 'lru'\n"
        "assert 'torch' not in sys.modules\n"
        "print(moe_infer.predictors.train.__module__, moe_infer.assets.names(), moe_infer.cache.__name__)\n"
        "import moe_infer.executor\n"
        "assert callable(moe_infer.executor) and moe_infer.executor.__module__ == 'moe_infer.api'\n"
        "from moe_infer import executor, placement, wrap\n"
        "assert executor is moe_infer.api.executor and placement.__name__ == 'moe_infer.distributed.placement'\n"
        "try:\n    moe_infer.no_such_name\nexcept AttributeError as err:\n    print(err)\n")
    assert result.returncode == 0, result.stderr
    assert "tiny-mixtral" in result.stdout and "moe_infer.cache" in result.stdout
    assert "has no attribute 'no_such_name'" in result.stdout


def test_help_and_argument_errors_load_neither_torch_nor_transformers():
    argvs = [["--help"], ["demo", "--help"], ["generate", "--help"], ["serve", "--help"], ["bench", "--help"],
             ["predictor", "train", "--help"], ["demo", "--bogus-flag"], ["generate", "--cache-policy", "x"],
             ["frobnicate"]]
    result = run_python(
        "import sys\nfrom moe_infer.cli import main\n"
        f"for argv in {argvs!r}:\n"
        "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
        "heavy = [name for name in ('torch', 'transformers', 'numpy') if name in sys.modules]\n"
        "print('HEAVY', heavy, file=sys.stderr)\n")
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stderr


def test_an_unknown_flag_gets_the_usage_of_its_command():
    result = subprocess.run([sys.executable, "-m", "moe_infer", "demo", "--bogus-flag"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith("usage: moe-infer demo ")
    assert result.stderr.strip().endswith("moe-infer demo: error: unrecognized arguments: --bogus-flag")
    nested = subprocess.run([sys.executable, "-m", "moe_infer", "predictor", "eval", "--predictor", "p", "--trace",
                             "t", "--frobnicate"], capture_output=True, text=True, timeout=60)
    assert nested.returncode == 2 and nested.stderr.startswith("usage: moe-infer predictor eval ")


def _help(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse's line breaks are not content


def test_help_shows_defaults(capsys):
    assert "tokens generated per prompt (default: 32)" in _help(capsys, ["generate"])
    demo = _help(capsys, ["demo"])
    assert "(default: 64)" in demo and "(default: 'tiny-mixtral')" in demo
    assert "--layers LAYERS (default: 32)" in _help(capsys, ["bench", "offload"])  # an option without help text


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_moe_config_flags_come_with_help_and_choices_from_the_fields(capsys, command):
    text = _help(capsys, [command])
    import dataclasses

    for spec in dataclasses.fields(MoEConfig):
        if not spec.metadata.get("flag", True):
            assert f"--{spec.name.replace('_', '-')}" not in text
            continue
        assert " ".join(spec.metadata["help"].split()) in text, spec.name
        if "choices" in spec.metadata:
            assert f"{{{','.join(spec.metadata['choices'])}}}" in text, spec.name
    assert "--cache-policy {lru,lfu,expertflow,static} which expert a full tier evicts" in text
    args = build_parser().parse_args([command, *(["--model", "m"] if command == "generate" else ["m"]),
                                      "--cpu-memory", "2MiB", "--parallel", "2", "--token-scheduling"])
    from moe_infer.config import config_from_arguments

    config = config_from_arguments(args)
    assert (config.cpu_memory, config.parallel, config.token_scheduling, config.cache_policy) == (2 * 2**20, 2, True,
                                                                                                  "lru")


def _commands(parser: argparse.ArgumentParser, prefix=()):
    yield prefix
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*prefix, name))


def test_help_and_messages_cite_no_internal_documents(capsys):
    commands = [c for c in _commands(build_parser()) if c != ("bench",)]
    commands += [("bench",), *(("bench", name) for name in BENCHMARKS)]
    for command in commands:
        text = _help(capsys, list(command))
        assert not INTERNAL_REFERENCES.search(text), (command, INTERNAL_REFERENCES.search(text))
    # every string of the package other than a docstring: error messages, help, printed output
    for folder in PACKAGE_FOLDERS:
        for path in (REPO / folder).rglob("*.py"):
            tree = ast.parse(path.read_text())
            docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                          if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                          and node.body and isinstance(node.body[0], ast.Expr)}
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                    assert not INTERNAL_REFERENCES.search(node.value), f"{path}:{node.lineno}: {node.value[:80]}"


def test_error_lines_keep_their_closing_quote(capsys):
    assert main(["bench", "kernels", "--smoke", "--max-tokens", "bogus"]) == 2
    assert capsys.readouterr().err.strip().endswith("got 'bogus'")
    with pytest.raises(ValueError) as error:
        MoEConfig(cache_policy="bogus")
    message = str(error.value)
    assert message.endswith("'static'")
    from moe_infer.cli import USER_ERRORS

    assert isinstance(error.value, USER_ERRORS)  # printed as it is by main(), closing quote included


def test_demo_refuses_a_model_without_moe_blocks_before_running_it(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    result = subprocess.run([sys.executable, "-m", "moe_infer", "demo", "--model", str(tmp_path / "llama"),
                             "--new-tokens", "2"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("moe-infer demo: error: LlamaForCausalLM has no sparse MoE block")


def test_demo_finds_the_predictor_beside_a_model_directory(tmp_path):
    from moe_infer.demo import predictor_beside

    shipped = moe_infer.assets.predictor_path("tiny-mixtral")
    assert predictor_beside("tiny-mixtral") == shipped
    directory = tmp_path / "model"
    directory.mkdir()
    assert predictor_beside(str(directory)) is None
    (directory / moe_infer.assets.PREDICTOR_FILE).write_bytes(shipped.read_bytes())
    assert predictor_beside(str(directory)) == directory / moe_infer.assets.PREDICTOR_FILE


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_saved_files_get_the_mode_open_gives(tmp_path):
    from moe_infer.traces.trace import Trace

    n, layers, k = 6, 2, 2
    expert_ids = torch.stack([torch.randperm(4)[:k] for _ in range(n * layers)]).reshape(n, layers, k).int()
    trace = Trace.from_arrays(expert_ids=expert_ids,
                              expert_weights=torch.rand(n, layers, k), seq_ids=torch.zeros(n, dtype=torch.int32),
                              positions=torch.arange(n, dtype=torch.int32),
                              token_ids=torch.randint(0, 256, (n,), dtype=torch.int32), model="m", family="mixtral",
                              num_experts=4, moe_layers=[0, 1], source="test")
    trace.save(tmp_path / "trace.safetensors")
    predictor = moe_infer.predictors.train("pregate", trace, epochs=1)
    predictor.save(tmp_path / "pregate.safetensors")
    with open(tmp_path / "plain.txt", "w") as file:
        file.write(json.dumps({}))
    expected = os.stat(tmp_path / "plain.txt").st_mode & 0o777
    assert expected == 0o666 & ~_umask()
    for name in ("trace.safetensors", "pregate.safetensors"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == expected, name


@pytest.mark.parametrize("max_tokens", [None, 40])
def test_profile_progress_total_is_the_tokens_recorded(tmp_path, max_tokens):
    from moe_infer.traces.profiler import ProfileOptions, _expected_tokens, record_trace

    model, tokenizer = moe_infer.assets.load_model("tiny-mixtral")
    files = []
    for name, text in (("a.py", "def main():\n    return 1\n" * 3), ("b.py", "import os\nprint(os.sep)\n")):
        (tmp_path / name).write_text(text)
        files.append(str(tmp_path / name))
    options = ProfileOptions(seq_len=16, batch_size=2, max_tokens=max_tokens, progress=False)
    expected = _expected_tokens(files, None, tokenizer, options)
    result = record_trace(model, tmp_path / "trace.safetensors", texts=files, tokenizer=tokenizer, options=options)
    assert result.tokens == expected
    assert expected == (40 if max_tokens else sum(len(tokenizer(open(f).read())["input_ids"]) for f in files))


def test_generate_under_a_budget_prints_hit_rate_and_bytes_moved():
    result = subprocess.run([sys.executable, "-m", "moe_infer", "generate", "--model", "tiny-mixtral", "--prompt",
                             "def main(", "--max-new-tokens", "6", "--cpu-memory", "3MiB"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    match = re.search(r"^expert cache, cpu tier of 3.00 MiB: hit rate ([0-9.]+) \((\d+) hits, (\d+) misses\), "
                      r"([0-9.]+) MiB moved", result.stdout, re.M)
    assert match, result.stdout
    rate, hits, misses, moved = float(match[1]), int(match[2]), int(match[3]), float(match[4])
    assert misses > 0 and moved > 0 and abs(rate - hits / (hits + misses)) < 1e-3


def test_simulate_with_a_predictor_computes_its_predictions_once(tmp_path, capsys):
    from moe_infer.traces.profiler import record_trace

    model, tokenizer = moe_infer.assets.load_model("tiny-mixtral")
    (tmp_path / "a.py").write_text("def main():\n    return [i * i for i in range(10)]\n" * 4)
    record_trace(model, tmp_path / "trace.safetensors", texts=[str(tmp_path / "a.py")], tokenizer=tokenizer,
                 model_name="tiny-mixtral", seq_len=64, progress=False)
    predictor = moe_infer.assets.predictor_path("tiny-mixtral")
    assert main(["simulate", "--trace", str(tmp_path / "trace.safetensors"), "--policy", "lru,expertflow",
                 "--capacity", "2,4", "--predictor", str(predictor)]) == 0
    captured = capsys.readouterr()
    notes = [line for line in captured.err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "loading tiny-mixtral once" in notes[0]
    assert captured.out.count("expertflow") >= 2 and captured.out.count("lru") >= 2


def test_scripts_write_results_under_the_current_directory(tmp_path):
    committed = REPO / "bench" / "results" / "parallel_scale_table.md"
    before = committed.stat().st_mtime_ns if committed.exists() else None
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "parallel_scale_table.py")], capture_output=True,
                            text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "bench" / "results" / "parallel_scale_table.md").is_file()
    assert (committed.stat().st_mtime_ns if committed.exists() else None) == before
    for script in ("bench_convert.py", "bench_checksums.py", "bench_parallel.py", "parallel_scale_table.py"):
        assert "__file__), \"..\", \"bench\"" not in (REPO / "scripts" / script).read_text(), script


def test_the_demo_says_in_one_line_why_ours_is_slower_exactly_when_it_is():
    from moe_infer.demo import BudgetRun, DemoResult, format_report

    def report(ours_tokens_per_s: float) -> str:
        runs = [BudgetRun("ours", {"cache_policy": "expertflow"}, ours_tokens_per_s, 0.91, 2**20, 0.0, 0, True,
                          predictor_seconds=0.5, seconds=1.0),
                BudgetRun("plain LRU", {"cache_policy": "lru"}, 10.0, 0.66, 2**20, 0.004, 0, True, seconds=0.8)]
        result = DemoResult("tiny-mixtral", "cpu", 0.0, "text", 8, 10.0, 10.0, {"layers": {}}, runs, 2**20, 2**21)
        return format_report(result)

    slower = [line for line in report(5.0).splitlines() if "ours is slower here" in line]
    assert len(slower) == 1 and "predicting took 50% of the decode time (0.50 s)" in slower[0]
    assert "plain LRU waited 0.004 s on all its misses" in slower[0] and "0.20 s longer in all" in slower[0]
    assert re.search(r"^  ours +5\.0 +0\.910 +1\.0 +0\.000 +0 +50\.0  yes$", report(5.0), re.M)
    assert "ours is slower" not in report(12.0)
