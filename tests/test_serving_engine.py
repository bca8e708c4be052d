"""The serving engine in-process (real model, real engine thread): continuous batching equals
generate, chunked prefill keeps running requests decoding, cancellation frees the slot, a failing
request fails alone (its micro-batch rolled back), bounded queue, clean close; the text assembler."""

from __future__ import annotations

import queue
import threading

import pytest
import torch

import moe_infer.assets
import tiny_models
from moe_infer.serving.engine import Delta, Engine, EngineClosed, Failed, Finished, Overloaded
from moe_infer.serving.sampling import sampling_params
from moe_infer.serving.text import TextAssembler

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = ["def main(", "import os\nimport sys\n\n", "class Parser(object):\n    def", "for i in range(",
           "The Licensor hereby grants", "x"]


@pytest.fixture(scope="module")
def shipped():
    return moe_infer.assets.load_model("tiny-mixtral")


class Collector:
    """A request's sink: every event, in the order the engine thread sent them (and one log for all)."""

    def __init__(self, log: list | None = None, name: str = ""):
        self.events: queue.Queue = queue.Queue()
        self.log, self.name = log, name

    def __call__(self, event) -> None:
        if self.log is not None:
            self.log.append((self.name, type(event).__name__))
        self.events.put(event)

    def result(self, timeout: float = 120.0) -> tuple[str, list[int], object]:
        text, tokens = "", []
        while True:
            event = self.events.get(timeout=timeout)
            if isinstance(event, Delta):
                text, tokens = text + event.text, tokens + event.tokens
            else:
                return text, tokens, event


def greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                          do_sample=False)[0, len(prompt):].tolist()


def submit(engine, model, prompt, max_new_tokens, **options):
    sink = Collector(options.pop("log", None), options.pop("name", ""))
    request = engine.make_request(prompt, sampling_params(model, max_new_tokens=max_new_tokens), seed=0, sink=sink,
                                  **options)
    engine.submit([request])
    return request, sink


@pytest.mark.parametrize("scheduler", ["expert", "fcfs"])
def test_requests_joining_and_leaving_between_steps_get_generates_tokens(shipped, scheduler):
    model, tokenizer = shipped
    prompts = [tokenizer(t)["input_ids"] for t in PROMPTS]
    lengths = [4, 11, 7, 9, 3, 12]
    with tiny_models.wrapped(model):
        engine = Engine(model, tokenizer, max_batch_size=2, pool_size=3, scheduler=scheduler, prefill_chunk=8).start()
        try:
            first = [submit(engine, model, p, n) for p, n in zip(prompts[:3], lengths[:3])]
            done = first[0][1].result()  # later requests arrive while the first ones run
            later = [submit(engine, model, p, n) for p, n in zip(prompts[3:], lengths[3:])]
            results = [done] + [sink.result() for _, sink in first[1:] + later]
            stats = engine.call(lambda: engine.stats.summary()).result(timeout=60)
        finally:
            engine.close()
        expected = [greedy(model, p, n) for p, n in zip(prompts, lengths)]
    for (text, tokens, end), want in zip(results, expected):
        assert tokens == want
        assert text == tokenizer.decode(want, skip_special_tokens=True)
        assert isinstance(end, Finished) and end.completion_tokens == len(want)
        assert end.reason == ("stop" if want[-1] == 256 else "length")
    assert stats["micro_batches"] > 0 and stats["mean_batch_size"] > 1  # requests did share forward passes


