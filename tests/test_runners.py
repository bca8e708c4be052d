"""The layer's one seam (issue 21): `MoELayer.forward` routes, tells its observers, and hands
`(hidden, routing)` to the runner the executor chose for the current configuration."""

import torch

import moe_infer
import tiny_models
from moe_infer.runners import QuantizedRunner, ResidentRunner


def runners(model) -> set[str]:
    return {layer.runner.name for layer in moe_infer.executor(model).layers}


def test_the_runner_follows_every_reconfiguration():
    model = tiny_models.build("mixtral", 0)  # a fresh model: quantize= releases its float experts
    ids = tiny_models.token_ids(3, 2, 6)
    with torch.no_grad():
        expected = model(ids).logits
        moe_infer.wrap(model)
        assert runners(model) == {"resident"}
        budget = 3 * moe_infer.executor(model).layers[0].expert_source.expert_nbytes()
        moe_infer.wrap(model, cpu_memory=budget)  # a budget: the tiered cache computes the experts
        assert runners(model) == {"cached"}
        cache = moe_infer.executor(model).cache
        assert all(layer.runner.cache is cache for layer in moe_infer.executor(model).layers)
        torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=0)
        moe_infer.wrap(model, cpu_memory=None)  # and back: the cache is closed, its runner dropped
        assert runners(model) == {"resident"} and moe_infer.executor(model).cache is None
        moe_infer.wrap(model, quantize="int8")
        assert runners(model) == {"quantized"}
        assert "runner=quantized" in repr(moe_infer.executor(model).layers[0])
        moe_infer.executor(model).close()


def test_forward_hands_the_routing_it_made_to_the_runner(tiny_model):
    model = tiny_model("qwen3_moe")  # shared experts: added by the layer, not the runner
    ids = tiny_models.token_ids(4, 1, 5)
    seen = []
    with torch.no_grad(), tiny_models.wrapped(model):
        expected = model(ids).logits
        layer = moe_infer.executor(model).layers[0]
        chosen = layer.runner
        assert isinstance(chosen, ResidentRunner)

        def observer(layer, hidden, routing):
            seen.append(("observer", routing.expert_ids.clone()))

        def runner(layer, hidden, routing):
            seen.append(("runner", routing.expert_ids.clone()))
            return chosen(layer, hidden, routing)

        layer.routing_observers.append(observer)
        layer.runner = runner
        try:
            got = model(ids).logits
        finally:
            layer.routing_observers.remove(observer)
    assert [what for what, _ in seen] == ["observer", "runner"]  # observers first, then the runner, once
    assert torch.equal(seen[0][1], seen[1][1])
    assert torch.equal(got, expected)


def test_an_unowned_layer_runs_the_torch_path():
    # before an executor owns it (wrap verifies routing first), a layer computes with the torch math
    assert ResidentRunner().kernel_for(torch.device("cuda")) == "torch"
    assert QuantizedRunner().kernel_for(torch.device("cpu")) == "torch"
