"""What a Hugging Face checkpoint holds, tensor by tensor: the source side of the converter.

Owns: opening a checkpoint directory (one `model.safetensors`, or shards listed by
`model.safetensors.index.json`), its fingerprint, and the classification of every tensor name
into dense weights (renamed to the names of the `transformers` model in memory), expert weights of
an MoE block (per-expert hub keys `experts.E.w1/w2/w3.weight`, `experts.E.gate_proj/up_proj/
down_proj.weight`, or fused `experts.gate_up_proj` / `down_proj` (+ `_bias`) as `transformers` 5
keeps them, GPT-OSS's transposed and interleaved layout included), FP8 block scales
(`weight_scale_inv`), and tensors to skip (DeepSeek-V3's multi-token-prediction layer).

Key names are mapped with `transformers`' own checkpoint conversion mapping for the model class
(the same renames `from_pretrained` applies), so what is dense in memory is dense here.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field

from torch import nn

from .layout import ModuleExperts
from .tensorfile import CheckpointError, TensorFile, TensorSpec

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# per-expert hub keys: "...experts.<E>.<projection>.weight"
_PER_EXPERT = re.compile(r"\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_ROLE = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}
FUSED_PARAMS = ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias")
SCALE_SUFFIX = "_scale_inv"  # "x.weight_scale_inv" scales "x.weight"
_LAYER_NUMBER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


FINGERPRINT_VERSION = b"moe_infer.fingerprint/2"  # /1 hashed headers only (the same for different weights)


def _file_identity(path: str) -> str:
    st = os.stat(path)
    return f"{os.path.realpath(path)}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}"


def content_sha256(path: str, chunk: int = 16 << 20) -> str:
    """The sha256 of a file's bytes, remembered under the moe_infer cache
    (`$MOE_INFER_CACHE/file-sha256/`) by the file's identity: path, device, inode, size, and
    modification and change times. Any write to the file changes its change time (ctime), which
    no user call can set back, so a remembered hash is never served for changed bytes (short of a
    rewrite within one timestamp tick of the hashing). An unwritable cache only costs the memo."""
    from moe_infer.envs import cache_dir

    identity = _file_identity(path)
    memo = os.path.join(cache_dir(), "file-sha256", hashlib.sha256(identity.encode()).hexdigest()[:40])
    try:
        with open(memo) as f:
            remembered = f.read().strip()
        if len(remembered) == 64:
            return remembered
    except OSError:
        pass
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    value = digest.hexdigest()
    if _file_identity(path) == identity:  # unchanged while it was hashed
        try:
            os.makedirs(os.path.dirname(memo), exist_ok=True)
            temporary = f"{memo}.{os.getpid()}.tmp"
            with open(temporary, "w") as f:
                f.write(value)
            os.replace(temporary, memo)
        except OSError:
            pass
    return value


def _inside_checkpoint(root: str, shard: str) -> bool:
    """Whether shard file `shard` of checkpoint directory `root` stays inside it. In a hub cache
    snapshot (`models--org--name/snapshots/<rev>/`) the files are links into the repository's own
    `blobs/` folder, which counts as inside; a link anywhere else does not."""
    if os.path.isabs(shard) or os.path.normpath(shard).split(os.sep)[0] == "..":
        return False
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(root, shard))
    allowed = [real_root]
    snapshots = os.path.dirname(real_root)
    if os.path.basename(snapshots) == "snapshots":
        allowed.append(os.path.join(os.path.dirname(snapshots), "blobs"))
    return any(os.path.commonpath([folder, real]) == folder for folder in allowed)


class SourceCheckpoint:
    """A Hugging Face model directory with safetensors weights, opened for positional reads."""

    def __init__(self, root: str):
        self.root = root
        config_path = os.path.join(root, "config.json")
        if not os.path.isdir(root):
            raise CheckpointError(f"{root} is not a directory")
        if not os.path.isfile(config_path):
            raise CheckpointError(f"{root} has no config.json; expected a transformers model directory")
        with open(config_path, "rb") as f:
            self.config_bytes = f.read()
        index_path = os.path.join(root, INDEX_FILE)
        if os.path.isfile(index_path):
            try:
                with open(index_path) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise CheckpointError(f"{index_path}: malformed index ({err})") from None
        elif os.path.isfile(os.path.join(root, SINGLE_FILE)):
            weight_map = None
        else:
            raise CheckpointError(f"{root} has neither {SINGLE_FILE} nor {INDEX_FILE} (only safetensors checkpoints "
                                  f"are converted; pickled .bin files are refused)")
        shard_names = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE_FILE]
        self.files: dict[str, TensorFile] = {}
        try:
            for shard in shard_names:
                path = os.path.join(root, shard)
                if not _inside_checkpoint(root, shard):
                    where = index_path if weight_map is not None else root
                    raise CheckpointError(f"{where}: shard {shard!r} escapes the model directory")
                if not os.path.isfile(path):
                    raise CheckpointError(f"{root}: missing shard {shard} (listed in {INDEX_FILE})")
                self.files[shard] = TensorFile(path)
        except BaseException:
            self.close()
            raise
        self.key_file: dict[str, str] = {}
        for shard, tf in self.files.items():
            for key in tf.keys():
                self.key_file[key] = shard
        if weight_map is not None:
            for key, shard in weight_map.items():
                if self.key_file.get(key) != shard:
                    self.close()
                    raise CheckpointError(f"{root}: tensor {key!r} is listed in {INDEX_FILE} under {shard} but that "
                                          f"shard does not hold it")

    def keys(self) -> list[str]:
        return list(self.key_file)

    def spec(self, key: str) -> TensorSpec:
        return self.files[self.key_file[key]].spec(key)

    def read(self, key: str, rows: tuple[int, int] | None = None):
        return self.files[self.key_file[key]].read(key, rows)

    def fingerprint(self) -> str:
        """sha256 over config.json and every shard's name and content sha256: it changes when any
        byte of the weights changes, so a conversion is reused only for the same bytes. Each shard
        is hashed once (about 1 GB/s) and remembered by `content_sha256`; later calls cost a stat."""
        digest = hashlib.sha256(FINGERPRINT_VERSION + b"\0" + self.config_bytes)
        for shard, tf in sorted(self.files.items()):
            digest.update(f"\0{shard}\0{content_sha256(tf.path)}".encode())
        return digest.hexdigest()

    def total_bytes(self) -> int:
        return sum(tf.size for tf in self.files.values())

    def close(self) -> None:
        for tf in self.files.values():
            tf.close()


@dataclass
class LayerPlan:
    """The expert tensors of one MoE block and where they come from."""

    layer_idx: int
    block_name: str
    geometry: ModuleExperts  # over the meta-device experts module: E, H, I, layout flags
    per_expert: dict[int, dict[str, str]] = field(default_factory=dict)  # e -> role -> key (+ "<role>_scale")
    fused: dict[str, str] = field(default_factory=dict)  # fused param name -> key

    @property
    def fp8(self) -> bool:
        return any("gate_scale" in roles for roles in self.per_expert.values())


@dataclass
class DenseItem:
    target: str  # name in the transformers model
    key: str  # name in the source checkpoint
    scale_key: str | None = None  # FP8 block scales of `key`


@dataclass
class ConversionPlan:
    dense: list[DenseItem]
    layers: list[LayerPlan]
    skipped: list[str]


def _rename(model: nn.Module):
    """key -> (name in memory, converter pattern or None), with transformers' mapping for this model."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta_state = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None)
    return lambda key: rename_source_key(key, renamings, converters, prefix, meta_state), meta_state


