"""One rank of the multi-process tests of `moe_infer.distributed.parallel`, started the way users start jobs:

    python -m torch.distributed.run --standalone --nproc-per-node N tests/parallel_worker.py --out DIR
    deepspeed --num_gpus N tests/parallel_worker.py --out DIR          (CPU: deepspeed --num_nodes 1 ...)

Every rank builds the same tiny models from the same seed, wraps one copy with `parallel` and keeps
one copy wrapped without it (the single-process reference), runs its own inputs (a different
number of tokens per rank) through both, and writes the largest differences to DIR/rank{R}.json;
the test asserts on them. `--fail crash|hang` makes rank 1 raise, or stall, after wrapping, to
check that the other ranks fail with a clear error instead of hanging.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import moe_infer  # noqa: E402
from moe_infer.experts.math import moe_forward  # noqa: E402
from moe_infer.experts.layout import ModuleExperts  # noqa: E402
from moe_infer.distributed.group import ParallelError, init_distributed, launched_by_deepspeed  # noqa: E402
from moe_infer.distributed.parallel import build_runtime  # noqa: E402


class TinyExperts(torch.nn.Module):
    """A transformers-style experts module: 4 experts, hidden 16, intermediate 8."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.gate_up_proj = torch.nn.Parameter(torch.randn(4, 16, 16, generator=generator) / 4)
        self.down_proj = torch.nn.Parameter(torch.randn(4, 16, 8, generator=generator) / 3)


class ReversedPlan:
    """A placement plan that puts expert e on rank (E - 1 - e) * W // E (the opposite of the default)."""

    def __init__(self, num_experts: int, world_size: int):
        self.num_experts, self.num_devices = num_experts, world_size

    def device_of(self, layer_idx: int, expert: int) -> int:
        return (self.num_experts - 1 - expert) * self.num_devices // self.num_experts


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def expert_storage_bytes(model: torch.nn.Module) -> int:
    """Bytes of the storages behind every experts module's gate_up_proj and down_proj (a view of a
    larger tensor counts the whole storage it keeps alive)."""
    return sum(param.untyped_storage().nbytes() for module in model.modules() if hasattr(module, "gate_up_proj")
               for param in (module.gate_up_proj, module.down_proj))


def reversed_plan(moe_layers: list[int], num_experts: int, world: int):
    """ReversedPlan as a `moe_infer.distributed.placement.PlacementPlan` (what MoEConfig.placement loads)."""
    from moe_infer.distributed.placement import PlacementPlan

    plan = ReversedPlan(num_experts, world)
    devices = torch.tensor([[plan.device_of(0, e) for e in range(num_experts)] for _ in moe_layers]).numpy()
    holds = torch.nn.functional.one_hot(torch.from_numpy(devices), world).bool().numpy()
    return PlacementPlan(devices, holds, tuple(moe_layers), world, capacity=num_experts, method="reversed")


