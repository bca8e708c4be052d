"""The errors moe_infer raises for a user's mistake or a bad file.

Every one derives from `MoEInferError`, which is what the CLI prints as one line (exit 2); anything
else is a bug and keeps its traceback. Each also derives from the builtin a caller would expect
(`ValueError` for a bad value or file, `NotImplementedError` for a valid request this build cannot
run, `FileNotFoundError` for a missing path), so `except ValueError` keeps working.

This module imports nothing from moe_infer: any part of the package can raise these.
"""

from __future__ import annotations


class MoEInferError(Exception):
    """Base of every error that reports a user's mistake, a bad input file or an unsupported request."""


class ConfigError(MoEInferError, ValueError):
    """An option, argument or configuration value is invalid: the message names it, the value and what is allowed."""


class FileFormatError(MoEInferError, ValueError):
    """A file moe_infer reads (trace, predictor, placement plan, manifest) is malformed or inconsistent."""


class CheckpointError(FileFormatError):
    """A checkpoint file or directory is missing, truncated, corrupt or inconsistent."""


class UnsupportedModel(ConfigError):
    """The model has no sparse MoE block, or one moe_infer does not know how to run exactly."""


class UnsupportedExperts(ConfigError):
    """The experts module's layout is not one moe_infer can run."""


class NotSupported(MoEInferError, NotImplementedError):
    """A valid request that this build or machine cannot run; the message says what it needs."""


class MissingFile(MoEInferError, FileNotFoundError):
    """A path the user named does not exist."""


class UnknownField(MoEInferError, TypeError):
    """A keyword or field name that does not exist (like Python's own unexpected-keyword `TypeError`)."""


__all__ = ["CheckpointError", "ConfigError", "FileFormatError", "MissingFile", "MoEInferError", "NotSupported",
           "UnknownField", "UnsupportedExperts", "UnsupportedModel"]
