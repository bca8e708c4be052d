"""Tiny trained models shipped with moe_infer."""
