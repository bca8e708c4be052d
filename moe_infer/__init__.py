"""moe_infer: Mixture-of-Experts inference for Hugging Face transformers models."""

__version__ = "0.1.0"
