"""Command-line defaults that fall back to LOOKALIKE_* environment variables."""

from __future__ import annotations

import os


def env_default(name: str, default):
    """LOOKALIKE_<NAME> from the environment, converted to the default's type, else the default."""
    value = os.environ.get(f"LOOKALIKE_{name.upper()}")
    if value is None:
        return default
    return type(default)(value) if default is not None else value
