"""cache subpackage."""
