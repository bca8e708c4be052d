"""`moe-infer serve` as a real server process on 127.0.0.1, queried with the official `openai` client:
greedy completions equal `model.generate` token for token, streams concatenate to the same text,
16 concurrent clients, disconnects free their slot, bad requests get 4xx errors with a message and
leave the server up, one failing request fails alone, /metrics, SIGTERM lets in-flight requests
finish and exits 0. One server for the module (tiny-mixtral under half its expert bytes)."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
import torch

import moe_infer.assets
from moe_infer.serving.process import ServerProcess
from serve_helpers import client_for, get, metric, wait_for

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = ["def main(", "import os\nimport sys\n\n", "class Parser(object):\n    def", "for i in range(",
           "The Licensor hereby grants", "x = [", "    return ", "# Copyright (c) 2001"]
HALF_THE_EXPERT_BYTES = 24 * 147456  # tiny-mixtral: 48 experts of 147,456 bytes


@pytest.fixture(scope="module")
def server():
    args = ["--max-batch-size", "4", "--pool-size", "8", "--max-queue", "32", "--prefill-chunk", "32",
            "--scheduler", "expert", "--cpu-memory", str(HALF_THE_EXPERT_BYTES), "--device", "cpu"]
    with ServerProcess("tiny-mixtral", *args, env={"OMP_NUM_THREADS": "1"}) as process:
        yield process


@pytest.fixture(scope="module")
def client(server):
    return client_for(server)


@pytest.fixture(scope="module")
def reference():
    """The plain transformers model (not wrapped) and its tokenizer, in this process."""
    return moe_infer.assets.load_model("tiny-mixtral")


def generated(reference, prompt: str, max_new_tokens: int) -> list[int]:
    model, tokenizer = reference
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                          do_sample=False)[0, ids.shape[1]:].tolist()


def post_raw(server, path: str, data: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(server.url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def assert_healthy(server, client, reference) -> None:
    assert get(server, "/health") == (200, '{"status":"ok"}')
    answer = client.completions.create(model="tiny-mixtral", prompt="def main(", max_tokens=4, temperature=0)
    assert answer.choices[0].text == reference[1].decode(generated(reference, "def main(", 4))


def test_greedy_completions_equal_model_generate_token_for_token(client, reference):
    _, tokenizer = reference
    many = client.completions.create(model="tiny-mixtral", prompt=PROMPTS[:4], max_tokens=10, temperature=0,
                                     extra_body={"return_token_ids": True})
    one = client.completions.create(model="tiny-mixtral", prompt=PROMPTS[4], max_tokens=10, temperature=0,
                                    extra_body={"return_token_ids": True})
    choices = many.choices + one.choices
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    for prompt, choice in zip(PROMPTS[:5], choices):
        expected = generated(reference, prompt, 10)
        assert choice.token_ids == expected
        assert choice.text == tokenizer.decode(expected, skip_special_tokens=True)
        assert choice.finish_reason == ("stop" if expected[-1] == 256 else "length")
    prompt_tokens = sum(len(tokenizer(p)["input_ids"]) for p in PROMPTS[:4])
    assert (many.usage.prompt_tokens, many.usage.completion_tokens) == (prompt_tokens, 40)
    assert many.model == "tiny-mixtral" and many.object == "text_completion"


def test_streamed_chunks_concatenate_to_the_same_text(client):
    whole = client.completions.create(model="tiny-mixtral", prompt=PROMPTS[1], max_tokens=24, temperature=0)
    chunks = list(client.completions.create(model="tiny-mixtral", prompt=PROMPTS[1], max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len(texts) > 10 and "".join(texts) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_sixteen_concurrent_clients_all_complete_with_correct_outputs(server, reference):
    prompts = [f"{p}{i}" for i, p in enumerate(PROMPTS * 2)]
    completed = metric(server, 'moe_infer_requests_total{outcome="completed"}')

    async def one(client, prompt, stream):
        if not stream:
            answer = await client.completions.create(model="tiny-mixtral", prompt=prompt, max_tokens=6, temperature=0)
            return answer.choices[0].text
        text = ""
        async for chunk in await client.completions.create(model="tiny-mixtral", prompt=prompt, max_tokens=6,
                                                           temperature=0, stream=True):
            text += chunk.choices[0].text
        return text

    async def all_of_them():
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=300) as client:
            return await asyncio.gather(*(one(client, p, i % 2 == 1) for i, p in enumerate(prompts)))

    texts = asyncio.run(all_of_them())
    assert texts == [reference[1].decode(generated(reference, p, 6), skip_special_tokens=True) for p in prompts]
    assert metric(server, 'moe_infer_requests_total{outcome="completed"}') == completed + 16
    assert metric(server, 'moe_infer_requests_total{outcome="failed"}') == 0
    assert metric(server, 'moe_infer_requests_total{outcome="rejected"}') == 0


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server, client, reference):
    cancelled = metric(server, 'moe_infer_requests_total{outcome="cancelled"}')
    stream = client.completions.create(model="tiny-mixtral", prompt=PROMPTS[0], max_tokens=900, temperature=0,
                                       stream=True)
    for _, _ in zip(range(3), stream):
        pass
    stream.close()  # the client goes away mid-stream
    wait_for(lambda: metric(server, "moe_infer_requests_running") == 0 and
             metric(server, 'moe_infer_requests_total{outcome="cancelled"}') > cancelled,
             "the disconnected request still holds its slot")
    assert metric(server, 'moe_infer_requests_total{outcome="cancelled"}') == cancelled + 1
    assert metric(server, "moe_infer_generation_tokens_total") < 900 * 2  # it stopped generating
    assert_healthy(server, client, reference)


def test_a_client_that_gives_up_waiting_frees_its_slot(server, reference):
    cancelled = metric(server, 'moe_infer_requests_total{outcome="cancelled"}')
    impatient = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=1.5)
    with pytest.raises(openai.APITimeoutError):  # not streamed: it closes the connection before the answer
        impatient.completions.create(model="tiny-mixtral", prompt=PROMPTS[0], max_tokens=900, temperature=0)
    wait_for(lambda: metric(server, "moe_infer_requests_running") == 0 and
             metric(server, 'moe_infer_requests_total{outcome="cancelled"}') > cancelled,
             "the abandoned request still holds its slot")
    assert_healthy(server, client_for(server), reference)


@pytest.mark.parametrize("path, body, status, message", [
    ("/v1/completions", b'{"model": "tiny-mixtral", "prompt": ', 400, "the request body is not valid JSON"),
    ("/v1/completions", b'["tiny-mixtral"]', 400, "must be a JSON object"),
    ("/v1/completions", b'{"model": "tiny-mixtral", "prompt": "x", "max_tokens": 4, "colour": 1}', 400,
     "Unrecognized request argument supplied: colour"),
    ("/v1/completions", b'{"model": "tiny-mixtral", "prompt": [1, 99999], "max_tokens": 2}', 400,
     "token ids in [0, 257)"),
    ("/v1/completions", b'{"model": "tiny-mixtral", "prompt": "x", "n": 0}', 400, "n: Input should be greater"),
    ("/v1/completions", b'{"model": "tiny-mixtral", "prompt": "x", "presence_penalty": 0.5}', 400,
     "presence_penalty is not supported"),
    ("/v1/completions", b'{"model": "tiny-mixtral", "prompt": "x", "temperature": 3}', 400, "temperature: Input should"),
    ("/v1/chat/completions", b'{"model": "tiny-mixtral", "messages": [{"role": "user", "content": "hi"}]}', 400,
     "has no chat template"),
    ("/v1/nowhere", b'{}', 404, "Not Found"),
])
def test_malformed_requests_get_a_4xx_error_in_the_openai_shape(server, path, body, status, message):
    got, answer = post_raw(server, path, body)
    assert got == status
    assert set(answer) == {"error"} and set(answer["error"]) == {"message", "type", "param", "code"}
    assert message in answer["error"]["message"]


def test_bad_requests_through_the_client_get_4xx_errors_and_the_server_stays_up(server, client, reference):
    with pytest.raises(openai.NotFoundError, match="The model 'gpt-4' does not exist; this server serves") as error:
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    assert error.value.status_code == 404 and error.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError, match=r"max_tokens: Input should be greater than or equal to 1 \(got -5\)"):
        client.completions.create(model="tiny-mixtral", prompt="x", max_tokens=-5)
    with pytest.raises(openai.BadRequestError, match="maximum context length is 1024 tokens; the prompt has 1100") as error:
        client.completions.create(model="tiny-mixtral", prompt="x" * 1100, max_tokens=2)
    assert error.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="stop: up to 4"):
        client.completions.create(model="tiny-mixtral", prompt="x", max_tokens=2, stop=["a", "b", "c", "d", "e"])
    assert_healthy(server, client, reference)


def test_one_failing_request_fails_alone(server, reference):
    async def both():
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=300) as client:
            good = [client.completions.create(model="tiny-mixtral", prompt=p, max_tokens=8, temperature=0)
                    for p in PROMPTS[:3]]
            # a temperature this small overflows the scores to inf: the probabilities are NaN
            bad = client.completions.create(model="tiny-mixtral", prompt=PROMPTS[0], max_tokens=8, temperature=1e-45)
            return await asyncio.gather(bad, *good, return_exceptions=True)

    bad, *good = asyncio.run(both())
    assert isinstance(bad, openai.InternalServerError) and bad.status_code == 500
    assert "generation failed" in str(bad) and "probability tensor" in str(bad)
    assert [a.choices[0].text for a in good] == [reference[1].decode(generated(reference, p, 8)) for p in PROMPTS[:3]]
    with pytest.raises(openai.APIError, match="generation failed"):  # streamed: an error event ends the stream
        list(client_for(server).completions.create(model="tiny-mixtral", prompt=PROMPTS[0], max_tokens=8,
                                                   temperature=1e-45, stream=True))


def test_echo_and_logit_bias(client, reference):
    answer = client.completions.create(model="tiny-mixtral", prompt=PROMPTS[0], max_tokens=5, temperature=0, echo=True)
    assert answer.choices[0].text == PROMPTS[0] + reference[1].decode(generated(reference, PROMPTS[0], 5))
    biased = client.completions.create(model="tiny-mixtral", prompt=PROMPTS[0], max_tokens=5, temperature=0,
                                       logit_bias={str(ord("Z")): 100})
    assert biased.choices[0].text == "ZZZZZ"
    with pytest.raises(openai.BadRequestError, match="logit_bias: '999'"):
        client.completions.create(model="tiny-mixtral", prompt="x", max_tokens=2, logit_bias={"999": 1})


def test_logprobs_are_the_models_log_softmax(client, reference):
    model, tokenizer = reference
    answer = client.completions.create(model="tiny-mixtral", prompt=PROMPTS[3], max_tokens=4, temperature=0,
                                       logprobs=2)
    ids = torch.tensor([tokenizer(PROMPTS[3])["input_ids"]])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, ids.shape[1]:].tolist()
    expected = [float(torch.log_softmax(logits[0], -1)[t]) for logits, t in zip(out.logits, tokens)]
    logprobs = answer.choices[0].logprobs
    assert logprobs.tokens == [tokenizer.decode([t]) for t in tokens]
    assert logprobs.token_logprobs == pytest.approx(expected, abs=1e-4)
    for top, token in zip(logprobs.top_logprobs, logprobs.tokens):
        assert len(top) == 2 and max(top, key=top.get) == token  # greedy: the chosen token is the most likely
    assert logprobs.text_offset == [0, 1, 2, 3]


def test_seeded_sampling_is_reproducible_and_n_samples_independently(client):
    def texts(**fields):
        answer = client.completions.create(model="tiny-mixtral", prompt=PROMPTS[0], max_tokens=12, temperature=1.0,
                                           top_p=0.95, **fields)
        return [c.text for c in answer.choices]

    two = texts(n=2, seed=7)
    assert len(two) == 2 and two[0] != two[1]
    assert texts(n=2, seed=7) == two
    assert texts(seed=8) == two[1:]  # choice j samples with seed + j, alone or beside others


def test_stop_strings_end_the_completion_before_them(client, reference):
    full = reference[1].decode(generated(reference, PROMPTS[1], 20), skip_special_tokens=True)
    assert "\n" in full
    answer = client.completions.create(model="tiny-mixtral", prompt=PROMPTS[1], max_tokens=20, temperature=0,
                                       stop=["\n", "zzz"])
    assert answer.choices[0].text == full.split("\n")[0] and answer.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny-mixtral", prompt=PROMPTS[1], max_tokens=20, temperature=0, stop="\n", stream=True))
    assert streamed == answer.choices[0].text


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list()] == ["tiny-mixtral"]
    assert client.models.retrieve("tiny-mixtral").owned_by == "moe_infer"
    status, text = get(server, "/metrics")
    assert status == 200
    for series in ("moe_infer_requests_running", "moe_infer_requests_waiting", "moe_infer_generation_tokens_per_second",
                   "moe_infer_time_to_first_token_seconds_count", "moe_infer_inter_token_latency_seconds_count",
                   'moe_infer_expert_cache_hit_rate{tier="cpu"}', 'moe_infer_expert_bytes_moved_total{tier="cpu"}',
                   "moe_infer_distinct_experts_per_micro_batch_count", "moe_infer_distinct_experts_per_micro_batch_sum"):
        assert f"\n{series} " in text, series
    assert metric(server, "moe_infer_time_to_first_token_seconds_count") > 0
    assert 0 < metric(server, 'moe_infer_expert_cache_hit_rate{tier="cpu"}') < 1  # half the experts fit
    assert metric(server, 'moe_infer_expert_bytes_moved_total{tier="cpu"}') > 0
    batches = metric(server, "moe_infer_distinct_experts_per_micro_batch_count")
    assert 2 <= metric(server, "moe_infer_distinct_experts_per_micro_batch_sum") / batches <= 8


def test_sigterm_lets_in_flight_requests_finish_and_exits_cleanly(server, client):
    chunks, errors = [], []

    def stream():
        try:
            for chunk in client.completions.create(model="tiny-mixtral", prompt=PROMPTS[2], max_tokens=30,
                                                   temperature=0, stream=True):
                chunks.append(chunk)
        except Exception as error:  # noqa: BLE001 (reported below)
            errors.append(error)

    thread = threading.Thread(target=stream)
    thread.start()
    deadline = time.monotonic() + 60
    while not chunks:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    logged = len(server.stderr())
    assert server.stop(signal.SIGTERM, timeout=120) == 0
    thread.join(60)
    assert not errors and chunks[-1].choices[0].finish_reason == "length"
    assert sum(1 for c in chunks if c.choices[0].text) == 30  # the request in flight finished
    assert server.output[-1] == "moe-infer serve: stopped"
    assert "Traceback" not in server.stderr()[logged:]  # nothing went wrong while shutting down
    with pytest.raises(openai.APIConnectionError):
        client.completions.create(model="tiny-mixtral", prompt="x", max_tokens=2)