def test_a_long_prompt_is_prefilled_in_chunks_while_running_requests_decode(shipped):
    model, tokenizer = shipped
    short = tokenizer("def main(")["input_ids"]
    long = tokenizer("import os\n" * 40)["input_ids"]  # 400 tokens: 25 chunks of 16
    log: list = []
    with tiny_models.wrapped(model):
        engine = Engine(model, tokenizer, max_batch_size=4, prefill_chunk=16).start()
        try:
            _, running = submit(engine, model, short, 60, log=log, name="short")
            first = running.events.get(timeout=60)
            assert isinstance(first, Delta)  # it is decoding
            _, late = submit(engine, model, long, 3, log=log, name="long")
            long_result, short_result = late.result(), running.result()
        finally:
            engine.close()
        expected = greedy(model, long, 3)
    assert long_result[1] == expected  # chunked prefill gives the tokens of a whole-prompt prefill
    first_long = log.index(("long", "Delta"))
    short_tokens_meanwhile = sum(1 for name, kind in log[1:first_long] if name == "short" and kind == "Delta")
    assert short_tokens_meanwhile >= len(long) // 16 - 1  # one decode step per prefill chunk
    assert first.tokens + short_result[1] == greedy(model, short, 60)


def test_cancelling_frees_the_slot_and_its_kv_cache(shipped):
    model, tokenizer = shipped
    prompt = tokenizer("def main(")["input_ids"]
    with tiny_models.wrapped(model):
        engine = Engine(model, tokenizer, max_batch_size=2, pool_size=1, max_queue=1).start()
        try:
            request, sink = submit(engine, model, prompt, 500)
            assert isinstance(sink.events.get(timeout=60), Delta)
            queued, queued_sink = submit(engine, model, prompt, 2)  # waits: the pool holds one request
            with pytest.raises(Overloaded, match="1 requests are already waiting and the queue holds 1"):
                submit(engine, model, prompt, 2)
            engine.cancel(request)
            _, _, end = sink.result()
            assert isinstance(end, Finished) and end.reason == "cancelled" and end.completion_tokens < 500
            assert isinstance(queued_sink.result()[2], Finished)  # the freed slot went to the queued request
            pooled = engine.call(lambda: (len(engine._pool), request.cache, [b.requests for b in engine._pool.batches]))
            assert pooled.result(timeout=60) == (0, None, [])
        finally:
            engine.close()


def test_a_request_whose_step_fails_fails_alone_and_the_others_are_unchanged(shipped):
    model, tokenizer = shipped
    prompts = [tokenizer(t)["input_ids"] for t in PROMPTS[:3]]
    poison = tokenizer("class Parser(object):\n    def main(self):" + " " * 8)["input_ids"]
    poison_position = len(poison) + 2  # its third decode step fails, in whatever micro-batch it is

    failed_batch_sizes = []

    def fail_at_poison_position(module, args, kwargs):
        position_ids = kwargs.get("position_ids")
        if position_ids is not None and (position_ids == poison_position).any():
            failed_batch_sizes.append(position_ids.shape[0])
            raise RuntimeError("injected fault")

    assert all(len(p) + 12 < poison_position for p in prompts)
    with tiny_models.wrapped(model):
        handle = model.register_forward_pre_hook(fail_at_poison_position, with_kwargs=True)
        engine = Engine(model, tokenizer, max_batch_size=4).start()
        try:
            good = [submit(engine, model, p, 12)[1] for p in prompts[:2]]
            bad = submit(engine, model, poison, 12)[1]
            good.append(submit(engine, model, prompts[2], 12)[1])
            results = [sink.result() for sink in good]
            bad_text, bad_tokens, bad_end = bad.result()
            calls = engine.call(lambda: engine.stats.micro_batches).result(timeout=60)
        finally:
            engine.close()
            handle.remove()
        expected = [greedy(model, p, 12) for p in prompts]
    assert isinstance(bad_end, Failed) and "injected fault" in bad_end.message and len(bad_tokens) == 3
    assert failed_batch_sizes[0] > 1 and failed_batch_sizes[1:] == [1]  # failed shared, then failed alone
    assert [tokens for _, tokens, _ in results] == expected  # rolled back and retried alone: same tokens
    assert all(isinstance(end, Finished) for _, _, end in results)
    assert calls > 0


