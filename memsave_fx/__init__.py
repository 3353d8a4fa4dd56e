"""memsave_fx: keep less for backward when only some parameters are trained.

    torch.compile(model, backend="memsave")
    model = memsave_fx.convert(model)  # eager training, no torch.compile
"""

import torch as _torch

from ._version import __version__, check_torch_version

check_torch_version(_torch.__version__)  # before the modules that rely on torch internals

from .backend import MemsaveBackend, backend  # noqa: E402
from .record import CompiledGraph  # noqa: E402
from .config import MemsaveConfig  # noqa: E402
from .eager import convert, rewrite  # noqa: E402
from .measure import saved_activation_bytes  # noqa: E402
from .plan import MemoryPlan, SavedTensor, plan  # noqa: E402

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
