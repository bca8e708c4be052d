"""experts subpackage."""
