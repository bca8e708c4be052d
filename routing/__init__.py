"""routing subpackage."""
