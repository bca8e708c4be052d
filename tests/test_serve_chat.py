"""`moe-infer serve` of a transformers directory (tiny-deepseek) with a chat template given on the
command line: chat completions equal `model.generate` on the templated prompt, streamed and not,
with logprobs; a full queue gets 503; SIGINT cancels what does not finish in time and exits 0.
Also: serving a converted checkpoint, and the command's user errors. One server for the module."""

from __future__ import annotations

import signal
import socket
import threading
import time

import openai
import pytest
import torch

import moe_infer.assets
from moe_infer.cli import main
from moe_infer.config import MoEConfig
from moe_infer.serving.process import ServerProcess
from moe_infer.serving.server import load_served_model
from serve_helpers import client_for, metric, wait_for

pytestmark = pytest.mark.usefixtures("single_thread")

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
MESSAGES = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "def main("}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    template = tmp_path_factory.mktemp("chat") / "template.jinja"
    template.write_text(TEMPLATE)
    args = ["--served-model-name", "deepseek", "--chat-template", str(template), "--max-batch-size", "2",
            "--pool-size", "1", "--max-queue", "2", "--shutdown-timeout", "1", "--device", "cpu"]
    with ServerProcess(str(moe_infer.assets.path("tiny-deepseek")), *args, env={"OMP_NUM_THREADS": "1"}) as process:
        yield process


@pytest.fixture(scope="module")
def client(server):
    return client_for(server)


@pytest.fixture(scope="module")
def reference():
    model, tokenizer = moe_infer.assets.load_model("tiny-deepseek")
    tokenizer.chat_template = TEMPLATE
    return model, tokenizer


def generate(model, prompt_ids: list[int], max_new_tokens: int, **fields):
    ids = torch.tensor([prompt_ids])
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                          **fields)


def test_chat_completions_apply_the_template_and_equal_generate(client, reference):
    model, tokenizer = reference
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)["input_ids"]
    expected = generate(model, prompt, 12)[0, len(prompt):].tolist()
    answer = client.chat.completions.create(model="deepseek", messages=MESSAGES, max_tokens=12, temperature=0,
                                            extra_body={"return_token_ids": True})
    choice = answer.choices[0]
    assert choice.token_ids == expected and choice.message.role == "assistant"
    assert choice.message.content == tokenizer.decode(expected, skip_special_tokens=True)
    assert answer.usage.prompt_tokens == len(prompt) and answer.object == "chat.completion"

    chunks = list(client.chat.completions.create(model="deepseek", messages=MESSAGES, max_tokens=12, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason
    # max_completion_tokens is the newer name of max_tokens
    newer = client.chat.completions.create(model="deepseek", messages=MESSAGES, max_completion_tokens=12, temperature=0)
    assert newer.choices[0].message.content == choice.message.content


def test_chat_logprobs(client, reference):
    model, tokenizer = reference
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)["input_ids"]
    out = generate(model, prompt, 3, output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt):].tolist()
    answer = client.chat.completions.create(model="deepseek", messages=MESSAGES, max_tokens=3, temperature=0,
                                            logprobs=True, top_logprobs=3)
    content = answer.choices[0].logprobs.content
    assert [c.token for c in content] == [tokenizer.decode([t]) for t in tokens]
    for entry, logits, token in zip(content, out.logits, tokens):
        assert entry.logprob == pytest.approx(float(torch.log_softmax(logits[0], -1)[token]), abs=1e-4)
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token
        assert entry.bytes == list(entry.token.encode())
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
        client.chat.completions.create(model="deepseek", messages=MESSAGES, max_tokens=3, top_logprobs=2)
    with pytest.raises(openai.BadRequestError, match="tools and tool_choice are not supported"):
        client.chat.completions.create(model="deepseek", messages=MESSAGES, max_tokens=3, tools=[
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])


