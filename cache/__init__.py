"""Tiered expert cache (GPU / CPU / disk budgets), eviction policies, the asynchronous loader
(prefetch queue, copy streams, SE-MoE ring), CPU compute of missed experts, and the trace-driven
simulator."""

from .backing import Backing, ModuleBacking, StoreBacking
from .policies import POLICIES, Policy, make_policy
from .simulate import SimResult, TraceOracle, simulate
from .tiered import ExpertCache

__all__ = ["Backing", "ExpertCache", "ModuleBacking", "POLICIES", "Policy", "SimResult", "StoreBacking",
           "TraceOracle", "make_policy", "simulate"]
