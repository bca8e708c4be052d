"""Launch configurations of the fused MoE kernels: tuned ones stored as JSON data, defaults otherwise.

A config file is named `E={E},N={I},device_name={device},dtype={dtype}.json` (I = the experts'
intermediate size, device as `torch.cuda.get_device_name()` with spaces as underscores; dtype is
hidden's), with `,quant=int8` or `,quant=int4_g{G}` before `.json` for quantized experts
(`quant_key`), and maps token counts to configs: `{"64": {"BLOCK_M": 32, "BLOCK_N": 64, ...}, ...}`;
keys that are not integers hold metadata. The key nearest to the call's token count wins. Files are searched in
`MOE_INFER_KERNEL_CONFIG_DIR` first, then in `configs/` beside this module (looked up once per
process: a file written later is seen by the next process). When no file matches,
a warning names the file that was looked for (once; not under TRITON_INTERPRET) and
`default_config` is used.
"""

from __future__ import annotations

import functools
import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from moe_infer import envs
from moe_infer.experts.quant import QuantScheme
from moe_infer.errors import ConfigError

CONFIG_DIR = Path(__file__).with_name("configs")
INT4_MIN_BLOCK_K = 32  # the int4 kernels split a K tile into even and odd halves, each >= 16 (tl.dot's minimum)
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@dataclass(frozen=True)
class GemmConfig:
    """Block sizes of one GEMM kernel (BLOCK_M is shared: it fixes the alignment)."""

    BLOCK_N: int
    BLOCK_K: int
    GROUP_M: int = 8
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("BLOCK_N", "BLOCK_K"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 16 or value & (value - 1):
                raise ConfigError(f"kernel config {name}={value!r}: must be a power of two >= 16")
        for name in ("GROUP_M", "num_warps", "num_stages"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"kernel config {name}={value!r}: must be a positive int")


@dataclass(frozen=True)
class KernelConfig:
    """BLOCK_M plus the gate/up GEMM's config; `down` for the down projection (same as gate/up if omitted)."""

    BLOCK_M: int
    gate_up: GemmConfig
    down: GemmConfig = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if not isinstance(self.BLOCK_M, int) or self.BLOCK_M < 16 or self.BLOCK_M & (self.BLOCK_M - 1):
            raise ConfigError(f"kernel config BLOCK_M={self.BLOCK_M!r}: must be a power of two >= 16")
        if self.down is None:
            object.__setattr__(self, "down", self.gate_up)

    @classmethod
    def from_dict(cls, entry: dict) -> "KernelConfig":
        """{"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages", optional "down": {...}}:
        the flat keys configure the gate/up GEMM; "down" overrides some of them for the down GEMM."""
        entry = dict(entry)
        down = entry.pop("down", None)
        try:
            block_m = entry.pop("BLOCK_M")
            gate_up = GemmConfig(**entry)
            down_config = GemmConfig(**{**asdict(gate_up), **down}) if down else gate_up
        except (KeyError, TypeError) as err:
            raise ConfigError(f"kernel config {entry}: {err}; expected keys BLOCK_M, BLOCK_N, BLOCK_K, "
                             f"GROUP_M, num_warps, num_stages and optionally down") from None
        return cls(block_m, gate_up, down_config)

    def to_dict(self) -> dict:
        entry = {"BLOCK_M": self.BLOCK_M, **asdict(self.gate_up)}
        if self.down != self.gate_up:
            entry["down"] = {k: v for k, v in asdict(self.down).items() if v != entry[k]}
        return entry


@functools.lru_cache(maxsize=None)
def _device_name(device: torch.device) -> str:
    return device_name(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "_")
    return device.type


def quant_key(quant: QuantScheme | None) -> str | None:
    """The config file name's `quant=` value of a quantization scheme: "int8", "int4_g128"; None unquantized."""
    if quant is None:
        return None
    return quant.name if quant.name == "int8" else f"{quant.name}_g{quant.group_size}"


def config_file_name(num_experts: int, intermediate_size: int, device: str, dtype: torch.dtype,
                     quant: QuantScheme | None = None) -> str:
    key = quant_key(quant)
    return (f"E={num_experts},N={intermediate_size},device_name={device},dtype={_DTYPE_NAMES.get(dtype, dtype)}"
            + (f",quant={key}" if key else "") + ".json")


@functools.lru_cache(maxsize=None)
def load_config_file(path: str) -> dict[int, KernelConfig]:
    """Token count -> config of one JSON file (metadata keys skipped); read once per process."""
    with open(path) as f:
        return parse_config_table(json.load(f), path)


def parse_config_table(raw: object, path: str) -> dict[int, KernelConfig]:
    """Token count -> config of a config file's JSON content (metadata keys skipped)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"kernel config file {path}: expected a JSON object keyed by token count")
    return {int(key): KernelConfig.from_dict(value) for key, value in raw.items() if key.isdigit()}


@functools.lru_cache(maxsize=None)
def _find_file(name: str, override: str | None) -> Path | None:
    for directory in ([Path(override)] if override else []) + [CONFIG_DIR]:
        if (directory / name).is_file():
            return directory / name
    return None


@functools.lru_cache(maxsize=None)
def _warn_no_file(name: str) -> None:
    warnings.warn(f"moe_infer fused_moe: no tuned kernel config {name} (searched MOE_INFER_KERNEL_CONFIG_DIR and "
                  f"{CONFIG_DIR}); using defaults. Run scripts/tune_fused_moe.py to write one.", stacklevel=4)


def get_config(num_experts: int, intermediate_size: int, top_k: int, num_tokens: int, dtype: torch.dtype,
               device: torch.device, quant: QuantScheme | None = None) -> KernelConfig:
    """The config for a call with `num_tokens` tokens (experts quantized with `quant`, if given): from
    the matching file (nearest token key), else defaults."""
    name = config_file_name(num_experts, intermediate_size, _device_name(device), dtype, quant)
    path = _find_file(name, envs.kernel_config_dir())
    table = load_config_file(str(path)) if path is not None else {}
    if table:
        nearest = min(table, key=lambda key: (abs(key - num_tokens), key))
        return table[nearest]
    if not envs.triton_interpret():  # the interpreter's speed does not depend on block sizes
        _warn_no_file(name)
    return default_config(num_experts, top_k, num_tokens, dtype, quant)


def default_config(num_experts: int, top_k: int, num_tokens: int, dtype: torch.dtype,
                   quant: QuantScheme | None = None) -> KernelConfig:
    """Untuned configs by rows per expert: small row blocks for decode (bytes-bound, many
    programs over the weights), big tiles once each expert sees hundreds of rows (FLOP-bound).
    Shared memory stays under `DEFAULT_SMEM_LIMIT` so the configs launch on any GPU since Ampere.
    For int4 experts BLOCK_K is lowered, if need be, to a divisor of the group size (down to
    `INT4_MIN_BLOCK_K`): a K tile then lies in one group and the kernels load one scale per column
    instead of one per value pair."""
    rows_per_expert = num_tokens * top_k / num_experts
    block_k = 32 if dtype == torch.float32 else 64  # 4-byte elements: half the K depth for the same shared memory
    if quant is not None and quant.name == "int4":
        while block_k > INT4_MIN_BLOCK_K and quant.group_size % block_k:
            block_k //= 2
    if rows_per_expert <= 16:
        return KernelConfig(16, GemmConfig(BLOCK_N=64, BLOCK_K=block_k, GROUP_M=1, num_warps=4, num_stages=4))
    if rows_per_expert <= 64:
        return KernelConfig(32, GemmConfig(BLOCK_N=64, BLOCK_K=block_k, GROUP_M=8, num_warps=4, num_stages=4))
    if rows_per_expert <= 512:
        return KernelConfig(64, GemmConfig(BLOCK_N=64, BLOCK_K=block_k, GROUP_M=8, num_warps=4, num_stages=3),
                            GemmConfig(BLOCK_N=128, BLOCK_K=block_k, GROUP_M=8, num_warps=4, num_stages=3))
    return KernelConfig(128, GemmConfig(BLOCK_N=64, BLOCK_K=block_k, GROUP_M=8, num_warps=8, num_stages=3),
                        GemmConfig(BLOCK_N=128, BLOCK_K=block_k, GROUP_M=8, num_warps=8, num_stages=3))


DEFAULT_SMEM_LIMIT = 100 * 1024  # bytes: what the defaults may ask for (Ampere's A100 has 163 KB per block)


def shared_memory_bytes(config: KernelConfig, dtype: torch.dtype, quant: QuantScheme | None = None) -> int:
    """Shared memory the larger of the two GEMMs' pipelines asks for, at most: num_stages copies of
    the input tile [BM, BK] and of the weight tiles [BK, BN] as loaded (gate and up in the first
    GEMM; int8 one byte a value, int4 packed two a byte plus its float32 scales, one per column when
    BLOCK_K divides the group size, else one per value pair). Compiled for sm_90 the defaults use
    50-100% of it. The estimate the tuner prunes with and the defaults are checked against."""
    element = torch.finfo(dtype).bits // 8

    def gemm(cfg: GemmConfig, weight_tiles: int) -> int:
        if quant is None or quant.name == "int8":
            weight = cfg.BLOCK_K * cfg.BLOCK_N * (element if quant is None else 1)
        else:
            scale_rows = 1 if quant.group_size % cfg.BLOCK_K == 0 else cfg.BLOCK_K // 2
            weight = cfg.BLOCK_K // 2 * cfg.BLOCK_N + 4 * scale_rows * cfg.BLOCK_N
        return cfg.num_stages * (config.BLOCK_M * cfg.BLOCK_K * element + weight_tiles * weight)

    return max(gemm(config.gate_up, 2), gemm(config.down, 1))