def test_a_full_queue_gets_503_and_the_server_recovers(server, client):
    rejected = metric(server, 'moe_infer_requests_total{outcome="rejected"}')
    long = dict(model="deepseek", messages=MESSAGES, max_tokens=900, temperature=0, stream=True)
    running = client.chat.completions.create(**long)  # the one slot (--pool-size 1)
    next(iter(running))
    waiting = [client.chat.completions.create(**long) for _ in range(2)]  # the queue (--max-queue 2)
    wait_for(lambda: metric(server, "moe_infer_requests_waiting") == 2, "two requests waiting")
    with pytest.raises(openai.InternalServerError, match="2 requests are already waiting and the queue holds 2") as error:
        client.chat.completions.create(model="deepseek", messages=MESSAGES, max_tokens=2)
    assert error.value.status_code == 503 and error.value.response.headers["retry-after"] == "1"
    assert metric(server, 'moe_infer_requests_total{outcome="rejected"}') == rejected + 1
    for stream in [running, *waiting]:
        stream.close()
    wait_for(lambda: metric(server, "moe_infer_requests_running") + metric(server, "moe_infer_requests_waiting") == 0,
             "the closed streams still hold the slot or the queue")
    answer = client.chat.completions.create(model="deepseek", messages=MESSAGES, max_tokens=2, temperature=0)
    assert answer.choices[0].finish_reason in ("length", "stop")


def test_sigint_cancels_what_does_not_finish_in_time_and_exits_cleanly(server, client):
    chunks, errors = [], []

    def stream():
        try:
            for chunk in client.chat.completions.create(model="deepseek", messages=MESSAGES, max_tokens=900,
                                                        temperature=0, stream=True):
                chunks.append(chunk)
        except Exception as error:  # noqa: BLE001 (checked below)
            errors.append(error)

    thread = threading.Thread(target=stream)
    thread.start()
    wait_for(lambda: len(chunks) > 1, "the stream started")
    started = time.monotonic()
    assert server.stop(signal.SIGINT, timeout=120) == 0  # --shutdown-timeout 1: then it is cancelled
    assert time.monotonic() - started < 60
    thread.join(60)
    assert not thread.is_alive()
    assert all(c.choices[0].finish_reason is None for c in chunks if c.choices)  # it did not finish
    assert server.output[-1] == "moe-infer serve: stopped"


def test_a_converted_checkpoint_is_served_with_its_tokenizer(tmp_path, reference):
    from moe_infer.experts.convert import convert

    convert(str(moe_infer.assets.path("tiny-deepseek")), str(tmp_path / "converted"))
    model, tokenizer = load_served_model(str(tmp_path / "converted"), MoEConfig(cpu_memory="1MiB"), device="cpu")
    assert moe_infer.is_wrapped(model) and moe_infer.executor(model).config.cpu_memory == 2**20
    prompt = reference[1]("def main(")["input_ids"]
    assert tokenizer("def main(")["input_ids"] == prompt
    assert generate(model, prompt, 6).tolist() == generate(reference[0], prompt, 6).tolist()


def test_serve_user_errors_are_one_line_and_exit_2(capsys):
    assert main(["serve", "no-such-model", "--port", "0"]) == 2
    assert "moe-infer serve: error: model 'no-such-model': not a shipped model" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "tiny-mixtral", "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # a MoEConfig flag's choices are checked by the parser
        main(["serve", "tiny-mixtral", "--cache-policy", "fifo"])
    assert exit_info.value.code == 2
    assert "--cache-policy: invalid choice: 'fifo'" in capsys.readouterr().err
    assert main(["serve", "tiny-mixtral", "--predictor", "no-such-predictor"]) == 2  # MoEConfig's own check
    assert "MoEConfig.predictor='no-such-predictor'" in capsys.readouterr().err
    assert main(["serve", "tiny-mixtral", "--chat-template", "/nonexistent/template.jinja"]) == 2
    assert "--chat-template '/nonexistent/template.jinja': no such file" in capsys.readouterr().err
