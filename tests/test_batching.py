"""generate_many: results equal one-by-one generation; the expert-aware scheduler batches co-routed
requests; bounded waiting; bad input; the `generate` CLI."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import moe_infer
import moe_infer.assets
import tiny_models
from moe_infer.serving.batching import generate_many
from moe_infer.serving.schedule import expected_experts, partition, simulate_schedule
from moe_infer.serving.signatures import PredictedRouting, RecentRouting
from moe_infer.cli import main
from moe_infer.predictors import train
from moe_infer.traces.profiler import record_trace
from moe_infer.traces.trace import Trace

pytestmark = pytest.mark.usefixtures("single_thread")

TEXTS = ["def main(", "import os\nimport sys\n\n", "The Licensor hereby grants", "class Parser(object):\n    def",
         "Copyright (c) 2001-2024 Python Software Foundation", "for i in range(", ".. note::\n\n   The", "x"]


@pytest.fixture(scope="module")
def shipped():
    model, tokenizer = moe_infer.assets.load_model("tiny-mixtral")
    return model, tokenizer


def one_by_one(model, prompts, max_new_tokens, eos_token_id):
    """Each prompt alone through transformers' own generate (greedy)."""
    out = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                   do_sample=False, eos_token_id=eos_token_id, pad_token_id=0)
        out.append(generated[0, len(prompt):].tolist())
    return out


@pytest.mark.parametrize("scheduler, regroup_threshold", [("expert", 0.0), ("fcfs", 1.0)])
def test_greedy_results_equal_one_by_one_on_the_shipped_model(shipped, scheduler, regroup_threshold):
    model, tokenizer = shipped
    prompts = [tokenizer(t)["input_ids"] for t in TEXTS]
    with tiny_models.wrapped(model):
        # threshold 0: regroup whenever the signatures say so, moving KV caches between micro-batches
        outputs, stats = generate_many(model, prompts, max_batch_size=3, pool_size=6, max_new_tokens=14,
                                       scheduler=scheduler, regroup_threshold=regroup_threshold, return_stats=True)
        expected = one_by_one(model, prompts, 14, model.generation_config.eos_token_id)
    assert outputs == expected
    assert stats.requests == len(prompts) and stats.decode_tokens == sum(len(o) for o in outputs) - len(prompts)
    assert stats.micro_batches >= stats.decode_tokens / 3
    if scheduler == "expert":
        assert stats.regroups > 0 and stats.kv_bytes_moved > 0
    else:
        assert stats.regroups == 0


@pytest.mark.parametrize("name", ["deepseek_v3", "qwen2_moe"])
def test_greedy_results_equal_one_by_one_on_tiny_random_models(tiny_model, name):
    model = tiny_model(name)
    prompts = [tiny_models.token_ids(seed, 1, length)[0].tolist() for seed, length in enumerate([5, 9, 2, 7, 12])]
    with tiny_models.wrapped(model):
        outputs = generate_many(model, prompts, max_batch_size=2, pool_size=4, max_new_tokens=8,
                                scheduler="expert", regroup_threshold=0.0)
        expected = one_by_one(model, prompts, 8, None)
    assert outputs == expected


def test_seeded_sampling_per_request_equals_sampling_alone(shipped):
    model, tokenizer = shipped
    prompts = [tokenizer(t)["input_ids"] for t in TEXTS[:5]]
    options = dict(max_new_tokens=10, do_sample=True, temperature=0.9, top_k=40, top_p=0.95, eos_token_id=None)
    with tiny_models.wrapped(model):
        together = generate_many(model, prompts, max_batch_size=2, seed=[11, 12, 13, 14, 15], scheduler="expert",
                                 regroup_threshold=0.0, **options)
        alone = [generate_many(model, [p], seed=[s], **options)[0] for p, s in zip(prompts, [11, 12, 13, 14, 15])]
        other_seeds = generate_many(model, prompts, max_batch_size=2, seed=100, **options)
    assert together == alone
    assert other_seeds != together  # the seeds matter


def test_string_prompts_come_back_as_text(shipped):
    model, tokenizer = shipped
    with tiny_models.wrapped(model, token_scheduling=True):
        texts, stats = generate_many(model, TEXTS[:3], tokenizer=tokenizer, max_new_tokens=6, eos_token_id=None,
                                     return_stats=True)
    assert stats.scheduler == "expert"  # MoEConfig.token_scheduling picks the expert-aware scheduler
    assert all(isinstance(t, str) and len(t.encode()) == 6 for t in texts)


