"""predictors subpackage."""
