"""`wrap` on every supported family (`tiny_models.TINY_MODELS`): same logits, same generations, same
router outputs, a bit-exact `unwrap`, dense layers left alone, honest statistics; and the models and
settings `wrap` must refuse without touching the model.

Every comparison is wrapped against unwrapped on the same model object, so the reference is the
family's own `transformers` code (its default `grouped_mm` experts).
"""

from __future__ import annotations

import pytest
import torch

import moe_infer
from moe_infer.families import FAMILIES
from moe_infer.layer import MoELayer
from tiny_models import CASES, OTHER_MODELS, PAD_TOKEN_ID, TINY_MODELS, build, left_padded, token_ids, wrapped

# logits of wrapped vs unwrapped, same dtype
TOLERANCE = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
}
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16"}
NEW_TOKENS = 32

families = pytest.mark.parametrize("name", CASES)
pytestmark = pytest.mark.usefixtures("single_thread")


def _logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


def _modules(model) -> dict[str, int]:
    return {name: id(module) for name, module in model.named_modules()}


def test_every_family_listed_in_FAMILIES_has_a_tiny_model():
    claimed = {router for spec in FAMILIES for router in spec.router_classes}
    tested = {case.router_class for case in TINY_MODELS.values()}
    assert claimed == tested, f"untested: {sorted(claimed - tested)}; not in FAMILIES: {sorted(tested - claimed)}"


@families
def test_tiny_model_has_the_moe_layers_its_config_implies(tiny_model, name):
    """The hand-written `moe_layers` of the table against the model transformers builds (the
    layers holding a router of the family), so the tests below check `wrap` against the config."""
    model = tiny_model(name)
    spec = TINY_MODELS[name]
    holders = {
        mod_name for mod_name, module in model.named_modules()
        if any(type(child).__name__ == spec.router_class for child in module.children())
    }
    layer_indices = sorted(int(part) for holder in holders for part in holder.split(".") if part.isdigit())
    assert layer_indices == list(spec.moe_layers)


# ------------------------------------------------------------------------------------------ logits


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=DTYPE_IDS.get)
@families
def test_wrapped_logits_match(tiny_model, name, dtype, seed):
    model = tiny_model(name, seed, dtype)
    ids = token_ids(seed, 3, 21)
    expected = _logits(model, ids)
    with wrapped(model):
        got = _logits(model, ids)
    assert got.dtype == expected.dtype == dtype
    torch.testing.assert_close(got, expected, **TOLERANCE[dtype])


@families
def test_grad_modes(tiny_model, name):
    """inference_mode, no_grad, and a plain eval forward with autograd on."""
    model = tiny_model(name)
    ids = token_ids(3, 2, 9)
    expected = _logits(model, ids)
    with wrapped(model):
        with torch.inference_mode():
            in_inference_mode = model(ids).logits
        with torch.no_grad():
            in_no_grad = model(ids).logits
        with_autograd = model(ids).logits.detach()
    for got in (in_inference_mode, in_no_grad, with_autograd):
        torch.testing.assert_close(got, expected, **TOLERANCE[torch.float32])


@families
def test_dtype_move_after_wrap(name):
    """`.to(bfloat16)` of a wrapped model: the executor follows the moved tensors, and unwrap hands
    the moved tensors back to the original blocks."""
    moved, reference = build(name, 0), build(name, 0)
    ids = token_ids(4, 2, 9)
    moe_infer.wrap(moved)
    moved.to(torch.bfloat16)
    reference.to(torch.bfloat16)
    expected = _logits(reference, ids)
    torch.testing.assert_close(_logits(moved, ids), expected, **TOLERANCE[torch.bfloat16])
    moe_infer.unwrap(moved)
    assert torch.equal(_logits(moved, ids), expected)


# ---------------------------------------------------------------------------------------- generate


PROMPTS = {
    "one_prompt": lambda: (token_ids(5, 1, 7), torch.ones(1, 7, dtype=torch.long)),
    "left_padded_batch": lambda: left_padded(6, (4, 11, 7)),  # three lengths, attention mask
}