def test_waiting_is_bounded_and_admission_is_first_come_first_served(shipped):
    model, _ = shipped
    prompts = [[40 + i, 41, 42] for i in range(10)]
    with tiny_models.wrapped(model):
        outputs, stats = generate_many(model, prompts, max_batch_size=2, pool_size=4, max_new_tokens=5,
                                       eos_token_id=None, scheduler="expert", return_stats=True)
    assert all(len(o) == 5 for o in outputs)
    # 4 pooled at a time, every pooled request decodes each round: requests 4.. wait for a slot
    # that frees after at most 4 decode rounds per earlier wave
    assert 0 < stats.max_wait_rounds <= 4 * ((10 - 4 + 3) // 4)


def planted_requests(num_requests=32, length=40, num_layers=4, num_experts=16, top_k=2, clusters=4, seed=0,
                     with_tokens=False):
    """A trace whose sequences each belong to one routing cluster (4 experts per layer), arriving in
    cluster order 0, 1, 2, 3, 0, 1, ...: first come first served mixes the clusters. ``with_tokens``:
    each cluster writes its own 8 token ids (otherwise token ids are unknown), and noise stands for the
    MoE-layer inputs (the ``moe_input`` features the expertflow predictor trains on). The clusters' experts
    are the same for every ``seed`` (a training trace and a test trace share them)."""
    members_rng = np.random.default_rng(0)
    members = [members_rng.permutation(num_experts).reshape(clusters, -1) for _ in range(num_layers)]
    rng = np.random.default_rng(seed)
    ids = np.zeros((num_requests * length, num_layers, top_k), dtype=np.int64)
    for r in range(num_requests):
        for t in range(length):
            for l in range(num_layers):
                ids[r * length + t, l] = rng.choice(members[l][r % clusters], top_k, replace=False)
    n = len(ids)
    cluster_of_token = np.repeat(np.arange(num_requests) % clusters, length)
    tokens = 8 * cluster_of_token + rng.integers(0, 8, n)
    features = dict(features=rng.standard_normal((n, 4 * num_layers)).astype(np.float32),
                    feature_names={f"moe_input:{l}": [4 * l, 4 * l + 4] for l in range(num_layers)})
    return Trace.from_arrays(expert_ids=ids, expert_weights=np.full(ids.shape, 0.5),
                             seq_ids=np.repeat(np.arange(num_requests), length), positions=np.tile(np.arange(length), num_requests),
                             token_ids=tokens if with_tokens else np.full(n, -1), num_experts=num_experts,
                             moe_layers=list(range(num_layers)), **(features if with_tokens else {}))


def test_scheduler_activates_clearly_fewer_experts_than_fcfs_on_planted_clusters():
    trace = planted_requests()
    options = dict(max_batch_size=4, pool_size=16, prompt_tokens=4)
    expert = simulate_schedule(trace, scheduler="expert", **options)
    fcfs = simulate_schedule(trace, scheduler="fcfs", **options)
    assert expert["micro_batches"] == fcfs["micro_batches"]
    # a cluster-pure micro-batch of 4 uses at most the cluster's 4 experts per layer; a mixed one ~8
    assert expert["distinct_experts_per_micro_batch"] <= 4.0
    assert fcfs["distinct_experts_per_micro_batch"] > 6.0
    # regrouping considered every 4th round only: fewer moves, clusters still found
    sparse = simulate_schedule(trace, scheduler="expert", regroup_interval=4, **options)
    assert sparse["regroups"] <= expert["regroups"] and sparse["distinct_experts_per_micro_batch"] <= 4.5


def test_partition_groups_requests_of_one_cluster():
    rng = np.random.default_rng(0)
    centers = rng.random((3, 2, 12)) < 0.25  # 3 clusters of routing paths, [L=2, E=12]
    signatures = np.stack([0.9 * centers[i % 3] + 0.05 for i in range(9)]).astype(float)  # [9, 2, 12]
    groups = partition(signatures, 3)
    assert sorted(sorted(g) for g in groups) == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]
    assert expected_experts(signatures[[0, 3, 6]]) < expected_experts(signatures[[0, 1, 2]])


