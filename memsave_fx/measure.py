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
    `nn.Module`, its parameters and buffers are excluded automatically, as they are at each
    save: FSDP2 swaps its sharded parameters for gathered ones while a module group runs.
    """
    excluded_storages = {_storage_key(t) for t in exclude}
    modules = [fn] if isinstance(fn, torch.nn.Module) else []
    saved: dict[tuple[int, torch.device], int] = {}

    @torch.compiler.disable  # called from compiled regions; nothing here is meant to be traced
    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key = _storage_key(tensor)
        if key not in excluded_storages and not any(
            key == _storage_key(t) for module in modules for t in (*module.parameters(), *module.buffers())
        ):
            saved[key] = tensor.untyped_storage().nbytes()
        return tensor

    with saved_tensors_hooks(pack, lambda tensor: tensor):
        result = fn(*args, **kwargs)
    return result, sum(saved.values())


def _storage_key(tensor: torch.Tensor) -> tuple[int, torch.device]:
    if is_sharded(tensor):  # a sharded parameter: its storage is its local shard's
        tensor = tensor.to_local()
    return tensor.untyped_storage().data_ptr(), tensor.device


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a DTensor, as FSDP2's and tensor parallelism's parameters are."""
    if not torch.distributed.is_available():
        return False
    # Imported here: torch.distributed.tensor is heavy, and `import memsave_fx` stays lean.
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)
