"""MoEConfig validation, byte budgets, and what wrap does with fields this machine cannot run."""

import pytest
import torch

import moe_infer
from moe_infer.config import MoEConfig, parse_bytes


@pytest.mark.parametrize("text, expected", [
    ("20GiB", 20 * 2**30),
    ("512MB", 512 * 10**6),
    ("1.5 gib", int(1.5 * 2**30)),
    ("4096", 4096),
    (123, 123),
])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["20GiB", "3MIB", "7kib", "512MB", "5GB", "64KB", "1mB"])
def test_parse_bytes_agrees_with_transformers_where_both_read_bytes(text):
    """transformers.utils.hub.convert_file_size_to_int reads the same units the same way (KiB = 2**10,
    KB = 10**3); ours also takes decimals, TB / TiB, plain byte counts and spaces, and reads a
    lower-case "b" as bytes where transformers reads "5Gb" as bits."""
    from transformers.utils.hub import convert_file_size_to_int

    assert parse_bytes(text) == convert_file_size_to_int(text)
    assert convert_file_size_to_int("8Mb") == 10**6 and parse_bytes("8Mb") == 8 * 10**6  # bits there, bytes here


@pytest.mark.parametrize("bad", ["lots", "-1GiB", "0", 0, -5, True, "12 parsecs", 1.5])
def test_parse_bytes_rejects(bad):
    with pytest.raises(ValueError, match="value="):
        parse_bytes(bad)


def test_defaults_and_budget_strings_are_normalised():
    config = MoEConfig(gpu_memory="2GiB")
    assert config.gpu_memory == 2 * 2**30
    assert MoEConfig().kernel == "auto"


@pytest.mark.parametrize("field, value, message", [
    ("kernel", "cuda", "MoEConfig.kernel='cuda': allowed values are 'auto', 'triton', 'torch'"),
    ("gpu_memory", "lots", "MoEConfig.gpu_memory='lots'"),
    ("cache_policy", "belady", "only in moe_infer.cache.simulate"),
    ("cache_policy", "fifo", "MoEConfig.cache_policy='fifo'"),
    ("predictor", "/no/such/predictor.safetensors", "MoEConfig.predictor="),
    ("predictor", "markov", "a markov predictor must be trained first"),
    ("predictor", "expertflow", "what works here: None, 'gate-lookahead' (no training), or the path of a saved"),
    ("predictor", "pregate", "moe-infer predictor train --kind pregate"),
    ("prefetch_depth", -1, "MoEConfig.prefetch_depth=-1"),
    ("prefetch_depth", True, "MoEConfig.prefetch_depth=True"),
    ("loader", "rings", "MoEConfig.loader='rings'"),
    ("cpu_compute", "sometimes", "MoEConfig.cpu_compute='sometimes'"),
    ("token_scheduling", "yes", "MoEConfig.token_scheduling='yes'"),
    ("placement", "/no/such/plan", "no such file"),
    ("parallel", -2, "MoEConfig.parallel=-2"),
    ("parallel", "dp", "MoEConfig.parallel='dp'"),
])
def test_bad_values_name_field_value_and_allowed(field, value, message):
    with pytest.raises(ValueError) as err:
        MoEConfig(**{field: value})
    assert message in str(err.value)


def test_replace_validates_and_rejects_unknown_fields():
    config = MoEConfig()
    assert config.replace(kernel="torch").kernel == "torch"
    with pytest.raises(ValueError, match="kernel"):
        config.replace(kernel="nope")
    with pytest.raises(TypeError, match="unknown MoEConfig field"):
        config.replace(gpu_mem="1GiB")


def _tiny_mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    return MixtralForCausalLM(config).eval()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_triton_kernel_without_cuda_or_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = _tiny_mixtral()
    with pytest.raises(NotImplementedError, match="kernel='triton' .the fused Triton kernels need a CUDA device, "
                                                  "or TRITON_INTERPRET=1"):
        moe_infer.wrap(model, kernel="triton")
    assert not moe_infer.is_wrapped(model)


def test_token_scheduling_changes_no_forward_call():
    """The field only picks generate_many's (and the server's) default scheduler (tests/test_batching.py);
    a forward call and model.generate compute what they did without it."""
    model = _tiny_mixtral()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    moe_infer.wrap(model)
    with torch.no_grad():
        logits = model(ids).logits
        tokens = model.generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
    moe_infer.wrap(model, token_scheduling=True)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits)
        assert torch.equal(model.generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0), tokens)


def test_rewrap_reconfigures_keeping_other_fields():
    model = _tiny_mixtral()
    moe_infer.wrap(model, kernel="torch")
    ex = moe_infer.executor(model)
    moe_infer.wrap(model, cpu_compute="auto")
    assert moe_infer.executor(model) is ex
    assert ex.config.kernel == "torch"
    moe_infer.wrap(model, moe_infer.MoEConfig())
    assert ex.config.kernel == "auto"
    with pytest.raises(ValueError, match="runs on cpu"):
        moe_infer.wrap(model, gpu_memory="1GiB")  # a GPU budget on a CPU model
    assert ex.config.kernel == "auto"  # a refused reconfiguration keeps the old one


def test_wrap_rejects_non_modules_and_wrong_config_type():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        moe_infer.wrap("mixtral")
    with pytest.raises(TypeError, match="MoEConfig"):
        moe_infer.wrap(_tiny_mixtral(), {"kernel": "torch"})


def test_executor_of_unwrapped_model_is_a_clear_error():
    with pytest.raises(ValueError, match="not wrapped"):
        moe_infer.executor(_tiny_mixtral())