def test_recent_routing_weights_the_last_tokens_most():
    source = RecentRouting(num_layers=1, num_experts=4, decay=0.5)

    class Routing:
        def __init__(self, ids):
            self.expert_ids = torch.tensor(ids)

    source.observe([7, 7], 0, None, Routing([[0, 1], [1, 2]]))  # request 7: two prompt tokens
    np.testing.assert_allclose(source.signature(7)[0], [0.25, 0.75, 0.5, 0.0])
    source.observe([7], 0, None, Routing([[3, 2]]))
    np.testing.assert_allclose(source.signature(7)[0], [0.125, 0.375, 0.75, 0.5])
    source.forget(7)
    assert not source.signature(7).any()


def test_bad_input_is_refused(shipped):
    model, _ = shipped
    with pytest.raises(ValueError, match="needs a wrapped model"):
        generate_many(model, [[1, 2]])
    with tiny_models.wrapped(model):
        with pytest.raises(ValueError, match="prompt 1: expected a non-empty list of token ids"):
            generate_many(model, [[1, 2], []])
        with pytest.raises(ValueError, match=r"prompt 0: expected a non-empty list of token ids in \[0, 257\)"):
            generate_many(model, [[1, 999]])
        with pytest.raises(ValueError, match="scheduler='fast'"):
            generate_many(model, [[1, 2]], scheduler="fast")
        with pytest.raises(ValueError, match="max_batch_size=0"):
            generate_many(model, [[1, 2]], max_batch_size=0)
        with pytest.raises(ValueError, match=r"`temperature` \(=0\) has to be a strictly positive"):  # transformers'
            generate_many(model, [[1, 2]], do_sample=True, temperature=0)
        with pytest.raises(ValueError, match="2 seeds for 1 prompts"):
            generate_many(model, [[1, 2]], seed=[1, 2])
        with pytest.raises(ValueError, match="decoding mode 'beam_search' is not supported"):
            generate_many(model, [[1, 2]], num_beams=2)
        with pytest.raises(TypeError, match="unexpected keyword argument.*'beam_width': not GenerationConfig fields"):
            generate_many(model, [[1, 2]], beam_width=2)


@pytest.mark.parametrize("name, layer", [("gpt_oss", "DynamicSlidingWindowLayer"), ("qwen3_next", "LinearAttentionLayer")])
def test_models_with_other_cache_layers_are_refused_before_any_work(tiny_model, name, layer):
    model = tiny_model(name)
    with tiny_models.wrapped(model):
        ex = moe_infer.executor(model)
        with pytest.raises(ValueError, match=f"full-attention DynamicLayer layers; this model's cache has {layer}"):
            generate_many(model, [[5, 6, 7]], max_new_tokens=2)
        assert ex.stats()["calls"] == 0


