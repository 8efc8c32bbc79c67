"""The KV cache modes, one file each; each registers its layer class (registry.register_kv_mode) when imported.

``load_all()`` (called by the registry on its first lookup) imports every module of this package, so a new mode is
one new file here (plus its tests). ``ORDER`` only sets the order the built-in modes are listed in.
"""
from __future__ import annotations

import importlib
import pkgutil

ORDER = ("static", "dynamic", "kivi", "logquant", "fp16")


def load_all() -> None:
    found = {m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")}
    for name in [n for n in ORDER if n in found] + sorted(found - set(ORDER)):
        importlib.import_module(f"{__name__}.{name}")