@pytest.mark.parametrize("prompts", PROMPTS)
@families
def test_greedy_generate(tiny_model, name, prompts):
    model = tiny_model(name)
    ids, mask = PROMPTS[prompts]()
    settings = dict(attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=PAD_TOKEN_ID)
    expected = model.generate(ids, **settings)
    with wrapped(model):
        got = model.generate(ids, **settings)
    assert expected.shape == (ids.shape[0], ids.shape[1] + NEW_TOKENS)
    assert torch.equal(got, expected)


@families
def test_sampling_generate_with_a_fixed_seed(tiny_model, name):
    model = tiny_model(name)
    prompt = token_ids(7, 2, 5)
    settings = dict(max_new_tokens=16, do_sample=True, temperature=1.0, top_k=0, pad_token_id=PAD_TOKEN_ID)
    torch.manual_seed(1234)
    expected = model.generate(prompt, **settings)
    with wrapped(model):
        torch.manual_seed(1234)
        got = model.generate(prompt, **settings)
    torch.manual_seed(4321)
    other_seed = model.generate(prompt, **settings)
    assert torch.equal(got, expected)
    assert not torch.equal(other_seed, expected), "sampling does not depend on the seed: the test would be void"


# ------------------------------------------------------------------------------ output_router_logits


@pytest.mark.parametrize("wrapped_first", [False, True], ids=["hooks_before_wrap", "hooks_while_wrapped"])
@families
def test_output_router_logits_and_aux_loss(name, wrapped_first):
    """transformers installs its router-logit hooks on the first call that asks for them; the
    wrapped model must feed them whether they were installed before or after `wrap`."""
    spec = TINY_MODELS[name]
    model = build(name, 0)
    ids = token_ids(8, 2, 9)

    def run():
        with torch.no_grad():
            return model(ids, output_router_logits=True)

    if wrapped_first:
        with wrapped(model):
            got = run()
        expected = run()
    else:
        expected = run()
        with wrapped(model):
            got = run()
    assert len(expected.router_logits) == len(spec.moe_layers)
    assert len(got.router_logits) == len(expected.router_logits)
    for got_logits, expected_logits in zip(got.router_logits, expected.router_logits):
        assert got_logits.dtype == expected_logits.dtype
        torch.testing.assert_close(got_logits, expected_logits, rtol=1e-6, atol=0)
    assert (expected.aux_loss is not None) == spec.aux_loss
    if spec.aux_loss:
        torch.testing.assert_close(got.aux_loss, expected.aux_loss, rtol=1e-6, atol=0)
    else:
        assert got.aux_loss is None
    torch.testing.assert_close(got.logits, expected.logits, **TOLERANCE[torch.float32])


# ---------------------------------------------------------------------- wrap, rewrap, unwrap, layers


@families
def test_wrap_twice_then_unwrap_is_bit_exact(name):
    model = build(name, 0)
    ids = token_ids(9, 2, 13)
    before = _logits(model, ids)
    modules_before = _modules(model)
    state_before = model.state_dict()
    num_params = len(list(model.parameters()))

    moe_infer.wrap(model)
    ex = moe_infer.executor(model)
    state_wrapped = model.state_dict()
    assert list(state_wrapped) == list(state_before)
    assert all(state_wrapped[key].data_ptr() == state_before[key].data_ptr() for key in state_before)
    assert len(list(model.parameters())) == num_params
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    assert len(layers) == len(TINY_MODELS[name].moe_layers)

    moe_infer.wrap(model, kernel="torch")  # reconfigures, does not wrap the MoELayers again
    assert moe_infer.executor(model) is ex
    assert ex.config.kernel == "torch"
    assert [m for m in model.modules() if isinstance(m, MoELayer)] == layers
    assert not any(isinstance(sub, MoELayer) for layer in layers for sub in layer.modules() if sub is not layer)
    torch.testing.assert_close(_logits(model, ids), before, **TOLERANCE[torch.float32])

    moe_infer.unwrap(model)
    assert not moe_infer.is_wrapped(model)
    assert _modules(model) == modules_before
    assert list(model.state_dict()) == list(state_before)
    assert torch.equal(_logits(model, ids), before)


