"""The profiler records what the model routes: checked against routing captured without moe_infer.

Every reference here is computed independently of the profiler: windows are cut by slicing the
file's bytes, routing comes from the *unwrapped* model's `output_router_logits` and the family's
routing rule re-applied in the test, generated tokens from `model.generate`.
"""

import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, MixtralConfig, MixtralForCausalLM

import moe_infer
from moe_infer.models import cache_argument, output_cache
from moe_infer.traces.profiler import ProfileOptions, record_trace
from moe_infer.traces.trace import Trace

FP16 = dict(rtol=1e-3, atol=1e-3)  # values stored as float16 in the trace
BASE = dict(vocab_size=256, hidden_size=64, num_attention_heads=4, max_position_embeddings=256,
            pad_token_id=0, bos_token_id=None, eos_token_id=None, tie_word_embeddings=False)
TEXTS = {
    "a.txt": "def main():\n    return sum(range(10))  # café → ok\n" * 2,
    "b.txt": "import os\nprint(os.getcwd())\n",
    "c.txt": "x",  # a one-token sequence
}


def tiny_mixtral(seed=0):
    torch.manual_seed(seed)
    config = MixtralConfig(**BASE, intermediate_size=64, num_hidden_layers=3, num_key_value_heads=2,
                           num_local_experts=8, num_experts_per_tok=2)
    return MixtralForCausalLM(config).eval()


def tiny_deepseek(seed=0):
    torch.manual_seed(seed)
    config = DeepseekV3Config(**BASE, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                              num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
                              topk_group=1, n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                              first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
                              qk_nope_head_dim=8, v_head_dim=16)
    model = DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():  # zero at init: a bias the routing ignored would go unnoticed
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn(buffer.shape) * 0.05)
    return model


@pytest.fixture
def text_files(tmp_path):
    paths = []
    for name, text in TEXTS.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        paths.append(tmp_path / name)
    return paths


def reference_windows(paths, seq_len):
    """Byte windows of each file, cut by plain slicing."""
    windows = []
    for path in paths:
        data = list(path.read_bytes())
        windows += [data[i:i + seq_len] for i in range(0, len(data), seq_len)]
    return windows


def pad(windows, side):
    width = max(map(len, windows))
    ids = torch.zeros(len(windows), width, dtype=torch.long)
    mask = torch.zeros(len(windows), width, dtype=torch.long)
    for row, window in enumerate(windows):
        span = slice(0, len(window)) if side == "right" else slice(width - len(window), width)
        ids[row, span] = torch.tensor(window)
        mask[row, span] = 1
    return ids, mask


def mixtral_routing(logits, top_k):
    """Mixtral's rule: softmax (fp32) -> top-k -> renormalise."""
    probs = logits.float().softmax(-1)
    weights, ids = probs.topk(top_k, dim=-1)
    return ids, weights / weights.sum(-1, keepdim=True)


def deepseek_v3_routing(logits, router, config):
    """DeepSeek-V3's rule: sigmoid, bias for the choice only, best groups, top-k, normalise, scale."""
    scores = logits.float().sigmoid()
    choice = scores + router.e_score_correction_bias
    groups = choice.view(len(choice), config.n_group, -1)
    group_scores = groups.topk(2, dim=-1).values.sum(-1)
    keep_groups = group_scores.topk(config.topk_group, dim=-1).indices
    group_mask = torch.zeros_like(group_scores).scatter_(1, keep_groups, 1.0).bool()
    choice = choice.masked_fill(~group_mask.repeat_interleave(groups.shape[-1], 1), float("-inf"))
    ids = choice.topk(config.num_experts_per_tok, dim=-1).indices
    weights = scores.gather(1, ids)
    weights = weights / (weights.sum(-1, keepdim=True) + 1e-20) * config.routed_scaling_factor
    return ids, weights


