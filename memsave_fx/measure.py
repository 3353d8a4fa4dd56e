"""Measure saved activation bytes the way the API defines them."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.autograd.graph import saved_tensors_hooks


def saved_activation_bytes(
    fn: Callable[..., Any], *args: Any, exclude: Iterable[torch.Tensor] = (), **kwargs: Any
) -> tuple[Any, int]:
    """Run `fn(*args, **kwargs)`; return its result and the bytes it kept for backward.

    Counts what `saved_tensors_hooks` sees during the call, each storage once, leaving out
    the storages of `exclude` (pass the model's parameters and buffers). When `fn` is an
    `nn.Module`, its parameters and buffers are excluded automatically.
    """
    excluded = [*exclude]
    if isinstance(fn, torch.nn.Module):
        excluded += [*fn.parameters(), *fn.buffers()]
    excluded_storages = {_storage_key(t) for t in excluded}
    saved: dict[tuple[int, torch.device], int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key = _storage_key(tensor)
        if key not in excluded_storages:
            saved[key] = tensor.untyped_storage().nbytes()
        return tensor

    with saved_tensors_hooks(pack, lambda tensor: tensor):
        result = fn(*args, **kwargs)
    return result, sum(saved.values())


def _storage_key(tensor: torch.Tensor) -> tuple[int, torch.device]:
    return tensor.untyped_storage().data_ptr(), tensor.device