def model_checks(name: str, rank: int, world: int, results: list, out_dir: str) -> None:
    import tiny_models
    reference = moe_infer.wrap(tiny_models.build(name, seed=0))
    model = moe_infer.wrap(tiny_models.build(name, seed=0), parallel="tp")
    ex = moe_infer.executor(model)
    # each rank holds 1/W of the expert weights; the reference holds them all
    full_bytes = expert_storage_bytes(reference)
    results.append({"check": f"{name} expert bytes", "r": "tp",
                    "err": float(abs(expert_storage_bytes(model) * world - full_bytes)), "bytes": full_bytes})
    ids = tiny_models.token_ids(100 + rank, 2, 3 + 2 * rank)  # a different token count on every rank
    with torch.no_grad():
        expected = reference(ids).logits
        rs = [0] + [r for r in range(1, world + 1) if world % r == 0]
        # every r, then switches between calls in an order that differs from the sorted one
        sequence = rs + ["ep", "tp", "auto"] + rs[::-1] + ["auto", 1, 0]
        for r in sequence:
            ex.set_parallelism(r)
            results.append({"check": f"{name} logits", "r": r, "err": max_err(model(ids).logits, expected)})
        ex.set_parallelism("auto")
        generated = model.generate(ids, max_new_tokens=3, do_sample=False)
        reference_generated = reference.generate(ids, max_new_tokens=3, do_sample=False)
        results.append({"check": f"{name} generate auto", "r": "auto",
                        "err": float((generated != reference_generated).sum())})
    stats = ex.stats()["parallel"]
    results.append({"check": f"{name} stats", "stats": {k: stats[k] for k in (
        "world_size", "setting", "last_r", "calls_by_r", "bytes_sent", "token_bytes_sent", "weight_bytes_sent")},
        "r": "auto", "err": 0.0 if stats["per_call"] and all("r" in c for c in stats["per_call"]) else 1.0})
    # unwrap gathers the full weights back: bit-exact against a fresh build, outputs of the original model
    moe_infer.unwrap(model)
    fresh = tiny_models.build(name, seed=0).state_dict()
    restored = model.state_dict()
    same = restored.keys() == fresh.keys() and all(torch.equal(restored[k], fresh[k]) for k in fresh)
    results.append({"check": f"{name} unwrap", "r": None, "err": 0.0 if same else 1.0,
                    "bytes": expert_storage_bytes(model)})
    with torch.no_grad():
        results.append({"check": f"{name} unwrapped logits", "r": None, "err": max_err(model(ids).logits, expected)})

    # wrapped again, with a saved plan as MoEConfig.placement: each expert runs on its planned rank
    plan_path = os.path.join(out_dir, f"plan.{name}.{rank}.safetensors")
    reversed_plan(ex.moe_layer_indices, ex.layers[0].num_experts, world).save(plan_path)
    moe_infer.wrap(model, parallel=1, placement=plan_path)
    ex = moe_infer.executor(model)
    assert ex.parallel.placement is ex.placement and ex.placement.num_devices == world
    with torch.no_grad():
        results.append({"check": f"{name} logits, MoEConfig.placement", "r": 1,
                        "err": max_err(model(ids).logits, expected)})
    moe_infer.wrap(model, parallel=None)  # leaves the parallel path: the full weights gathered back
    with torch.no_grad():
        results.append({"check": f"{name} parallel=None", "r": None, "err": max_err(model(ids).logits, expected),
                        "bytes": expert_storage_bytes(model)})


class CopiedExperts:
    """An expert source that is not an in-memory experts module (as a converted checkpoint's store
    is not): returns copies, so `build_runtime` cuts the slices into a holder of its own."""

    def __init__(self, source: ModuleExperts):
        self.source = source
        for name in ("num_experts", "hidden_size", "intermediate_size", "activation", "device"):
            setattr(self, name, getattr(source, name))

    def __call__(self, e: int):
        return self.source(e).canonical()


def tiny_layer(setting) -> SimpleNamespace:
    """One MoE layer's experts without transformers (importing it costs seconds per process):
    `layer.parallel` is attached by `build_runtime`, as `wrap` does for a model's layers; `full`
    is the reference (the model checks cover experts modules cut in place)."""
    full = ModuleExperts(TinyExperts(), silu_gate)
    layer = SimpleNamespace(layer_idx=0, expert_source=CopiedExperts(full), top_k=2, full=full)
    build_runtime([layer], setting)
    assert layer.expert_source.source is full and tuple(full.module.down_proj.shape) == (4, 16, 8)  # uncut
    return layer


def silu_gate(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate) * up


def model_layer(name: str) -> SimpleNamespace:
    import tiny_models

    ex = moe_infer.executor(moe_infer.wrap(tiny_models.build(name, seed=0), parallel="ep"))
    layer = ex.layers[0]
    full = moe_infer.executor(moe_infer.wrap(tiny_models.build(name, seed=0))).layer(layer.layer_idx).expert_source
    # the layer's experts module was cut in place: its source reads this rank's slice
    assert layer.expert_source.intermediate_size * torch.distributed.get_world_size() == full.intermediate_size
    return SimpleNamespace(layer_idx=layer.layer_idx, expert_source=layer.expert_source, top_k=layer.adapter.top_k,
                           parallel=layer.parallel, full=full)


