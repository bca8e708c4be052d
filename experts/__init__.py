"""Canonical expert weights and the reference expert math."""

from .layout import ModuleExperts, UnsupportedExperts
from .math import Activation, ExpertTensors, expert_forward, group_by_expert, moe_forward

__all__ = ["Activation", "ExpertTensors", "ModuleExperts", "UnsupportedExperts", "expert_forward",
           "group_by_expert", "moe_forward"]
