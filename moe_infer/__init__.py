"""moe_infer: Mixture-of-Experts inference for Hugging Face `transformers` models.

    import moe_infer
    model = moe_infer.wrap(hf_model)      # same outputs, MoE layers run by moe_infer
    moe_infer.executor(model).stats()     # tokens and expert activations per layer
    moe_infer.unwrap(model)               # the original blocks back, bit-exact
    moe_infer.generate_many(model, prompts, max_batch_size=8)   # expert-aware micro-batching
    moe_infer.placement.plan(trace, num_devices=4)              # experts on devices from a trace
"""

__version__ = "0.1.0"

from moe_infer import placement
from moe_infer.api import executor, is_wrapped, load, unwrap, wrap
from moe_infer.batching import generate_many
from moe_infer.config import MoEConfig
from moe_infer.families import UnsupportedModel, supported_families
from moe_infer.trace import Trace

__all__ = ["MoEConfig", "Trace", "UnsupportedModel", "executor", "generate_many", "is_wrapped", "load", "placement",
           "supported_families", "unwrap", "wrap"]
