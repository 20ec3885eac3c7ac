"""Dictionary learners, one file each. Importing this package registers every one of them."""

import importlib
import pkgutil

from dictbench.baselines.base import Baseline, BaselineConfig, LossOutput

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name not in ("base", "init"):
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["Baseline", "BaselineConfig", "LossOutput"]
