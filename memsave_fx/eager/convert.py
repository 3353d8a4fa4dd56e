"""`convert(model)`: trace and rewrite a model, or where it cannot be traced, its largest traceable parts."""

from __future__ import annotations

import copy
import functools
import inspect
import warnings
from collections.abc import Callable

import torch.fx as fx
from torch import nn

from .rewrite import REWRITES, module_replacement, rewrite


def convert(model: nn.Module) -> nn.Module:
    """`model`, keeping less for backward in eager mode; its parameters and buffers are shared.

    The model is traced with `torch.fx.symbolic_trace` and rewritten (see `rewrite`). A model
    that cannot be traced (data-dependent control flow, as in many transformers models) keeps
    its own code, and each of its largest traceable submodules is rewritten instead; a warning
    names the modules whose own code stays unconverted. `model` itself is not modified, and
    `state_dict()` keys stay the same.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"memsave_fx.convert takes an nn.Module, got {type(model).__name__}")
    untraceable: dict[str, str] = {}
    converted = _convert(model, "", untraceable)
    if untraceable:
        listing = "; ".join(f"{name or 'the model'} ({reason})" for name, reason in untraceable.items())
        warnings.warn(
            f"memsave_fx.convert could not trace {len(untraceable)} module(s), whose own code stays "
            f"unconverted; their traceable submodules were converted: {listing}",
            stacklevel=2,
        )
    return converted


def _convert(module: nn.Module, name: str, untraceable: dict[str, str]) -> nn.Module:
    if type(module).forward is nn.Module.forward:  # a container such as ModuleList: no code of its own
        return _convert_children(module, name, untraceable)
    replacement = module_replacement(module)
    if replacement is not None:
        # A layer stays an instance of its class, so that code reading its attributes (a
        # dropout's p, a conv's stride) still finds them; only its forward is memsave's.
        return module if isinstance(replacement, str) else _with_forward(module, replacement)
    optional = [p.name for p in inspect.signature(module.forward).parameters.values() if p.default is None]
    if optional:
        # A trace sees a proxy, never None, so it would fix every `is None` test on these
        # arguments to one branch, and calls that leave them out would run the other's code.
        untraceable[name] = f"{type(module).__name__}: its optional arguments ({', '.join(optional)}) may be None"
        return _convert_children(module, name, untraceable)
    try:
        traced = fx.symbolic_trace(module)
    except Exception as error:  # symbolic_trace fails in many ways: TraceError, TypeError, ...
        untraceable[name] = f"{type(module).__name__}: {_first_line(error)}"
        return _convert_children(module, name, untraceable)
    rewritten = rewrite(traced)
    if not any(r.applied for r in rewritten.meta[REWRITES]):
        return module
    _mirror_registries(rewritten, module)
    return rewritten


def _convert_children(module: nn.Module, name: str, untraceable: dict[str, str]) -> nn.Module:
    children = {
        child_name: _convert(child, f"{name}.{child_name}" if name else child_name, untraceable)
        for child_name, child in module.named_children()
    }
    if all(children[n] is child for n, child in module.named_children()):
        return module
    copied = _shallow_copy(module)
    for child_name, child in children.items():
        copied._modules[child_name] = child
    return copied


def _with_forward(module: nn.Module, replacement: Callable[..., object]) -> nn.Module:
    """A shallow copy of `module` whose forward calls `replacement(module, *args)`."""
    copied = _shallow_copy(module)
    copied.forward = functools.partial(replacement, copied)
    return copied


def _shallow_copy(module: nn.Module) -> nn.Module:
    """A copy sharing the tensors and submodules of `module` but with registries of its own
    (parameters, buffers, submodules, hooks), so that changing one leaves the other as it is."""
    copied = copy.copy(module)
    for name, value in vars(module).items():
        if isinstance(value, (dict, set)):
            setattr(copied, name, copy.copy(value))
    return copied


def _mirror_registries(traced: nn.Module, original: nn.Module) -> None:
    """Give the modules a trace built the parameters, buffers and submodules of the originals
    they stand for, in the same order: a trace keeps only what the code reached, in the order
    it reached it, but state_dict keys and `parameters()` order must stay the model's."""
    if traced is original:
        return
    for registry in ("_parameters", "_buffers", "_modules"):
        ours, theirs = getattr(traced, registry), getattr(original, registry)
        merged = {name: ours.get(name, value) for name, value in theirs.items()}
        merged |= {name: value for name, value in ours.items() if name not in merged}
        ours.clear()
        ours.update(merged)
    traced._non_persistent_buffers_set |= original._non_persistent_buffers_set
    for name, child in original.named_children():
        _mirror_registries(traced._modules[name], child)


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
