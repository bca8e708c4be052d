"""`MoELayer`: the executor of one sparse MoE block, put in the block's place by `wrap`.

Data flow of `forward`, one seam: route (router adapter, or a replayed trace) -> notify the
router's hooks and the routing observers (profiler, predictors, schedulers) -> the layer's runner
(`moe_infer.runners`: resident, cached, parallel or quantized, chosen by the executor when the model
is (re)configured) groups the (token, k) pairs by expert, acquires and computes every used expert
once on its rows, and combines in the original token order -> plus the shared experts. The layer
registers the original block's children under their own names, so
parameter names, `state_dict`, `.to()` and `output_router_logits` hooks are those of the
unwrapped model; the original block is kept aside (not as a submodule) for `unwrap`.

Shape legend: T tokens, H hidden, E experts, K top-k.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from moe_infer.experts.layout import ModuleExperts
from moe_infer.families import FoundBlock
from moe_infer.routing.adapters import Routing
from moe_infer.runners import ResidentRunner

if TYPE_CHECKING:
    from moe_infer.executor import ModelExecutor


class LayerStats:
    """Counters of one layer, kept on the host (the torch path's grouping already synchronises once
    per call); the fused path leaves its counts on the device until they are read (`flush`)."""

    PENDING_LIMIT = 256  # calls whose counts may wait on the device before one bulk read

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.reset()

    def reset(self) -> None:
        self.calls = 0
        self.tokens = 0
        self.expert_counts = [0] * self.num_experts  # (token, k) pairs routed to each expert
        self.expert_loads = 0  # experts acquired: one per expert used per call
        self.kernel_calls: dict[str, int] = {}  # calls per kernel that computed them ("torch", "triton")
        self._pending: list[Tensor] = []  # per-call counts [E] not read back yet

    def record(self, num_tokens: int, counts: list[int], kernel: str) -> None:
        self.calls += 1
        self.tokens += num_tokens
        self.kernel_calls[kernel] = self.kernel_calls.get(kernel, 0) + 1
        self._add_counts(counts)

    def record_on_device(self, num_tokens: int, counts: Tensor) -> None:
        """`record` with counts [E] still on the device: the forward pass does not wait for them
        (the fused kernels' path, the only one that does not read them)."""
        self.calls += 1
        self.kernel_calls["triton"] = self.kernel_calls.get("triton", 0) + 1
        self.tokens += num_tokens
        self._pending.append(counts)
        if len(self._pending) >= self.PENDING_LIMIT:
            self.flush()

    def flush(self) -> None:
        """Read the pending device counts back (one host sync for all of them)."""
        pending, self._pending = self._pending, []
        for counts in torch.stack(pending).tolist() if pending else []:
            self._add_counts(counts)

    def _add_counts(self, counts: list[int]) -> None:
        self.expert_counts = [a + b for a, b in zip(self.expert_counts, counts)]
        self.expert_loads += sum(1 for c in counts if c)


class MoELayer(nn.Module):
    def __init__(self, found: FoundBlock, hidden_act: str | None):
        super().__init__()
        block = found.module
        # not a submodule: the original block is restored by unwrap, and must not be saved twice
        object.__setattr__(self, "original", block)
        for name, child in block.named_children():
            self.add_module(name, child)
        for name, param in block.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buffer in block.named_buffers(recurse=False):
            self.register_buffer(name, buffer, persistent=name not in block._non_persistent_buffers_set)

        self.block_name = found.name
        self.layer_idx = found.layer_idx
        self.family = found.spec.family
        self.router_attr = found.router_attr
        self._shared = found.shared
        self._returns_router_scores = found.spec.returns_router_scores
        self._router_args = found.spec.router_args
        self.expert_source = ModuleExperts.from_module(block.experts, hidden_act)
        self.num_experts = self.expert_source.num_experts
        self.adapter = found.spec.build_adapter(getattr(block, found.router_attr), self._block_attr, self.num_experts)
        self.stats = LayerStats(self.num_experts)
        self.executor: ModelExecutor | None = None  # set by the ModelExecutor that owns this layer
        # callables (layer, hidden [T, H], routing) run after routing: profilers, predictors
        self.routing_observers: list = []
        # moe_infer.distributed.parallel.ParallelExperts when MoEConfig.parallel is set: the experts run across ranks
        self.parallel = None
        self.replay = None  # moe_infer.cache.replay.RoutingReplay: MoEConfig.routing_override, set by the executor
        self.runner = ResidentRunner()  # how the routed experts are computed (moe_infer.runners), set by the executor
        self.train(block.training)

    # -- the block's own state, wherever it lives now (buffers on self follow .to(); the rest on the original)
    def _block_attr(self, name: str):
        if name in self._parameters or name in self._buffers or name in self._modules:
            return getattr(self, name)
        return getattr(self.original, name)

    @property
    def router(self) -> nn.Module:
        # through _modules: for blocks whose router child is itself named `router` (GPT-OSS, Granite,
        # PhiMoE, Jamba), getattr(self, "router") would find this property again
        return self._modules[self.router_attr]

    def family_router_output(self, hidden: Tensor) -> tuple:
        """What the family's own router module returns for `hidden` [T, H] (for verification)."""
        return self.router(hidden, *self._router_args(self._block_attr))

    @property
    def hidden_size(self) -> int:
        return self.expert_source.hidden_size

    def route(self, hidden: Tensor) -> Routing:
        return self.adapter.route(hidden)

    def shared_output(self, hidden: Tensor) -> Tensor | None:
        """The shared experts' part of this block's output for `hidden` [T, H], or None if it has none."""
        return None if self._shared is None else self._shared(self, hidden)

    def forward(self, hidden_states: Tensor, *args, **kwargs):
        if self.training:
            # moe_infer is for inference; training keeps the family's exact semantics (jitter, sampling)
            self._sync_original()
            self.original.train(True)
            return self.original(hidden_states, *args, **kwargs)
        shape = hidden_states.shape
        hidden = hidden_states.reshape(-1, shape[-1])  # [T, H]
        routing = self.route(hidden)
        if self.replay is not None:
            routing = self.replay.apply(self.layer_idx, routing)
        self._feed_router_hooks(hidden, routing)
        for observer in self.routing_observers:
            observer(self, hidden, routing)
        out = self.runner(self, hidden, routing)  # plan -> acquire -> compute -> combine
        shared = self.shared_output(hidden)
        if shared is not None:
            out = out + shared
        out = out.reshape(shape)
        if self._returns_router_scores:
            return out, routing.expert_weights
        return out

    def _feed_router_hooks(self, hidden: Tensor, routing: Routing) -> None:
        """Run the router module's forward hooks as if it had been called: `transformers`
        records `output_router_logits` with such hooks."""
        router = self.router
        if not router._forward_hooks:
            return
        output = self.adapter.router_output(routing)
        for hook_id, hook in list(router._forward_hooks.items()):
            if hook_id in router._forward_hooks_with_kwargs:
                hook(router, (hidden,), {}, output)
            else:
                hook(router, (hidden,), output)

    def _sync_original(self) -> None:
        """Point the original block at this layer's current block-level tensors (they may have been
        replaced by `.to()`, `.half()`, ... since wrapping)."""
        for name, param in self._parameters.items():
            self.original._parameters[name] = param
        for name, buffer in self._buffers.items():
            self.original._buffers[name] = buffer

    def restore(self) -> nn.Module:
        """The original block, holding the current tensors; used by unwrap."""
        self._sync_original()
        self.original.train(self.training)
        return self.original

    def extra_repr(self) -> str:
        return (f"layer={self.layer_idx}, family={self.family}, experts={self.num_experts}, "
                f"top_k={self.adapter.top_k}, router={self.adapter.name}, runner={self.runner.name}")
