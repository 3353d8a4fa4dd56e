"""`rewrite(gm)`: memory-saving calls in a traced forward module, or the backend's passes on a joint graph."""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from .. import _compat
from ..analysis import is_tangent
from .replacements import FUNCTIONS, METHODS, MODULES

log = logging.getLogger(__name__)

# On a rewritten GraphModule's `meta`: the `Replacement`s (forward modules) or the passes'
# `Rewrite`s (joint graphs), applied and declined alike.
REWRITES = "memsave_rewrites"

# Overriding any of these changes what a module computes.
_FORWARD_METHODS = ("forward", "_conv_forward", "_output_padding", "_check_input_dim")


@dataclasses.dataclass(frozen=True)
class Replacement:
    """One call of a traced forward module that the rewrite replaced, or left and why."""

    node: str
    applied: bool
    reason: str


def rewrite(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of `gm` that keeps less for backward, sharing `gm`'s parameters and buffers.

    A forward module (from `torch.fx.symbolic_trace`, say) gets memory-saving autograd
    Functions in place of its convolutions, batch norms, ReLU-family activations, max-pools and
    dropouts, whether called as modules or functions. A joint forward/backward graph (one with
    `tangents_*` placeholders, from AOTAutograd or `make_fx` of a training step) gets the
    backend's own analysis and rewrite passes. Either way `gm.meta["memsave_rewrites"]` lists
    what changed and what was left, with reasons.
    """
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(
            "memsave_fx.rewrite takes a torch.fx.GraphModule (from torch.fx.symbolic_trace, make_fx "
            f"or AOTAutograd), got {type(gm).__name__}; for an nn.Module use memsave_fx.convert"
        )
    rewritten = fx.GraphModule(gm, _copy_graph(gm.graph), class_name=type(gm).__name__)
    graph = rewritten.graph
    if any(map(is_tangent, graph.find_nodes(op="placeholder"))):
        records = _rewrite_joint_graph(rewritten)
    else:
        records = [_replace_call(graph, node, gm) for node in list(graph.nodes)]
        records = [r for r in records if r is not None]
    rewritten.recompile()
    rewritten.training = gm.training
    rewritten.meta.update(gm.meta)
    rewritten.meta[REWRITES] = records
    for record in records:
        log.debug("%s", record)
    return rewritten


def _copy_graph(graph: fx.Graph) -> fx.Graph:
    """A copy of `graph`'s nodes (metadata copied shallowly, as `Graph.__deepcopy__` does) that
    shares its code generator, which holds no nodes: deep-copying a pytree code generator warns."""
    copied = fx.Graph(tracer_cls=_compat.tracer_class(graph))
    value, output = copied.graph_copy(graph, {}, return_output_node=True)
    copied.output(value, type_expr=output.type).meta = copy.copy(output.meta)
    copied._codegen = graph._codegen
    return copied


def _rewrite_joint_graph(gm: fx.GraphModule) -> list:
    # Imported here: the passes pull in sympy, which `import memsave_fx` avoids.
    from ..config import MemsaveConfig
    from ..passes import run_passes

    placeholders = gm.graph.find_nodes(op="placeholder")
    missing = [n.name for n in placeholders if "val" not in n.meta]
    if missing:
        raise ValueError(
            "memsave_fx.rewrite needs fake values in node.meta['val'] on a joint graph, as make_fx and "
            f"AOTAutograd record them; these placeholders have none: {', '.join(missing[:5])}"
        )
    _fake_values_in_one_mode(gm)
    return run_passes(gm.graph, MemsaveConfig())


def _fake_values_in_one_mode(gm: fx.GraphModule) -> None:
    """Propagate fresh fake values when the graph's come from several fake modes (as `make_fx`
    of real tensors leaves them): the passes compute new values from their inputs' together."""
    values = [v for n in gm.graph.nodes for v in _compat.pytree.tree_leaves(n.meta.get("val")) if isinstance(v, _compat.FakeTensor)]
    if len({id(v.fake_mode) for v in values}) <= 1:
        return
    mode = _compat.FakeTensorMode()
    inputs = []
    for placeholder in gm.graph.find_nodes(op="placeholder"):
        value = placeholder.meta["val"]
        if isinstance(value, torch.Tensor):
            with mode:
                value = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=value.device)
        inputs.append(value)
    FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*inputs)


def _replace_call(graph: fx.Graph, node: fx.Node, gm: fx.GraphModule) -> Replacement | None:
    """Point `node` at its memory-saving replacement; None for a call that has none."""
    if node.op == "call_function" and node.target in FUNCTIONS:
        node.target = FUNCTIONS[node.target]
        return Replacement(node.name, True, f"calls {_qualified_name(node.target)}")
    if node.op == "call_method" and node.target in METHODS:
        return _call_function(node, METHODS[node.target], node.args)
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        replacement = module_replacement(module)
        if replacement is None:
            return None
        if isinstance(replacement, str):
            return Replacement(node.name, False, f"{node.target} ({type(module).__name__}) {replacement}")
        with graph.inserting_before(node):
            module_node = graph.create_node("get_attr", node.target, name=f"{node.name}_module")
        return _call_function(node, replacement, (module_node, *node.args))
    return None


def _call_function(node: fx.Node, target: Callable[..., object], args: tuple) -> Replacement:
    # Changed in place, so the node keeps its name, position and metadata.
    node.op, node.target, node.args = "call_function", target, args
    return Replacement(node.name, True, f"calls {_qualified_name(target)}")


def module_replacement(module: nn.Module) -> Callable[..., object] | str | None:
    """The replacement for calls of `module`, why there is none, or None if it saves nothing memsave could."""
    base = next((cls for cls in type(module).__mro__ if cls in MODULES), None)
    if base is None:
        return None
    overridden = [m for m in _FORWARD_METHODS if getattr(type(module), m, None) is not getattr(base, m, None)]
    if overridden:
        return f"overrides {', '.join(overridden)} of {base.__name__}, so it may compute something else"
    hooks = [kind for kind in ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks") if getattr(module, kind)]
    if hooks:
        return f"has {', '.join(h.strip('_').replace('_', ' ') for h in hooks)}, which a function call would skip"
    return MODULES[base]


def _qualified_name(target: Callable[..., object]) -> str:
    return f"{target.__module__}.{target.__qualname__}"