def layer_checks(layer: SimpleNamespace, rank: int, world: int, results: list) -> None:
    """Uneven routing, empty ranks, a placement plan and the capacity factor, at the layer level."""
    runtime = layer.parallel.runtime
    source = layer.full  # the full experts (layer.expert_source may hold this rank's slice only)
    num_experts = source.num_experts
    rs = [0] + [r for r in range(1, world + 1) if world % r == 0]
    generator = torch.Generator().manual_seed(7 + rank)
    tokens = 0 if rank == world - 1 else 5 + 3 * rank  # the last rank has no tokens at all
    hidden = torch.randn(tokens, source.hidden_size, generator=generator)
    top_k = layer.top_k
    weights = torch.rand(tokens, top_k, generator=generator)
    cases = {
        "all tokens to expert 0": torch.zeros(tokens, top_k, dtype=torch.long),
        "all tokens to the last expert": torch.full((tokens, top_k), num_experts - 1, dtype=torch.long),
        "random": torch.randint(0, num_experts, (tokens, top_k), generator=generator),
    }
    with torch.no_grad():
        for placement in (None, ReversedPlan(num_experts, world)):
            for case, ids in cases.items():
                expected = moe_forward(hidden, ids, weights, source, num_experts, source.activation)
                for r in rs:
                    runtime.set(r, placement=placement)
                    got = layer.parallel(hidden, ids, weights)
                    results.append({"check": f"{case}, plan={placement is not None}", "r": r,
                                    "err": max_err(got, expected)})
                    if r == 1 and case == "all tokens to expert 0" and placement is not None:
                        # expert 0 is computed on its planned rank, which therefore sends no dispatch rows
                        # and returns every other rank's rows; every other rank sends its own rows
                        row_bytes = source.hidden_size * hidden.element_size()
                        sent = runtime.stats()["per_call"][-1]["token_bytes"]
                        total_pairs = top_k * sum(0 if q == world - 1 else 5 + 3 * q for q in range(world))
                        own = top_k * tokens
                        planned = placement.device_of(layer.layer_idx, 0)
                        want = (total_pairs - own) * row_bytes if rank == planned else own * row_bytes
                        results.append({"check": "expert 0 runs on its planned rank", "r": r,
                                        "err": float(abs(sent - want))})

        # capacity factor: the first C pairs of each (rank, expert) are kept, the same for every r
        ids = cases["all tokens to expert 0"]
        max_tokens = max(0 if q == world - 1 else 5 + 3 * q for q in range(world))
        for factor in (1.0, 4.0):
            capacity = max(1, math.ceil(factor * max_tokens * top_k / num_experts))
            flat = ids.reshape(-1)
            position = torch.tensor([int((flat[:i] == flat[i]).sum()) for i in range(flat.numel())], dtype=torch.long)
            kept = torch.where(position < capacity, flat, torch.full_like(flat, -1)).view_as(ids)
            expected = moe_forward(hidden, kept, weights, source, num_experts, source.activation)
            for r in rs:
                runtime.set(r, capacity_factor=factor)
                results.append({"check": f"capacity factor {factor}", "r": r,
                                "err": max_err(layer.parallel(hidden, ids, weights), expected)})


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--models", default="mixtral",
                        help="tiny_models names (the first also gives the layer checks' experts), or 'none': "
                             "layer checks on a small experts module, without transformers")
    parser.add_argument("--fail", choices=("none", "crash", "hang"), default="none")
    parser.add_argument("--timeout", type=float, default=90.0,
                        help="process-group timeout (s); generous: ranks may lag each other on a loaded machine")
    parser.add_argument("--local_rank", type=int, default=None)  # passed by the deepspeed launcher
    args = parser.parse_args()
    torch.set_num_threads(1)
    rank, world = init_distributed(backend="gloo", timeout=datetime.timedelta(seconds=args.timeout))
    with open(os.path.join(args.out, f"pid.{rank}"), "w") as f:
        f.write(str(os.getpid()))
    results: list = []
    try:
        if args.fail != "none":
            layer = tiny_layer("ep")
            if rank == 1:
                if args.fail == "crash":
                    raise RuntimeError("injected failure on rank 1")
                time.sleep(3 * args.timeout)  # a stuck rank
            layer.parallel(torch.randn(4, 16), torch.randint(0, 4, (4, 2)), torch.rand(4, 2))
        else:
            names = [name for name in args.models.split(",") if name != "none"]
            for name in names:
                model_checks(name, rank, world, results, args.out)
            layer_checks(model_layer(names[0]) if names else tiny_layer("ep"), rank, world, results)
    except ParallelError as err:
        with open(os.path.join(args.out, f"error.{rank}"), "w") as f:
            f.write(str(err))
        raise
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        launcher = ("deepspeed" if launched_by_deepspeed() else
                    "torchrun" if "TORCHELASTIC_RUN_ID" in os.environ else "other")
        json.dump({"rank": rank, "world": world, "launcher": launcher, "results": results}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