def plan_conversion(source: SourceCheckpoint, model: nn.Module, blocks, hidden_act: str | None,
                    num_layers: int) -> ConversionPlan:
    """Classify every tensor of `source` for `model` (a meta-device skeleton) and its MoE `blocks`."""
    rename, meta_state = _rename(model)
    ignore = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
    ignore.append(re.compile(r"rotary_emb\.inv_freq$"))
    layers = {found.name + ".experts.": LayerPlan(found.layer_idx, found.name,
                                                  ModuleExperts.from_module(found.module.experts, hidden_act))
              for found in blocks}
    keys = set(source.keys())
    dense: list[DenseItem] = []
    skipped: list[str] = []
    for key in sorted(keys):
        if key.endswith(SCALE_SUFFIX):
            if key[: -len(SCALE_SUFFIX)] not in keys:
                raise CheckpointError(f"{source.root}: {key} scales a tensor {key[:-len(SCALE_SUFFIX)]} the checkpoint "
                                      f"does not hold")
            continue
        scale_key = key + SCALE_SUFFIX if key + SCALE_SUFFIX in keys else None
        target, converter = rename(key)
        layer = next((plan for prefix, plan in layers.items() if target.startswith(prefix)), None)
        if layer is not None:
            param = target.removeprefix(layer.block_name + ".experts.")
            match = _PER_EXPERT.search(key)
            if converter is not None and match:
                roles = layer.per_expert.setdefault(int(match.group(1)), {})
                role = _ROLE[match.group(2)]
                roles[role] = key
                if scale_key:
                    roles[role + "_scale"] = scale_key
            elif converter is None and param in FUSED_PARAMS:
                if scale_key:
                    raise CheckpointError(f"{source.root}: FP8 scales for the fused expert tensor {key} are not "
                                          f"supported (only per-expert DeepSeek-V3 FP8 keys are)")
                layer.fused[param] = key
            else:
                raise CheckpointError(f"{source.root}: tensor {key} belongs to the experts of {layer.block_name} "
                                      f"but is in no layout the converter reads (per-expert w1/w2/w3 or "
                                      f"gate_proj/up_proj/down_proj, or fused {', '.join(FUSED_PARAMS)})")
        elif target in meta_state:
            _check_shape(source, key, tuple(meta_state[target].shape), f"{target} of {type(model).__name__}")
            dense.append(DenseItem(target, key, scale_key))
        else:
            number = _LAYER_NUMBER.search(key)
            if (number and int(number.group(1)) >= num_layers) or any(p.search(key) for p in ignore):
                skipped.append(key)  # e.g. DeepSeek-V3's multi-token-prediction layer
                continue
            raise CheckpointError(f"{source.root}: tensor {key} (as {target}) is not a weight of "
                                  f"{type(model).__name__}; wrong config.json for these weights?")
    for plan in layers.values():
        _check_layer(source.root, plan)
        _check_expert_tensors(source, plan)
    # every weight the model has (its persistent buffers too) must come from the checkpoint: a
    # missing one would otherwise convert and verify, and fail only at load
    present = {item.target for item in dense}
    expected = [name for name, _ in [*model.named_parameters(), *model.named_buffers()]
                if name in meta_state and not any(name.startswith(prefix) for prefix in layers)]
    missing = [name for name in expected if name not in present]
    if missing:
        raise CheckpointError(f"{source.root}: the checkpoint lacks {len(missing)} weight(s) of "
                              f"{type(model).__name__}: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} "
                              f"(missing shard, or a config.json for another model?)")
    return ConversionPlan(dense, sorted(layers.values(), key=lambda p: p.layer_idx), skipped)


