"""Command lines: defaults that fall back to LOOKALIKE_* environment variables, mistakes in one line."""

from __future__ import annotations

import argparse
import os


def env_default(name: str, default):
    """LOOKALIKE_<NAME> from the environment, converted to the default's type, else the default."""
    variable = f"LOOKALIKE_{name.upper()}"
    value = os.environ.get(variable)
    if value is None:
        return default
    if default is None:
        return value
    if isinstance(default, bool):
        words = {**dict.fromkeys(("1", "true", "yes", "on"), True), **dict.fromkeys(("0", "false", "no", "off"), False)}
        if value.lower() not in words:
            raise SystemExit(f"{variable}={value!r} is not a valid bool (true/false)")
        return words[value.lower()]
    try:
        return type(default)(value)
    except ValueError:
        raise SystemExit(f"{variable}={value!r} is not a valid {type(default).__name__}") from None


class OneLineArgumentParser(argparse.ArgumentParser):
    """A command-line mistake is one line on stderr and exit status 2 (argparse adds the usage)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see --help)\n")
