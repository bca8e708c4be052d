"""Canonical expert weights, the reference expert math, the expert store of converted checkpoints
and the checkpoint converter."""

from .convert import convert
from .layout import ModuleExperts, UnsupportedExperts
from .math import Activation, ExpertTensors, expert_forward, group_by_expert, moe_forward
from .store import ExpertStore, StoreExperts, verify
from .tensorfile import CheckpointError

__all__ = ["Activation", "CheckpointError", "ExpertStore", "ExpertTensors", "ModuleExperts", "StoreExperts",
           "UnsupportedExperts", "convert", "expert_forward", "group_by_expert", "moe_forward", "verify"]