def sort_per_token(ids, weights):
    ids, order = ids.long().sort(-1)
    return ids, weights.gather(-1, order)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_prefill_trace_matches_routing_of_the_unwrapped_model(tmp_path, text_files, family):
    model = tiny_mixtral() if family == "mixtral" else tiny_deepseek()
    seq_len, batch_size = 24, 3
    result = record_trace(model, tmp_path / "trace.safetensors", texts=text_files, seq_len=seq_len,
                          batch_size=batch_size, router_logits=True, progress=False)
    assert not moe_infer.is_wrapped(model)  # wrapped for the run only
    trace = Trace.load(result.path)

    windows = reference_windows(text_files, seq_len)
    assert trace.num_sequences == len(windows) == result.sequences
    assert trace.token_ids.tolist() == [token for window in windows for token in window]
    assert trace.positions.tolist() == [p for window in windows for p in range(len(window))]
    assert trace.seq_ids.tolist() == [s for s, window in enumerate(windows) for _ in window]
    moe_blocks = [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]
    assert list(trace.moe_layers) == moe_blocks == ([0, 1, 2] if family == "mixtral" else [1, 2])
    assert trace.family == ("mixtral" if family == "mixtral" else "deepseek-v3")
    assert (trace.num_experts, trace.top_k) == (8, 2)

    # the same right-padded batches through the unwrapped model, routing re-derived from its logits
    logits_per_layer = [[] for _ in moe_blocks]
    with torch.no_grad():
        for start in range(0, len(windows), batch_size):
            ids, mask = pad(windows[start:start + batch_size], "right")
            out = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
            real = mask.reshape(-1).bool()
            for layer_logits, logits in zip(logits_per_layer, out.router_logits):
                layer_logits.append(logits[real])
    for index, layer_idx in enumerate(moe_blocks):
        logits = torch.cat(logits_per_layer[index])  # [N, E]
        if family == "mixtral":
            ids, weights = mixtral_routing(logits, 2)
        else:
            ids, weights = deepseek_v3_routing(logits, model.model.layers[layer_idx].mlp.gate, model.config)
        got_ids, got_weights = sort_per_token(trace.expert_ids[:, index], trace.expert_weights[:, index])
        want_ids, want_weights = sort_per_token(ids, weights)
        torch.testing.assert_close(got_ids, want_ids, rtol=0, atol=0)
        torch.testing.assert_close(got_weights, want_weights.float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(trace.router_logits[:, index].float(), logits.float(), **FP16)


def expected_generation(model, prompts, new_tokens):
    """Per prompt: prompt ids + greedy continuation from `generate`, cut after the first EOS."""
    ids, mask = pad(prompts, "left")
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    eos = model.generation_config.eos_token_id
    sequences = []
    for prompt, row in zip(prompts, out[:, ids.shape[1]:].tolist()):
        if eos is not None and eos in row:
            row = row[:row.index(eos) + 1]
        sequences.append(prompt + row)
    return sequences


PROMPTS = ["def f(x):", "import", "a", "class Tree:\n    def"]


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_generate_trace_holds_prompt_and_greedy_tokens_in_order(tmp_path, family):
    model = tiny_mixtral(1) if family == "mixtral" else tiny_deepseek(1)
    new_tokens = 6
    prompts = [list(p.encode()) for p in PROMPTS]
    want = expected_generation(model, prompts, new_tokens)
    result = record_trace(model, tmp_path / "gen.safetensors", prompts=PROMPTS, mode="generate",
                          new_tokens=new_tokens, batch_size=len(PROMPTS), router_logits=True, progress=False)
    trace = Trace.load(result.path)
    assert [trace.token_ids[span].tolist() for _, span in trace.sequences()] == want
    assert [trace.positions[span].tolist() for _, span in trace.sequences()] == [list(range(len(s))) for s in want]

    # what the decode loop recorded for each token is that token's routing: the same sequence
    # run alone (no padding, no cache) through the unwrapped model gives the same router logits
    with torch.no_grad():
        for seq, (_, span) in enumerate(trace.sequences()):
            out = model(torch.tensor([want[seq]]), output_router_logits=True)
            logits = torch.stack(list(out.router_logits), 1)  # [n, L, E]
            torch.testing.assert_close(trace.router_logits[span].float(), logits, rtol=1e-3, atol=2e-3)


def test_generate_stops_a_sequence_after_its_eos(tmp_path):
    model = tiny_mixtral(2)
    prompts = [list(p.encode()) for p in PROMPTS]
    free_run = expected_generation(model, prompts, 5)
    eos = free_run[0][len(prompts[0]) + 1]  # the second token generated for prompt 0
    model.generation_config.eos_token_id = eos
    want = expected_generation(model, prompts, 5)
    assert len(want[0]) == len(prompts[0]) + 2  # the test's premise: prompt 0 stops early
    result = record_trace(model, tmp_path / "gen.safetensors", prompts=PROMPTS, mode="generate", new_tokens=5,
                          batch_size=len(PROMPTS), progress=False)
    trace = Trace.load(result.path)
    assert [trace.token_ids[span].tolist() for _, span in trace.sequences()] == want


def test_chunked_streaming_writes_the_same_file_as_one_pass(tmp_path, text_files):
    model = moe_infer.wrap(tiny_mixtral())
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    options = ProfileOptions(seq_len=16, batch_size=2, router_logits=True, features=("embedding", "moe_input:1"),
                             progress=False)
    small = record_trace(model, out_dir / "small.safetensors", texts=text_files, options=options, chunk_tokens=7)
    whole = record_trace(model, out_dir / "whole.safetensors", texts=text_files, options=options,
                         chunk_tokens=10**9)
    assert small.parts > 5 and whole.parts == 1
    assert small.path.read_bytes() == whole.path.read_bytes()
    assert sorted(p.name for p in out_dir.iterdir()) == ["small.safetensors", "whole.safetensors"]  # no parts
    assert moe_infer.is_wrapped(model)  # a model the caller wrapped stays wrapped ...
    assert all(layer.routing_observers == [] for layer in moe_infer.executor(model).layers)  # ... without observers

    a, b = Trace.load(small.path), Trace.load(whole.path)
    assert a.metadata() == b.metadata()
    for name in ("expert_ids", "expert_weights", "seq_ids", "positions", "token_ids", "router_logits", "features"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name

    capped = record_trace(model, out_dir / "capped.safetensors", texts=text_files, options=options,
                          chunk_tokens=7, max_tokens=50)
    c = Trace.load(capped.path)
    assert c.num_tokens == capped.tokens == 50
    for name in ("expert_ids", "token_ids", "seq_ids", "positions"):
        assert torch.equal(getattr(c, name), getattr(a, name)[:50]), name
    # the capped run cuts its last window short (no forward runs past the budget), and on several
    # CPU threads a matmul's rounding depends on its shape: hidden-state features agree to fp16 rounding, not bit for bit
    torch.testing.assert_close(c.features, a.features[:50], rtol=2e-3, atol=2e-3)


def test_features_are_embeddings_and_moe_inputs(tmp_path, text_files):
    model = tiny_mixtral()
    hidden_size = model.config.hidden_size
    result = record_trace(model, tmp_path / "f.safetensors", texts=text_files[:1], seq_len=32,
                          features=("moe_input:2", "embedding"), progress=False)
    trace = Trace.load(result.path)
    assert trace.feature_names == {"moe_input:2": (0, hidden_size), "embedding": (hidden_size, 2 * hidden_size)}
    assert trace.features.shape == (trace.num_tokens, 2 * hidden_size)
    with torch.no_grad():
        embedding = model.get_input_embeddings()(trace.token_ids.long())
    torch.testing.assert_close(trace.features[:, hidden_size:], embedding.half(), rtol=0, atol=0)

    # the input of the unwrapped MoE block of layer 2, captured with a forward pre-hook
    captured = []
    hook = model.model.layers[2].mlp.register_forward_pre_hook(lambda _, args: captured.append(args[0]))
    try:
        with torch.no_grad():
            for _, span in trace.sequences():
                model(trace.token_ids[span][None].long())
    finally:
        hook.remove()
    moe_input = torch.cat([h.reshape(-1, hidden_size) for h in captured])
    torch.testing.assert_close(trace.features[:, :hidden_size].float(), moe_input, **FP16)


@pytest.mark.parametrize("fields, message", [
    (dict(mode="beam"), "mode='beam'"),
    (dict(features=("hidden",)), "feature 'hidden'"),
    (dict(features=("embedding", "embedding")), "twice"),
    (dict(chunk_tokens=0), "chunk_tokens must be >= 1"),
])
def test_bad_options_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        ProfileOptions(**fields)


def test_feature_of_a_dense_layer_is_refused_and_nothing_is_left(tmp_path, text_files):
    model = tiny_deepseek()
    with pytest.raises(ValueError, match="layer 0 is not an MoE layer"):
        record_trace(model, tmp_path / "t.safetensors", texts=text_files, features=("moe_input:0",), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(TEXTS)
    assert not moe_infer.is_wrapped(model)


REPO = Path(__file__).resolve().parents[1]


def run_cli(*args):
    # from the repository root, so `-m moe_infer` is this checkout's package
    return subprocess.run([sys.executable, "-m", "moe_infer", *args], capture_output=True, text=True, timeout=300,
                          cwd=REPO)


def test_cli_profile_on_a_tokenizer_less_model_directory(tmp_path, text_files):
    model_dir = tmp_path / "model"
    tiny_mixtral().save_pretrained(model_dir)
    out = tmp_path / "trace.safetensors"
    result = run_cli("profile", "--model", str(model_dir), "--text", *map(str, text_files),
                     "--out", str(out), "--seq-len", "16", "--batch-size", "2", "--chunk-tokens", "20",
                     "--features", "embedding,moe_input:1", "--router-logits", "--no-progress")
    assert result.returncode == 0, result.stderr
    trace = Trace.load(out)
    assert trace.num_tokens == sum(len(text.encode()) for text in TEXTS.values())
    assert trace.model == str(model_dir) and trace.family == "mixtral"
    assert set(trace.feature_names) == {"embedding", "moe_input:1"}
    assert f"{trace.num_tokens} tokens" in result.stdout


def test_script_reports_a_missing_text_file_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["profile_experts.py", "--model", str(tmp_path), "--text",
                                      str(tmp_path / "missing.txt"), "--out", str(tmp_path / "t.safetensors")])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "scripts" / "profile_experts.py"), run_name="__main__")
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moe-infer profile: error:") and "missing.txt" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_kv_cache_goes_by_the_keyword_the_model_takes():
    """transformers 5.24 renamed forward's `past_key_values` to `cache`; the profiler, scheduler and
    benchmarks pass and read the KV cache by whichever name the installed version uses."""
    class Before(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, use_cache=None):
            return {"past_key_values": past_key_values}

    class After(torch.nn.Module):
        def forward(self, input_ids, cache=None, use_cache=None, **kwargs):
            return {"cache": cache}

    assert cache_argument(Before(), "kv") == {"past_key_values": "kv"}
    assert cache_argument(After(), "kv") == {"cache": "kv"}
    model = tiny_mixtral()
    with torch.no_grad():
        cache = output_cache(model(torch.tensor([[1, 2, 3]]), use_cache=True))
        assert cache.get_seq_length() == 3
        cache = output_cache(model(torch.tensor([[4]]), **cache_argument(model, cache), use_cache=True))
    assert cache.get_seq_length() == 4
