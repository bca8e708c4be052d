"""`MoEConfig`: the one dataclass that configures a wrapped model.

Owns validation of every field (a bad value raises `ValueError` naming the field, the value and
what is allowed) and the parsing of byte budgets such as "20GiB". It does not decide whether a
valid value is implemented by this version: `moe_infer.api` checks that when a model is wrapped.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any
from moe_infer.errors import ConfigError, UnknownField

KERNELS = ("auto", "triton", "torch")
CACHE_POLICIES = ("lru", "lfu", "expertflow", "static")
SIMULATOR_ONLY_POLICIES = ("belady",)
# Predictor kinds `MoEConfig.predictor` can name without a file: gate-lookahead reuses the model's own
# routers and needs no training. The learned kinds need a trace to train on, which a config does not
# have: they are refused here, with what works instead.
PREDICTORS = ("gate-lookahead",)
TRAINED_PREDICTORS = ("markov", "expertflow", "pregate", "frequency")
LOADERS = ("on-demand", "ring")
CPU_COMPUTE = ("never", "auto", "always")
PARALLEL_MODES = ("auto", "ep", "tp")

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_BYTES_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: int | str, *, name: str = "value") -> int:
    """Return a byte count from an int or a string like "20GiB", "512MB", "1.5 GiB".

    Units as `transformers.utils.hub.convert_file_size_to_int` reads them (KiB/MiB/GiB = 2**10/20/30,
    KB/MB/GB = 10**3/6/9; tests/test_config.py checks that both agree), which this does not call
    because it rejects what a budget needs: decimals ("1.5GiB"), TB/TiB, a plain byte count as a
    string, a space before the unit; it also reads "20Gb" as bits (20 * 10**9 / 8), where a user
    writing a memory budget means bytes: here the unit is case-insensitive and always bytes.
    """
    if isinstance(value, bool):
        raise ConfigError(f"{name}={value!r}: expected a byte count (int) or a size string like '20GiB'")
    if isinstance(value, int):
        if value <= 0:
            raise ConfigError(f"{name}={value!r}: a byte budget must be positive")
        return value
    if isinstance(value, str):
        match = _BYTES_RE.match(value)
        if match and match.group(2).lower() in _UNITS:
            count = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
            if count > 0:
                return count
        raise ConfigError(
            f"{name}={value!r}: expected a positive size such as 20GiB, 512MB or 1073741824 "
            f"(units: {', '.join(u for u in _UNITS if u)}; case-insensitive)"
        )
    raise ConfigError(f"{name}={value!r}: expected an int or a size string, got {type(value).__name__}")


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"MoEConfig.{name}={value!r}: allowed values are {', '.join(map(repr, allowed))}")


def _existing_path(name: str, value: Any) -> None:
    if not isinstance(value, (str, os.PathLike)):
        raise ConfigError(f"MoEConfig.{name}={value!r}: expected None or a file path")
    if not os.path.exists(value):
        raise ConfigError(f"MoEConfig.{name}={value!r}: no such file or directory")


@dataclass
class MoEConfig:
    """How a wrapped model runs its MoE layers. Every field is validated on construction.

    Byte budgets (`gpu_memory`, `cpu_memory`) accept ints or strings like "20GiB" and are stored
    as ints.
    """

    kernel: str = field(default="auto", metadata={
        "choices": KERNELS, "help": "MoE layer compute: auto = the Triton kernels on CUDA, torch elsewhere"})
    gpu_memory: int | str | None = field(default=None, metadata={
        "metavar": "BYTES", "help": "byte budget of the GPU expert tier, e.g. 20GiB (unset: every expert resident)"})
    cpu_memory: int | str | None = field(default=None, metadata={
        "metavar": "BYTES", "help": "byte budget of the CPU expert tier (pinned host memory beside a GPU tier; "
                                    "on a CPU model the only tier), e.g. 2GiB"})
    offload_dir: str | os.PathLike | None = field(default=None, metadata={
        "metavar": "DIR", "help": "a disk tier for an in-memory model: its experts are written there once, then "
                                  "read from disk (a converted checkpoint is its own disk tier)"})
    cache_policy: str = field(default="lru", metadata={
        "choices": CACHE_POLICIES, "help": "which expert a full tier evicts; static pins a trace's hot set, "
                                           "expertflow shares room between layers by predicted need"})
    predictor: str | os.PathLike | None = field(default=None, metadata={
        "metavar": "KIND|FILE", "help": f"routing predictor driving prefetch: {', '.join(PREDICTORS)}, "
                                        "or a saved predictor file"})
    prefetch_depth: int = field(default=1, metadata={
        "type": int, "metavar": "D", "help": "MoE layers ahead that the predictor prefetches"})
    loader: str = field(default="on-demand", metadata={
        "choices": LOADERS, "help": "on-demand loads, or ring: the SE-MoE round-robin ring of sections"})
    cpu_compute: str = field(default="auto", metadata={
        "choices": CPU_COMPUTE, "help": "run a missed expert on the CPU instead of fetching it; auto decides "
                                        "by a cost model measured at start-up"})
    token_scheduling: bool = field(default=False, metadata={
        "help": "expert-aware batching: generate and serve group requests whose next tokens use the same "
                "experts (scheduler expert instead of fcfs); a forward pass computes exactly the same"})
    placement: str | os.PathLike | None = field(default=None, metadata={
        "metavar": "PLAN", "help": "a saved placement plan (moe-infer placement ... --out PLAN)"})
    parallel: str | int | None = field(default=None, metadata={
        "metavar": "MODE|R", "type": lambda value: int(value) if value.isdigit() else value,
        "help": f"expert parallelism over torch.distributed ranks: {', '.join(PARALLEL_MODES)} or a sharding factor r"})
    load_timeout: float = field(default=120.0, metadata={
        "type": float, "metavar": "SECONDS", "help": "how long a forward waits for one expert's load before it "
                                                     "fails (a hung read fails that forward only)"})
    quantize: Any = field(default=None, metadata={
        "choices": ("int8", "int4"), "help": "quantize the routed experts in memory (weight-only; int4 in groups of "
                                             "128); stored as a moe_infer.experts.quant.QuantScheme, which also "
                                             "takes another int4 group size"})
    routing_override: Any = field(default=None, repr=False, metadata={"flag": False})  # a Trace: no command-line form

    def __post_init__(self) -> None:
        _choice("kernel", self.kernel, KERNELS)
        for name in ("gpu_memory", "cpu_memory"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, parse_bytes(value, name=f"MoEConfig.{name}"))
        if self.offload_dir is not None and not isinstance(self.offload_dir, (str, os.PathLike)):
            raise ConfigError(f"MoEConfig.offload_dir={self.offload_dir!r}: expected None or a directory path")
        if self.cache_policy in SIMULATOR_ONLY_POLICIES:
            raise ConfigError(
                f"MoEConfig.cache_policy={self.cache_policy!r}: belady needs the future and exists only "
                f"in moe_infer.cache.simulate; allowed values are {', '.join(map(repr, CACHE_POLICIES))}"
            )
        _choice("cache_policy", self.cache_policy, CACHE_POLICIES)
        if self.predictor is not None and self.predictor not in PREDICTORS:
            works = "None, 'gate-lookahead' (no training), or the path of a saved predictor file"
            if self.predictor in TRAINED_PREDICTORS and not os.path.exists(self.predictor):
                raise ConfigError(
                    f"MoEConfig.predictor={self.predictor!r}: a {self.predictor} predictor must be trained first "
                    f"(`moe-infer predictor train --kind {self.predictor} --trace T --out P`, or "
                    f"moe_infer.predictors.train); what works here: {works}"
                )
            if not isinstance(self.predictor, (str, os.PathLike)) or not os.path.exists(self.predictor):
                raise ConfigError(f"MoEConfig.predictor={self.predictor!r}: expected {works}")
        if isinstance(self.prefetch_depth, bool) or not isinstance(self.prefetch_depth, int) or self.prefetch_depth < 0:
            raise ConfigError(f"MoEConfig.prefetch_depth={self.prefetch_depth!r}: expected an int >= 0")
        _choice("loader", self.loader, LOADERS)
        _choice("cpu_compute", self.cpu_compute, CPU_COMPUTE)
        if isinstance(self.load_timeout, bool) or not isinstance(self.load_timeout, (int, float)) \
                or not self.load_timeout > 0:
            raise ConfigError(f"MoEConfig.load_timeout={self.load_timeout!r}: expected a number of seconds > 0")
        self.load_timeout = float(self.load_timeout)
        if not isinstance(self.token_scheduling, bool):
            raise ConfigError(f"MoEConfig.token_scheduling={self.token_scheduling!r}: expected True or False")
        if self.placement is not None:
            _existing_path("placement", self.placement)
        if self.parallel is not None:
            is_int = isinstance(self.parallel, int) and not isinstance(self.parallel, bool)
            if not (self.parallel in PARALLEL_MODES or (is_int and self.parallel >= 0)):
                raise ConfigError(
                    f"MoEConfig.parallel={self.parallel!r}: expected None, "
                    f"{', '.join(map(repr, PARALLEL_MODES))} or a sharding factor r >= 0"
                )

        if self.quantize is not None:
            from moe_infer.experts.quant import SCHEMES, QuantScheme

            if isinstance(self.quantize, str) and self.quantize in SCHEMES:
                self.quantize = QuantScheme(self.quantize)
            elif not isinstance(self.quantize, QuantScheme):
                raise ConfigError(f"MoEConfig.quantize={self.quantize!r}: expected None, "
                                  f"{', '.join(map(repr, SCHEMES))} or a moe_infer.experts.quant.QuantScheme "
                                  f"(for another int4 group size)")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def replace(self, **fields: Any) -> "MoEConfig":
        """A copy with `fields` changed (validated like the constructor)."""
        check_field_names(fields)
        return dataclasses.replace(self, **fields)

    def non_default_fields(self) -> dict[str, Any]:
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not f.default and getattr(self, f.name) != f.default
        }


def check_field_names(fields: dict[str, Any]) -> None:
    unknown = sorted(set(fields) - set(MoEConfig.field_names()))
    if unknown:
        raise UnknownField(
            f"unknown MoEConfig field(s) {', '.join(map(repr, unknown))}; "
            f"fields are {', '.join(MoEConfig.field_names())}"
        )


def add_config_arguments(parser) -> None:
    """Every `MoEConfig` field that has a command-line form as a flag of the argparse `parser`
    (`--gpu-memory`, `--cache-policy`, ...), with its help and choices from the field's metadata:
    the one place the CLI's MoEConfig flags are made (`generate`, `serve`). An unset flag stays
    None, so `config_from_arguments` leaves that field at its default."""
    group = parser.add_argument_group("MoEConfig fields", "how the wrapped model runs its MoE layers")
    for spec in dataclasses.fields(MoEConfig):
        meta = spec.metadata
        if not meta.get("flag", True):
            continue
        default = f"default: {spec.default}" if spec.default is not None else None
        help_text = "; ".join(filter(None, (meta["help"], default)))
        flag = f"--{spec.name.replace('_', '-')}"
        if spec.type == "bool":
            group.add_argument(flag, dest=spec.name, action="store_true", default=None, help=help_text)
            continue
        group.add_argument(flag, dest=spec.name, default=None, type=meta.get("type"), choices=meta.get("choices"),
                           metavar=meta.get("metavar"), help=help_text)


def config_from_arguments(args) -> MoEConfig:
    """The `MoEConfig` of the flags `add_config_arguments` made (unset flags: the field's default)."""
    fields = {name: getattr(args, name) for name in MoEConfig.field_names() if getattr(args, name, None) is not None}
    return MoEConfig(**fields)
