"""Small helpers the package shares: optional imports that fail with the extra to install, and flag helpers."""

import argparse
import importlib
import warnings
from typing import Optional


def require(module: str, feature: Optional[str] = None, package: Optional[str] = None):
    """
    Imports an optional (training/evaluation-only) dependency, or raises an ImportError naming what needs
    it and the extra to install.
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        package = package or module.split(".")[0]
        needs = f"{feature} needs" if feature else "this needs"
        raise ImportError(
            f"{needs} `{package}`: install the training and evaluation dependencies with "
            f"`pip install diffusers-ssreg[train]` (or `pip install {package}`)."
        ) from error


# --------------------------------------------------------------------------------------------
# Command-line flags
# --------------------------------------------------------------------------------------------


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """`--help` with each flag's real default, "(default: 32)", left out where it is None or False."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (
            "%(default)" in text
            or "default:" in text.lower()
            or not action.option_strings
            or action.default is None
            or action.default is False  # store_true flags (0 is a real default and is shown)
            or action.default == argparse.SUPPRESS
        ):
            return text
        return f"{text} (default: %(default)s)".strip()


class _DeprecatedAlias(argparse.Action):
    """An old flag name, hidden from `--help`, that stores into the new flag's destination and warns."""

    def __init__(self, option_strings, dest, new_flag=None, append=False, **kwargs):
        kwargs.setdefault("default", argparse.SUPPRESS)
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)
        self.new_flag, self.append = new_flag, append

    def __call__(self, parser, namespace, values, option_string=None):
        warnings.warn(f"{option_string} is now called {self.new_flag}; the old name will be removed.", FutureWarning)
        if self.append:
            values = list(getattr(namespace, self.dest, None) or []) + [values]
        setattr(namespace, self.dest, True if self.nargs == 0 else values)


def add_deprecated_alias(parser: argparse.ArgumentParser, old: str, new: str) -> None:
    """Adds `old` as a hidden alias of the existing flag `new` (same destination, type and arity)."""
    action = next((a for a in parser._actions if new in a.option_strings), None)
    if action is None:
        raise ValueError(f"no flag {new!r} to alias {old!r} to.")
    if isinstance(action, argparse._StoreTrueAction):
        options = dict(nargs=0)
    else:
        options = dict(nargs=action.nargs, type=action.type, choices=action.choices, metavar=action.metavar)
        options["append"] = isinstance(action, argparse._AppendAction)
    parser.add_argument(old, action=_DeprecatedAlias, dest=action.dest, new_flag=new, **options)
