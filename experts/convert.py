"""The checkpoint converter: a Hugging Face MoE checkpoint -> the converted layout of DESIGN section 5.

Owns the conversion itself: streaming every tensor through (one source tensor, or one expert, in
memory at a time), casting and FP8 handling, the per-layer expert files with one contiguous byte
range per expert, checksums, the manifest, and the atomic publish (everything is written into
`DST.moe_infer-partial` and renamed to DST at the very end; a re-run removes a stale partial
directory and starts again). A destination that already holds the same conversion is left alone;
one that holds anything else is refused.

Shape legend: E experts, H hidden, I intermediate (per expert).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .fp8 import DEFAULT_BLOCK, dequantize, scale_shape
from .hub_layouts import INDEX_FILE, ConversionPlan, LayerPlan, SourceCheckpoint, plan_conversion
from .gptq_awq import ImportedSource, import_format_of
from .math import ExpertTensors
from .quant import DEFAULT_GROUP_SIZE, QuantizedWeight, QuantScheme, part_specs
from .quant import quantize as quantize_weight
from .skeleton import build_from_config
from .store import DENSE_FILE, FORMAT, FP8_METHOD, MANIFEST, dtype_name, load_manifest, parse_dtype, verify
from .tensorfile import FAST_HASH, CheckpointError, TensorWriter, fast_hasher
from moe_infer.errors import ConfigError

PARTIAL_SUFFIX = ".moe_infer-partial"
_PARTIAL_MARKER = ".moe_infer_partial"
FP8_MODES = ("dequantize", "keep")
# files of a source directory that are weights (never copied) rather than config / tokenizer files
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf")


@dataclass(frozen=True)
class ConvertOptions:
    dtype: torch.dtype | None = None  # cast floating weights; None keeps the source dtype (FP8 -> bfloat16)
    fp8: str = "dequantize"  # what to do with FP8 expert weights: "dequantize" or "keep" (with their scales)
    quantize: QuantScheme | None = None  # int8 / int4 routed experts (experts/quant.py); dense weights stay

    def __post_init__(self) -> None:
        if self.fp8 not in FP8_MODES:
            raise ConfigError(f"fp8={self.fp8!r}; allowed: {', '.join(FP8_MODES)}")
        if self.quantize is not None and self.fp8 == "keep":
            raise ConfigError("quantize and fp8='keep' exclude each other: FP8 experts are dequantized, then "
                              "quantized (leave fp8 at 'dequantize')")
        if self.dtype is not None and self.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ConfigError(f"dtype={self.dtype}; allowed: float32, float16, bfloat16 (or None to keep the source's)")

    def as_json(self) -> dict:
        options = {"dtype": None if self.dtype is None else dtype_name(self.dtype), "fp8": self.fp8}
        if self.quantize is not None:  # absent otherwise, so that earlier float conversions are still reused
            options["quantize"] = self.quantize.as_json()
        return options


def layer_file(layer_idx: int) -> str:
    return f"experts/layer_{layer_idx:03d}.safetensors"


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _build(source: SourceCheckpoint):
    """The meta-device skeleton of the source's model, its MoE blocks, and its config."""
    return build_from_config(source.root)


def _quant_block(config) -> tuple[int, int]:
    quant = getattr(config, "quantization_config", None)
    if isinstance(quant, dict):
        block = quant.get("weight_block_size")
    else:
        block = getattr(quant, "weight_block_size", None)
    return tuple(block) if block else DEFAULT_BLOCK


