"""Picks the codec backend: the native extension, or its pure-Python twin.

`TINYSERVE_PUREPYTHON=1` forces the twin; otherwise the twin is used only when the extension is not
built (a warning says so, since it is far slower)."""

from __future__ import annotations

import os
import warnings
from types import ModuleType


def _pick() -> tuple[ModuleType, str]:
    if os.environ.get("TINYSERVE_PUREPYTHON", "") not in ("", "0"):
        from tinyserve._fallback import core

        return core, "fallback"
    try:
        from tinyserve._native import _core as core
    except ImportError as exc:  # extension not built
        from tinyserve._fallback import core

        warnings.warn(f"tinyserve native core unavailable ({exc}); using the slow pure-Python codec",
                      RuntimeWarning, stacklevel=2)
        return core, "fallback"
    return core, "native"


core, NAME = _pick()


def available() -> dict[str, ModuleType]:
    """Every backend that can be imported here (tests run against each)."""
    from tinyserve._fallback import core as fallback

    found = {"fallback": fallback}
    try:
        from tinyserve._native import _core as native

        found["native"] = native
    except ImportError:
        pass
    return found
