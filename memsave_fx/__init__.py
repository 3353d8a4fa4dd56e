"""memsave_fx: keep less for backward when only some parameters are trained.

    torch.compile(model, backend="memsave")
    model = memsave_fx.convert(model)  # eager training, no torch.compile
"""

from ._version import __version__
from .backend import CompiledGraph, MemsaveBackend, backend
from .config import MemsaveConfig
from .eager import convert, rewrite
from .measure import saved_activation_bytes
from .plan import MemoryPlan, SavedTensor, plan

__all__ = [
    "CompiledGraph",
    "MemsaveBackend",
    "MemsaveConfig",
    "MemoryPlan",
    "SavedTensor",
    "__version__",
    "backend",
    "convert",
    "plan",
    "rewrite",
    "saved_activation_bytes",
]