class _Converter:
    def __init__(self, source: SourceCheckpoint, plan: ConversionPlan, model, options: ConvertOptions,
                 fp8_block: tuple[int, int], progress: Callable[[int], None] | None):
        self.source, self.plan, self.options, self.fp8_block = source, plan, options, fp8_block
        self.progress = progress or (lambda nbytes: None)
        self.keep_fp32 = tuple(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
        fp8_layers = [p.layer_idx for p in plan.layers if p.fp8]
        self.keep_fp8 = bool(fp8_layers) and options.fp8 == "keep"
        self.compute_dtype = options.dtype or torch.bfloat16
        if self.keep_fp8:
            odd = [p.layer_idx for p in plan.layers if p.geometry.intermediate_size % fp8_block[0]]
            if odd:
                raise CheckpointError(f"{source.root}: fp8='keep' needs the expert intermediate size to be a multiple "
                                      f"of the scale block {fp8_block[0]} (layers {odd}); use fp8='dequantize'")

    # -- dtypes
    def _cast(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if self.options.dtype is None or not tensor.is_floating_point() or tensor.dtype.itemsize == 1:
            return tensor
        if any(pattern in name for pattern in self.keep_fp32):
            return tensor
        return tensor.to(self.options.dtype)

    def _dense_dtype(self, item) -> torch.dtype:
        spec = self.source.spec(item.key)
        if item.scale_key is not None:
            return self.compute_dtype
        if self.options.dtype is not None and spec.dtype.is_floating_point and spec.dtype.itemsize > 1 \
                and not any(p in item.target for p in self.keep_fp32):
            return self.options.dtype
        return spec.dtype

    # -- dense
    def write_dense(self, path: str) -> dict:
        specs = [(item.target, self._dense_dtype(item), self.source.spec(item.key).shape) for item in self.plan.dense]
        writer = TensorWriter(path, specs, {"format": "pt"})
        for item in self.plan.dense:
            tensor = self.source.read(item.key)
            if item.scale_key is not None:
                tensor = dequantize(tensor, self.source.read(item.scale_key), self.fp8_block, self.compute_dtype)
            writer.write(item.target, self._cast(item.target, tensor))
            del tensor  # before the next read: one source tensor in memory at a time
            self.progress(self.source.spec(item.key).nbytes)
        writer.close()
        entry = {"file": DENSE_FILE, "nbytes": os.path.getsize(path), "sha256": writer.sha256.hexdigest()}
        if writer.fast is not None:
            entry[FAST_HASH] = writer.fast.hexdigest()
        return entry

    # -- experts
    def _expert_specs(self, plan: LayerPlan, e: int) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        g = plan.geometry
        h, i = g.hidden_size, g.intermediate_size
        weight_dtype = self.expert_dtype(plan)
        if self.options.quantize is not None:
            specs = [(f"e{e}.{name}.{role}", dtype, shape) for name, (n, k) in (("w13", (2 * i, h)), ("w2", (h, i)))
                     for role, (dtype, shape) in part_specs(self.options.quantize, n, k).items()]
        else:
            specs = [(f"e{e}.w13", weight_dtype, (2 * i, h)), (f"e{e}.w2", weight_dtype, (h, i))]
        if g.has_bias:
            bias_dtype = self.options.dtype or self.source.spec(plan.fused["gate_up_proj_bias"]).dtype
            specs += [(f"e{e}.b13", bias_dtype, (2 * i,)), (f"e{e}.b2", bias_dtype, (h,))]
        if plan.fp8 and self.keep_fp8:
            specs += [(f"e{e}.w13_scale", torch.float32, scale_shape((2 * i, h), self.fp8_block)),
                      (f"e{e}.w2_scale", torch.float32, scale_shape((h, i), self.fp8_block))]
        return specs

    def expert_dtype(self, plan: LayerPlan) -> torch.dtype:
        if plan.fp8:
            return torch.float8_e4m3fn if self.keep_fp8 else self.compute_dtype
        key = plan.fused["gate_up_proj"] if plan.fused else plan.per_expert[0]["gate"]
        return self.options.dtype or self.source.spec(key).dtype

    def _expert_parts(self, plan: LayerPlan, e: int):
        """Expert e's tensors in file order as (kind, row block) pairs, canonical (gate rows then up
        rows; [out, in]) and in the output dtypes. Per-expert sources are read one projection at a
        time, so one source tensor is in memory, never the concatenated w13."""
        g = plan.geometry
        if plan.fused:
            rows = (e, e + 1)
            w13, w2 = self.source.read(plan.fused["gate_up_proj"], rows)[0], self.source.read(plan.fused["down_proj"], rows)[0]
            if g.transposed:
                w13, w2 = w13.t(), w2.t()
            b13 = self.source.read(plan.fused["gate_up_proj_bias"], rows)[0] if g.has_bias else None
            b2 = self.source.read(plan.fused["down_proj_bias"], rows)[0] if g.has_bias else None
            t = ExpertTensors(w13, w2, b13, b2, interleaved=g.interleaved).canonical()
            yield "w13", self._cast("w13", t.w13)
            yield "w2", self._cast("w2", t.w2)
            if g.has_bias:
                yield "b13", self._cast("b13", t.b13)
                yield "b2", self._cast("b2", t.b2)
            return
        roles = plan.per_expert[e]
        for kind, role in (("w13", "gate"), ("w13", "up"), ("w2", "down")):
            weight = self.source.read(roles[role])
            if plan.fp8 and not self.keep_fp8:
                weight = dequantize(weight, self.source.read(roles[role + "_scale"]), self.fp8_block, self.compute_dtype)
            yield kind, self._cast(kind, weight)
            del weight  # before the next read: one source tensor in memory at a time
        if plan.fp8 and self.keep_fp8:
            yield "w13_scale", self.source.read(roles["gate_scale"]).float()
            yield "w13_scale", self.source.read(roles["up_scale"]).float()
            yield "w2_scale", self.source.read(roles["down_scale"]).float()

    def _quantized_parts(self, plan: LayerPlan, e: int):
        """`_expert_parts` with w13 and w2 quantized (`--quantize`), in the file order of
        `manifest.QUANTIZED_TENSORS`: each row block is quantized as it arrives (rows are quantized
        independently, so gate and up rows give the same bytes as their concatenation), and only the
        quantized blocks wait for the tensors before them."""
        quantized: dict[str, list[QuantizedWeight]] = {"w13": [], "w2": []}
        biases = []
        if isinstance(self.source, ImportedSource):  # GPTQ / AWQ experts: re-packed, never dequantized
            roles = plan.per_expert[e]
            quantized = {"w13": [self.source.read_quantized(roles["gate"]), self.source.read_quantized(roles["up"])],
                         "w2": [self.source.read_quantized(roles["down"])]}
        for kind, block in self._expert_parts(plan, e) if not isinstance(self.source, ImportedSource) else ():
            if kind in quantized:
                quantized[kind].append(quantize_weight(block, self.options.quantize))
            else:
                biases.append((kind, block))
            del block
        for name, blocks in quantized.items():
            for role in blocks[0].parts():
                for block in blocks:
                    yield f"{name}.{role}", block.parts()[role]
        yield from biases

    def write_layer(self, path: str, plan: LayerPlan) -> list[dict]:
        g = plan.geometry
        specs = [spec for e in range(g.num_experts) for spec in self._expert_specs(plan, e)]
        writer = TensorWriter(path, specs, {"format": "moe_infer.experts", "layer": str(plan.layer_idx)})
        relative = os.path.relpath(path, os.path.dirname(os.path.dirname(path)))
        entries = []
        for e in range(g.num_experts):
            digest, fast = hashlib.sha256(), fast_hasher()
            nbytes = 0
            offset = writer.offsets[self._expert_specs(plan, e)[0][0]]  # the expert's first tensor
            parts = self._expert_parts if self.options.quantize is None else self._quantized_parts
            for kind, block in parts(plan, e):
                data = writer.write(f"e{e}.{kind}", block)
                digest.update(data)
                if fast is not None:
                    fast.update(data)
                nbytes += len(data)
                del data, block
            entry = {"layer": plan.layer_idx, "expert": e, "file": relative.replace(os.sep, "/"),
                     "offset": offset, "nbytes": nbytes, "sha256": digest.hexdigest()}
            if fast is not None:
                entry[FAST_HASH] = fast.hexdigest()
            entries.append(entry)
            self.progress(nbytes)
        writer.close()
        return entries


def _copy_side_files(src: str, dst: str, dtype: torch.dtype | None) -> None:
    """config.json (without the FP8 quantization_config, which no longer describes the dense
    weights) and every tokenizer / generation file."""
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if not os.path.isfile(path) or name == INDEX_FILE or name.endswith(_WEIGHT_SUFFIXES):
            continue
        if name == "config.json":
            with open(path) as f:
                config = json.load(f)
            config.pop("quantization_config", None)
            if dtype is not None:
                config["dtype"] = dtype_name(dtype)
            elif str(config.get("dtype", config.get("torch_dtype", ""))).startswith("float8"):
                config["dtype"] = "bfloat16"
            with open(os.path.join(dst, name), "w") as f:
                json.dump(config, f, indent=2)
        else:
            shutil.copy2(path, os.path.join(dst, name))


def _check_destination(dst: str, fingerprint: str, options: ConvertOptions) -> bool:
    """True when `dst` already holds this very conversion; raises if it holds anything else."""
    if not os.path.exists(dst):
        return False
    if not os.path.isdir(dst):
        raise CheckpointError(f"destination {dst} exists and is not a directory")
    if not os.listdir(dst):
        return False
    if not os.path.isfile(os.path.join(dst, MANIFEST)):
        raise CheckpointError(f"destination {dst} is not empty and is not a converted checkpoint; refusing to "
                              f"overwrite it (choose another destination)")
    manifest = load_manifest(dst)
    source = manifest["source"]
    if source.get("fingerprint") != fingerprint or source.get("options") != options.as_json():
        raise CheckpointError(f"destination {dst} already holds a different conversion (model "
                              f"{source.get('architecture')}, fingerprint {str(source.get('fingerprint'))[:12]}, options "
                              f"{source.get('options')}); delete it or choose another destination")
    stale_marker = os.path.join(dst, _PARTIAL_MARKER)
    if os.path.exists(stale_marker):  # a run killed between its rename and the marker's removal
        os.remove(stale_marker)
    return True


def _write_checkpoint(partial: str, src: str, source: SourceCheckpoint, converter: "_Converter",
                      plan: ConversionPlan, config, model, blocks, fingerprint: str, options: ConvertOptions,
                      fp8_block: tuple[int, int]) -> dict:
    """Write every file of the converted checkpoint into `partial`; returns the manifest."""
    dense = converter.write_dense(os.path.join(partial, DENSE_FILE))
    entries = []
    for layer_plan in plan.layers:
        entries += converter.write_layer(os.path.join(partial, layer_file(layer_plan.layer_idx)), layer_plan)
    _copy_side_files(src, partial, options.dtype)
    first = plan.layers[0]
    any_fp8 = any(p.fp8 for p in plan.layers)
    manifest = {
        "format": FORMAT,
        "source": {"path": os.path.abspath(src), "fingerprint": fingerprint, "options": options.as_json(),
                   "architecture": (getattr(config, "architectures", None) or [type(model).__name__])[0],
                   "model_type": getattr(config, "model_type", None), "fp8": any_fp8,
                   "skipped_tensors": plan.skipped},
        "family": blocks[0].spec.family,
        "dtype": dtype_name(converter.expert_dtype(first)),
        "quantization": _quantization_entry(converter, fp8_block),
        "num_experts": first.geometry.num_experts,
        "top_k": int(getattr(blocks[0].module, blocks[0].router_attr).top_k),
        "hidden_size": first.geometry.hidden_size,
        "intermediate_size": first.geometry.intermediate_size,
        "moe_layers": [p.layer_idx for p in plan.layers],
        "dense": [dense],
        "experts": entries,
    }
    with open(os.path.join(partial, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    return manifest


def _quantization_entry(converter: "_Converter", fp8_block: tuple[int, int]) -> dict | None:
    """The manifest's `quantization` (store.py's docstring): int8 / int4 experts, kept FP8, or None."""
    scheme = converter.options.quantize
    if scheme is not None:
        return {**scheme.as_json(), "compute_dtype": dtype_name(converter.expert_dtype(converter.plan.layers[0]))}
    if converter.keep_fp8:
        return {"method": FP8_METHOD, "block_size": list(fp8_block), "compute_dtype": dtype_name(converter.compute_dtype)}
    return None


def default_converted_dir(src: str | os.PathLike) -> str:
    """Where `moe_infer.load` converts a plain transformers directory: under the moe_infer cache
    (`moe_infer.envs.cache_dir()`), named by the source's fingerprint."""
    from moe_infer.envs import cache_dir

    source = SourceCheckpoint(os.fspath(src))
    try:
        fingerprint = source.fingerprint()
    finally:
        source.close()
    return os.path.join(cache_dir(), "converted", fingerprint[:24])


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: torch.dtype | str | None = None,
            fp8: str = "dequantize", quantize: QuantScheme | str | None = None, group_size: int | None = None,
            verify_after: bool = False,
            progress: Callable[[int], None] | None = None) -> dict:
    """Convert the Hugging Face checkpoint directory `src` into `dst` (DESIGN section 5).

    Returns a summary: {"dst", "skipped" (already converted), "bytes_read", "bytes_written",
    "seconds", "moe_layers", "num_experts"}. `progress(nbytes)` is called as source bytes are done.
    """
    src, dst = os.fspath(src), os.path.abspath(os.fspath(dst))
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype, "dtype")
    if group_size is not None and quantize != "int4":
        raise ConfigError(f"group_size={group_size} applies to quantize='int4' only (int8 is quantized per output "
                          f"row); got quantize={quantize!r}")
    if isinstance(quantize, str):
        quantize = QuantScheme(quantize, group_size if group_size is not None else DEFAULT_GROUP_SIZE)
    start = time.perf_counter()
    source = SourceCheckpoint(src)
    try:
        imported = import_format_of(src)  # GPTQ / AWQ: experts re-packed into int4, the rest dequantized
        if imported is not None:
            scheme = QuantScheme("int4", imported.group_size)
            if quantize is not None and quantize != scheme:
                raise ConfigError(f"{src} is a {imported.method.upper()} int4 checkpoint in groups of "
                                  f"{imported.group_size}; its experts are imported as they are (quantize={scheme.name!r}"
                                  f", group_size={scheme.group_size}), not as {quantize.as_json()}")
            quantize, source = scheme, ImportedSource(source, imported)
        options = ConvertOptions(dtype, fp8, quantize)
        fingerprint = source.fingerprint()
        if _check_destination(dst, fingerprint, options):
            if verify_after:
                verify(dst)
            manifest = load_manifest(dst)
            return {"dst": dst, "skipped": True, "bytes_read": 0, "bytes_written": 0,
                    "seconds": time.perf_counter() - start, "moe_layers": manifest["moe_layers"],
                    "num_experts": manifest["num_experts"]}
        config, model, blocks = _build(source)
        text = _text_config(config)
        hidden_act = getattr(text, "hidden_act", None)
        plan = plan_conversion(source, model, blocks, hidden_act, int(getattr(text, "num_hidden_layers", 1 << 30)))
        fp8_block = _quant_block(config)
        converter = _Converter(source, plan, model, options, fp8_block, progress)

        partial = dst + PARTIAL_SUFFIX
        if os.path.exists(partial):
            if not os.path.isfile(os.path.join(partial, _PARTIAL_MARKER)):
                raise CheckpointError(f"{partial} exists and was not left by the converter; remove it")
            shutil.rmtree(partial)  # an interrupted earlier run: start again
        os.makedirs(os.path.join(partial, "experts"))
        with open(os.path.join(partial, _PARTIAL_MARKER), "w") as f:
            f.write(fingerprint)

        try:
            manifest = _write_checkpoint(partial, src, source, converter, plan, config, model, blocks, fingerprint,
                                         options, fp8_block)
            if verify_after:
                verify(partial)
        except Exception:
            # a failed run leaves nothing behind (an interrupted one leaves the partial directory, which
            # the next run removes)
            shutil.rmtree(partial, ignore_errors=True)
            raise
        if os.path.isdir(dst):
            os.rmdir(dst)  # empty (checked above)
        # the marker goes only once the directory is complete and published: a kill at any earlier
        # point leaves a marked partial directory (removed by the re-run); a kill right after the
        # rename leaves a complete DST holding the marker, which the re-run recognises and tidies
        os.rename(partial, dst)
        os.remove(os.path.join(dst, _PARTIAL_MARKER))
        bytes_written = sum(e["nbytes"] for e in manifest["experts"]) + sum(d["nbytes"] for d in manifest["dense"])
        return {"dst": dst, "skipped": False, "bytes_read": source.total_bytes(), "bytes_written": bytes_written,
                "seconds": time.perf_counter() - start, "moe_layers": manifest["moe_layers"],
                "num_experts": manifest["num_experts"]}
    finally:
        source.close()