def test_a_request_whose_sampling_fails_fails_alone(shipped):
    model, tokenizer = shipped
    prompts = [tokenizer(t)["input_ids"] for t in PROMPTS[:2]]
    with tiny_models.wrapped(model):
        engine = Engine(model, tokenizer, max_batch_size=4).start()
        try:
            sinks = [submit(engine, model, p, 6)[1] for p in prompts]
            # an absurd temperature overflows the scores to inf: the probabilities are NaN
            bad = Collector()
            engine.submit([engine.make_request(prompts[0], sampling_params(model, max_new_tokens=6, do_sample=True,
                                                                           temperature=1e-45), seed=0, sink=bad)])
            results = [sink.result() for sink in sinks]
            _, _, failure = bad.result()
        finally:
            engine.close()
        expected = [greedy(model, p, 6) for p in prompts]
    assert isinstance(failure, Failed) and "probability tensor contains" in failure.message
    assert [tokens for _, tokens, _ in results] == expected


def test_close_fails_what_is_in_flight_and_refuses_new_work(shipped):
    model, tokenizer = shipped
    prompt = tokenizer("def main(")["input_ids"]
    with tiny_models.wrapped(model):
        engine = Engine(model, tokenizer, max_batch_size=2, pool_size=1).start()
        running = submit(engine, model, prompt, 1000)[1]
        waiting = submit(engine, model, prompt, 1000)[1]
        assert isinstance(running.events.get(timeout=60), Delta)
        engine.close()
        assert not engine._thread.is_alive() and not engine.alive
        for sink in (running, waiting):
            end = sink.result()[2]
            assert isinstance(end, Failed) and end.status == 503 and "shutting down" in end.message
        with pytest.raises(EngineClosed):
            submit(engine, model, prompt, 2)
        assert engine.call(lambda: 1).exception(timeout=5).__class__ is EngineClosed


def test_the_model_is_driven_from_the_engine_thread_only(shipped):
    model, tokenizer = shipped
    threads = set()
    with tiny_models.wrapped(model):
        handle = model.register_forward_pre_hook(lambda *_: threads.add(threading.current_thread().name))
        engine = Engine(model, tokenizer).start()
        try:
            sinks = [submit(engine, model, tokenizer(t)["input_ids"], 3)[1] for t in PROMPTS]
            assert all(isinstance(s.result()[2], Finished) for s in sinks)
        finally:
            engine.close()
            handle.remove()
    assert threads == {"moe-infer-engine"}


# ----------------------------------------------------------------------------- text

def released(tokenizer, token_ids, stop=()):
    assembler = TextAssembler(tokenizer, stop)
    pieces = [assembler.add(t) for t in token_ids]
    pieces.append(assembler.finish())
    return pieces, assembler


def test_text_is_released_whole_characters_at_a_time(shipped):
    _, tokenizer = shipped
    token_ids = list("naïve café → ok".encode("utf-8")) + [256]  # multi-byte characters, then eos
    pieces, assembler = released(tokenizer, token_ids)
    assert "".join(pieces) == "naïve café → ok" == assembler.text
    assert "\ufffd" not in "".join(pieces) and "ï" in pieces  # a 2-byte character comes out in one piece


@pytest.mark.parametrize("stop, expected", [
    (["\n"], "def main(x):"),
    (["main", "de"], ""),  # the earliest stop string wins
    (["(x)", "ma"], "def "),
    (["nowhere"], "def main(x):\n    pass"),
])
def test_stop_strings_end_the_text_before_them(shipped, stop, expected):
    _, tokenizer = shipped
    text = "def main(x):\n    pass"
    pieces, assembler = released(tokenizer, list(text.encode()), stop)
    assert "".join(pieces) == expected == assembler.text
    assert assembler.stopped == (expected != text)
    for i in range(len(pieces)):  # a released prefix never ends with the start of a stop string it then becomes
        assert "".join(pieces[:i + 1]) == expected[:len("".join(pieces[:i + 1]))]
