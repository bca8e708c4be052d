"""Token choice as `model.generate` makes it: the distribution each request samples from is the one
generate's own logits processors give for the same logits; generate_many follows generate's
generation config (repetition penalty, n-gram blocking, eos lists, min new tokens)."""

from __future__ import annotations

import pytest
import torch

import moe_infer.assets
import tiny_models
from moe_infer.serving.batching import generate_many
from moe_infer.serving.sampling import RequestSampler, sampling_params

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = ["def main(", "import os\nimport sys\n\n", "class Parser(object):\n    def", "for i in range("]


@pytest.fixture(scope="module")
def shipped():
    return moe_infer.assets.load_model("tiny-mixtral")


def generate_one(model, prompt, **fields):
    ids = torch.tensor([prompt])
    return model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=256, **fields)


@pytest.mark.parametrize("fields", [
    dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9),
    dict(do_sample=True, min_p=0.1, repetition_penalty=1.3, no_repeat_ngram_size=2, min_new_tokens=5),
    dict(do_sample=True, top_k=0, temperature=1.4, eos_token_id=[256, 10], sequence_bias={(101,): 4.0}),
])
def test_each_step_samples_from_the_distribution_of_generates_processors(shipped, fields):
    model, tokenizer = shipped
    prompt = tokenizer(PROMPTS[0])["input_ids"]
    torch.manual_seed(0)
    out = generate_one(model, prompt, max_new_tokens=12, output_scores=True, output_logits=True,
                       return_dict_in_generate=True, **fields)
    sampler = RequestSampler(model, sampling_params(model, max_new_tokens=12, **fields), prompt, seed=0)
    generated = out.sequences[0, len(prompt):].tolist()
    assert len(out.scores) == len(generated) >= 2
    for step, (logits, scores) in enumerate(zip(out.logits, out.scores)):
        ours = sampler.scores(logits[0])
        torch.testing.assert_close(torch.softmax(ours, -1), torch.softmax(scores[0], -1), rtol=0, atol=0)
        assert not torch.allclose(torch.softmax(ours, -1), torch.softmax(logits[0], -1))  # processors did act
        sampler.record(generated[step])
    assert sampler.done  # the stopping criteria agree with generate's: it stopped where generate stopped


def test_greedy_generate_many_follows_the_generation_config_as_generate_does(shipped):
    model, tokenizer = shipped
    prompts = [tokenizer(t)["input_ids"] for t in PROMPTS]
    fields = dict(repetition_penalty=1.5, no_repeat_ngram_size=3, min_new_tokens=2, max_new_tokens=10,
                  eos_token_id=[256, ord("\n")])
    with tiny_models.wrapped(model):
        batched = generate_many(model, prompts, max_batch_size=2, pool_size=4, scheduler="expert",
                                regroup_threshold=0.0, **fields)
        alone = [generate_one(model, p, **fields)[0, len(p):].tolist() for p in prompts]
        plain = generate_many(model, prompts, max_batch_size=2, max_new_tokens=10)
    assert batched == alone
    assert any(o[-1] == ord("\n") and len(o) < 10 for o in batched)  # the second eos of the list stopped one
    assert batched != plain  # the penalties changed the text


def test_a_request_samples_the_same_tokens_in_any_batch(shipped):
    model, tokenizer = shipped
    prompts = [tokenizer(t)["input_ids"] for t in PROMPTS]
    fields = dict(do_sample=True, temperature=1.2, top_p=0.95, repetition_penalty=1.2, max_new_tokens=8)
    with tiny_models.wrapped(model):
        together = generate_many(model, prompts, max_batch_size=4, seed=[5, 6, 7, 8], **fields)
        paired = generate_many(model, prompts[::-1], max_batch_size=2, seed=[8, 7, 6, 5], scheduler="expert",
                               regroup_threshold=0.0, **fields)[::-1]
        alone = [generate_many(model, [p], seed=[s], **fields)[0] for p, s in zip(prompts, [5, 6, 7, 8])]
    assert together == paired == alone


def test_sampling_params_refuse_what_generate_many_cannot_do(shipped):
    model, _ = shipped
    with pytest.raises(ValueError, match="decoding mode 'contrastive_search' is not supported"):
        sampling_params(model, penalty_alpha=0.6, top_k=4)
    with pytest.raises(ValueError, match="num_return_sequences=2"):
        sampling_params(model, do_sample=True, num_return_sequences=2)
    with pytest.raises(TypeError, match="'temprature'"):
        sampling_params(model, temprature=0.5)
    with pytest.raises(ValueError, match="no room for a new token"):
        RequestSampler(model, sampling_params(model, max_new_tokens=None, max_length=3), [1, 2, 3, 4])
