"""Tiered expert cache (GPU / CPU / disk budgets), eviction policies, the asynchronous loader
(prefetch queue, copy streams, SE-MoE ring), CPU compute of missed experts, and the trace-driven
simulator."""

from .policies import POLICIES, Policy, make_policy
from .simulate import SimResult, simulate

__all__ = ["POLICIES", "Policy", "SimResult", "make_policy", "simulate"]