def test_cli_generate_from_a_prompts_file(tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in TEXTS[:4]))
    assert main(["generate", "--model", "tiny-mixtral", "--prompts", str(prompts), "--prompt", "import",
                 "--max-new-tokens", "4", "--max-batch-size", "2", "--token-scheduling", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.count("] '") == 5 and "expert scheduler" in out and "distinct experts per micro-batch" in out
    with pytest.raises(SystemExit) as exit_info:  # argparse checks the choices MoEConfig declares
        main(["generate", "--model", "tiny-mixtral", "--prompt", "x", "--cache-policy", "fifo"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'fifo' (choose from 'lru', 'lfu', 'expertflow', 'static')" in capsys.readouterr().err


def test_predicted_next_token_scores_drive_the_replay():
    trace = planted_requests(num_requests=16, length=20)
    options = dict(max_batch_size=4, pool_size=8, prompt_tokens=2, scheduler="expert")
    true_scores = np.zeros((trace.num_tokens, trace.num_layers, trace.num_experts), dtype=np.float32)
    np.put_along_axis(true_scores, trace.expert_ids.numpy().astype(np.int64), 5.0, axis=2)
    perfect = simulate_schedule(trace, next_token_scores=true_scores, **options)
    assert perfect == simulate_schedule(trace, lookahead=True, **options)
    noise = np.random.default_rng(0).random(true_scores.shape).astype(np.float32)
    assert simulate_schedule(trace, next_token_scores=noise, **options)["distinct_experts_per_micro_batch"] > \
        perfect["distinct_experts_per_micro_batch"]
    with pytest.raises(ValueError, match="next_token_scores must be"):
        simulate_schedule(trace, next_token_scores=true_scores[:, :2], **options)


@pytest.mark.parametrize("kind", ["pregate", "expertflow"])
def test_a_predictor_backed_source_recovers_the_planted_clusters(kind):
    # trained on other requests of the same clusters; at replay it sees each request's token ids
    # (and, expertflow, its previous token's routing), per request
    predictor = train(kind, planted_requests(seed=1, with_tokens=True), window=4)
    trace = planted_requests(seed=2, with_tokens=True)
    options = dict(max_batch_size=4, pool_size=16, prompt_tokens=4)
    predicted = simulate_schedule(trace, scheduler="expert", signatures=PredictedRouting(predictor), **options)
    fcfs = simulate_schedule(trace, scheduler="fcfs", **options)
    assert predicted["micro_batches"] == fcfs["micro_batches"]
    assert predicted["distinct_experts_per_micro_batch"] <= 4.0 < 6.0 < fcfs["distinct_experts_per_micro_batch"]
    # per request: one request's tokens and routing never leak into another's signature
    source, alone = PredictedRouting(predictor), PredictedRouting(predictor)
    source.extend(0, [0, 1, 2])  # cluster 0 tokens
    source.extend(1, [8, 9])  # cluster 1 tokens
    alone.extend(1, [8, 9])
    for layer in range(trace.num_layers):  # one forward pass of a micro-batch of requests 0 and 1
        source.observe([0, 0, 1], layer, None, SimpleNamespace(expert_ids=torch.tensor([[0, 1], [2, 3], [4, 5]])))
        alone.observe([1], layer, None, SimpleNamespace(expert_ids=torch.tensor([[4, 5]])))
    np.testing.assert_allclose(source.signature(1), alone.signature(1), rtol=1e-5)  # batched vs alone
    assert not np.allclose(source.signature(0), source.signature(1))
    source.forget(0)
    assert not source.signature(0).any()
    with pytest.raises(ValueError, match="this predictor was trained for num_experts=16"):
        simulate_schedule(planted_requests(num_requests=4, num_experts=8), scheduler="expert",
                          signatures=PredictedRouting(predictor), **options)
    with pytest.raises(ValueError, match="routes a token before the first MoE layer"):
        PredictedRouting(train("markov", trace))


@pytest.fixture(scope="module")
def shipped_pregate(shipped, tmp_path_factory):
    model, tokenizer = shipped
    path = tmp_path_factory.mktemp("pregate") / "trace.safetensors"
    record_trace(model, path, prompts=TEXTS, tokenizer=tokenizer, model_name="tiny-mixtral")
    predictor = train("pregate", Trace.load(path), epochs=2)
    predictor.save(path.with_name("pregate.safetensors"))
    expertflow = train("expertflow", Trace.load(path), epochs=1, model=model)
    return predictor, path.with_name("pregate.safetensors"), expertflow


def test_predictor_backed_scheduler_results_equal_one_by_one(shipped, shipped_pregate):
    model, tokenizer = shipped
    predictor, saved, expertflow = shipped_pregate
    prompts = [tokenizer(t)["input_ids"] for t in TEXTS]
    with tiny_models.wrapped(model):
        outputs, stats = generate_many(model, prompts, max_batch_size=3, pool_size=6, max_new_tokens=10,
                                       scheduler="expert", predictor=predictor, regroup_threshold=0.0,
                                       return_stats=True)
        expected = one_by_one(model, prompts, 10, model.generation_config.eos_token_id)
        from_file = generate_many(model, prompts[:3], max_batch_size=2, max_new_tokens=4, predictor=str(saved),
                                  scheduler="expert")
        path_predictor = generate_many(model, prompts, max_batch_size=3, pool_size=6, max_new_tokens=10,
                                       scheduler="expert", predictor=expertflow, regroup_threshold=0.0)
        with pytest.raises(ValueError, match="not both"):
            generate_many(model, prompts, predictor=predictor, signatures=RecentRouting(6, 8))
    assert stats.signatures == "pregate predictor"
    assert outputs == expected and path_predictor == expected and from_file == [e[:4] for e in expected[:3]]
    assert stats.regroups > 0


def test_cli_generate_schedules_with_the_configured_predictor(shipped_pregate, capsys):
    _, saved, _ = shipped_pregate
    assert main(["generate", "--model", "tiny-mixtral", "--prompt", "import os", "--prompt", "def f(",
                 "--max-new-tokens", "3", "--max-batch-size", "1", "--token-scheduling", "--predictor", str(saved),
                 "--device", "cpu"]) == 0
    assert "expert scheduler, signatures: pregate predictor" in capsys.readouterr().out