def _check_shape(source: SourceCheckpoint, key: str, expected: tuple[int, ...], what: str) -> None:
    shape = tuple(source.spec(key).shape)
    if shape != expected:
        raise CheckpointError(f"{os.path.join(source.root, source.key_file[key])}: tensor {key} has shape "
                              f"{list(shape)}, but config.json makes {what} {list(expected)}; wrong config.json "
                              f"for these weights?")


def _check_expert_tensors(source: SourceCheckpoint, plan: "LayerPlan") -> None:
    """Every expert tensor of the layer has the shape the config gives and one dtype (the converter
    writes the layer's experts in the dtype of its first weight)."""
    g = plan.geometry
    e_, h, i = g.num_experts, g.hidden_size, g.intermediate_size
    where = f"the experts of {plan.block_name}"
    if plan.fused:
        shapes = {"gate_up_proj": (e_, h, 2 * i) if g.transposed else (e_, 2 * i, h),
                  "down_proj": (e_, i, h) if g.transposed else (e_, h, i),
                  "gate_up_proj_bias": (e_, 2 * i), "down_proj_bias": (e_, h)}
        keys = [(plan.fused[param], shapes[param]) for param in FUSED_PARAMS if param in plan.fused]
    else:
        shapes = {"gate": (i, h), "up": (i, h), "down": (h, i)}
        keys = [(roles[role], shapes[role]) for _, roles in sorted(plan.per_expert.items()) for role in shapes]
    dtype = source.spec(keys[0][0]).dtype
    for key, shape in keys:
        _check_shape(source, key, shape, f"{where} (H={h}, I={i}, {e_} experts)")
        spec = source.spec(key)
        if spec.dtype != dtype and not key.endswith("_bias"):
            raise CheckpointError(f"{os.path.join(source.root, source.key_file[key])}: tensor {key} is "
                                  f"{str(spec.dtype).removeprefix('torch.')}, but {keys[0][0]} of the same layer is "
                                  f"{str(dtype).removeprefix('torch.')}; {where} must share one dtype")


def _check_layer(root: str, plan: LayerPlan) -> None:
    g = plan.geometry
    where = f"{root}: MoE block {plan.block_name}"
    if plan.per_expert and plan.fused:
        raise CheckpointError(f"{where} has both per-expert and fused expert tensors")
    if plan.fused:
        needed = ["gate_up_proj", "down_proj"] + (["gate_up_proj_bias", "down_proj_bias"] if g.has_bias else [])
        missing = [p for p in needed if p not in plan.fused]
        if missing:
            raise CheckpointError(f"{where}: fused expert tensors {missing} are missing (missing shard?)")
        return
    roles = {"gate", "up", "down"}
    missing = [e for e in range(g.num_experts) if not roles <= set(plan.per_expert.get(e, {}))]
    extra = [e for e in plan.per_expert if not 0 <= e < g.num_experts]
    if missing or extra:
        raise CheckpointError(f"{where}: experts {missing[:8]} lack gate/up/down weights, experts {extra[:8]} are "
                              f"beyond the config's {g.num_experts} (missing shard or wrong config?)")
    scaled = {e for e, r in plan.per_expert.items() if "gate_scale" in r and "up_scale" in r and "down_scale" in r}
    if scaled and len(scaled) != g.num_experts:
        raise CheckpointError(f"{where}: FP8 weight_scale_inv present for some experts only")
