"""Router adapters that reproduce each `transformers` MoE family's routing exactly."""

from .adapters import ADAPTERS, RouterAdapter, Routing, get_adapter_class

__all__ = ["ADAPTERS", "RouterAdapter", "Routing", "get_adapter_class"]