@families
def test_dense_layers_are_left_alone(tiny_model, name):
    spec = TINY_MODELS[name]
    model = tiny_model(name)
    modules_before = _modules(model)
    with wrapped(model):
        layers = {mod_name: m for mod_name, m in model.named_modules() if isinstance(m, MoELayer)}
        assert len(layers) == len(spec.moe_layers)
        assert moe_infer.executor(model).moe_layer_indices == list(spec.moe_layers)
        assert sorted(layer.layer_idx for layer in layers.values()) == list(spec.moe_layers)
        # everything outside the replaced blocks is the same object as before (dense MLPs included)
        for mod_name, module_id in _modules(model).items():
            if mod_name not in layers and not any(mod_name.startswith(block + ".") for block in layers):
                assert modules_before.get(mod_name) == module_id, f"{mod_name} was replaced"


@families
def test_stats_count_tokens_and_expert_activations(tiny_model, name):
    spec = TINY_MODELS[name]
    model = tiny_model(name)
    batch, seq = 3, 11
    with wrapped(model):
        _logits(model, token_ids(10, batch, seq))
        stats = moe_infer.executor(model).stats()
    tokens = batch * seq
    assert stats["tokens"] == tokens and stats["calls"] == 1
    assert sorted(stats["layers"]) == list(spec.moe_layers)
    for layer_stats in stats["layers"].values():
        assert layer_stats["tokens"] == tokens
        assert sum(layer_stats["expert_counts"]) == tokens * spec.top_k
    assert stats["expert_activations"] == tokens * spec.top_k * len(spec.moe_layers)


# --------------------------------------------------------------------------------------- bad inputs


def _assert_untouched(model, modules_before, ids, logits_before):
    assert not moe_infer.is_wrapped(model)
    assert _modules(model) == modules_before
    assert not any(isinstance(m, MoELayer) for m in model.modules())
    assert torch.equal(_logits(model, ids), logits_before)


def test_model_without_moe_blocks_is_refused():
    model = build("llama", 0)
    ids = token_ids(11, 2, 7)
    modules_before, logits_before = _modules(model), _logits(model, ids)
    with pytest.raises(moe_infer.UnsupportedModel, match="no sparse MoE block") as err:
        moe_infer.wrap(model)
    assert isinstance(err.value, ValueError)
    _assert_untouched(model, modules_before, ids, logits_before)


@pytest.mark.parametrize("name", [name for name, spec in OTHER_MODELS.items() if spec.block_class])
def test_unsupported_moe_family_is_refused(name):
    model = build(name, 0)
    ids = token_ids(12, 2, 7)
    modules_before, logits_before = _modules(model), _logits(model, ids)
    with pytest.raises(moe_infer.UnsupportedModel) as err:
        moe_infer.wrap(model)
    message = str(err.value)
    assert OTHER_MODELS[name].block_class in message
    assert "not supported" in message
    for family in moe_infer.supported_families():
        assert family in message
    _assert_untouched(model, modules_before, ids, logits_before)


@pytest.mark.parametrize(
    "fields, error, field_name",
    [
        (dict(kernel="cuda"), ValueError, "kernel"),  # not a kernel name
        (dict(gpu_memory="lots"), ValueError, "gpu_memory"),  # not a size
        (dict(foo=1), TypeError, "foo"),  # not a MoEConfig field
    ],
    ids=["kernel", "gpu_memory", "unknown_field"],
)
def test_bad_config_value_leaves_model_untouched(tiny_model, fields, error, field_name):
    model = tiny_model("mixtral")
    ids = token_ids(13, 2, 7)
    modules_before, logits_before = _modules(model), _logits(model, ids)
    with pytest.raises(error, match=field_name):
        moe_infer.wrap(model, **fields)
    _assert_untouched(model, modules_before, ids, logits_before)
    # on a wrapped model the bad value must leave the current configuration in place
    with wrapped(model, kernel="torch"):
        ex = moe_infer.executor(model)
        with pytest.raises(error, match=field_name):
            moe_infer.wrap(model, **fields)
        assert moe_infer.executor(model) is ex and ex.config.kernel == "torch"
