"""How every `moe-infer` command and benchmark prints its `--help`: each option followed by its default.

Like `argparse.ArgumentDefaultsHelpFormatter`, except that a default of None or False is not shown
(it means "not given"), nor one the help text already explains, and that an option without help
text still gets a line with its default.
"""

from __future__ import annotations

import argparse
import copy


class HelpFormatter(argparse.HelpFormatter):
    def _format_action(self, action: argparse.Action) -> str:
        if not (action.help and action.help.strip()) and self._shows_default(action):
            action = copy.copy(action)  # a help line for the default alone; the parser's action is unchanged
            action.help = ""
            action.help = self._get_help_string(action).strip()
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if self._shows_default(action) and "default" not in text:
            shown = repr(action.default) if isinstance(action.default, str) else str(action.default)
            text += f" (default: {shown.replace('%', '%%')})"
        return text

    @staticmethod
    def _shows_default(action: argparse.Action) -> bool:
        if not action.option_strings or action.help is argparse.SUPPRESS:
            return False
        return action.default is not None and action.default is not False and action.default is not argparse.SUPPRESS


class RawDescriptionHelpFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """`HelpFormatter` that keeps the description's and epilog's line breaks."""
