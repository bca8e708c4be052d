"""The MoE blocks of a model as the predictors read them, whether the model is wrapped or not.

What a predictor needs of an MoE block is its place (``block_name``, ``layer_idx``), its router as
a ``moe_infer.routing`` adapter (``route``), its shared experts (``shared_output``) and its sizes.
``MoELayer`` has all of these. ``moe_blocks(model)`` returns the executor's layers for a wrapped
model and, for a plain ``transformers`` model, one ``BlockView`` per block that
``moe_infer.families.find_moe_blocks`` finds, built the way ``MoELayer`` builds its adapter, so
routing through either gives the same ``Routing``. Nothing here wraps or changes the model: the
predictors' offline paths (``features.model_features``, the ``gate-lookahead`` predictor) run the
model as it is, and so stay below ``moe_infer.api``.

Shape legend: T tokens, H hidden size.
"""

from __future__ import annotations

from torch import Tensor, nn

from moe_infer.experts.layout import ModuleExperts
from moe_infer.families import FoundBlock, find_moe_blocks
from moe_infer.routing.adapters import Routing
from moe_infer.wrapped import executor_of


class BlockView:
    """One MoE block of an unwrapped model: the attributes of ``MoELayer`` that predictors read."""

    def __init__(self, found: FoundBlock):
        self.module = found.module
        self.block_name = found.name
        self.layer_idx = found.layer_idx
        self._shared = found.shared
        # the experts' layout gives the sizes (and is checked as wrap checks it); a view never
        # computes experts, so the activation is not needed
        experts = ModuleExperts.from_module(found.module.experts, None)
        self.num_experts = experts.num_experts
        self.hidden_size = experts.hidden_size
        self.router: nn.Module = getattr(found.module, found.router_attr)
        self.adapter = found.spec.build_adapter(self.router, lambda name: getattr(found.module, name),
                                                self.num_experts)

    def route(self, hidden: Tensor) -> Routing:
        """The block's routing of ``hidden`` [T, H] (``MoELayer.route``)."""
        return self.adapter.route(hidden)

    def shared_output(self, hidden: Tensor) -> Tensor | None:
        """The shared experts' part of the block's output for ``hidden`` [T, H], or None."""
        return None if self._shared is None else self._shared(self.module, hidden)

    def named_parameters(self, *args, **kwargs):
        return self.module.named_parameters(*args, **kwargs)


def moe_blocks(model: nn.Module) -> list:
    """The MoE blocks of ``model`` in module order: its executor's ``MoELayer`` objects if it is
    wrapped, else a ``BlockView`` of each (``UnsupportedModel`` if it has none)."""
    executor = executor_of(model)
    if executor is not None:
        return list(executor.layers)
    return [BlockView(found) for found in find_moe_blocks(model)]
