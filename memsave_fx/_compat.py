"""Every private torch API memsave_fx uses, in one place.

memsave's passes work inside AOTAutograd and Inductor, whose internals change between torch
releases. Each one used is named here, and resolved when first used (Inductor's modules are
heavy; `import memsave_fx` stays lean). One that a torch release removed or moved raises
`TorchInternalsError` naming the torch version and the symbol, so that memsave never goes on
computing something else. A torch upgrade is this file's work; `check_internals()` resolves
them all at once (the tests and `memsave-fx selftest` call it).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import types
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx

if TYPE_CHECKING:  # for type checkers only: at run time each name resolves on first use
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.backends.debugging import boxed_nop
    from torch._dynamo.backends.distributed import DDPOptimizer
    from torch._functorch._aot_autograd.descriptors import GradAOTOutput, SavedForBackwardsAOTOutput
    from torch._functorch.partitioners import OpTypes, get_default_op_list, min_cut_rematerialization_partition
    from torch._guards import detect_fake_mode
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table
    from torch._inductor.custom_graph_pass import CustomGraphPass, CustomPartitionerFn, get_hash_for_files
    from torch._inductor.graph import GraphLowering
    from torch._inductor.inductor_prims import force_stride_order
    from torch._inductor.output_code import OutputCode
    from torch._inductor.pattern_matcher import stable_topological_sort
    from torch._ops import OpOverload
    from torch._prims_common import get_computation_dtype, is_non_overlapping_and_dense_or_false
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.passes.shape_prop import _extract_tensor_metadata as extract_tensor_metadata

__all__ = ["TorchInternalsError", "check_internals"]

# name here -> (module, attribute) in torch
_INTERNALS: dict[str, tuple[str, str]] = {
    # Dynamo: the eager compiler path, DDP graph splitting
    "aot_autograd": ("torch._dynamo.backends.common", "aot_autograd"),
    "boxed_nop": ("torch._dynamo.backends.debugging", "boxed_nop"),
    "DDPOptimizer": ("torch._dynamo.backends.distributed", "DDPOptimizer"),
    "get_optimize_ddp_mode": ("torch._dynamo.utils", "get_optimize_ddp_mode"),
    "counters": ("torch._dynamo.utils", "counters"),
    "innermost_fn": ("torch._dynamo.eval_frame", "innermost_fn"),  # what Dynamo keeps of a compiled function
    # AOTAutograd: output descriptors of the joint and partitioned graphs, the partitioner
    "GradAOTOutput": ("torch._functorch._aot_autograd.descriptors", "GradAOTOutput"),
    "SavedForBackwardsAOTOutput": ("torch._functorch._aot_autograd.descriptors", "SavedForBackwardsAOTOutput"),
    "min_cut_rematerialization_partition": ("torch._functorch.partitioners", "min_cut_rematerialization_partition"),
    "OpTypes": ("torch._functorch.partitioners", "OpTypes"),
    "get_default_op_list": ("torch._functorch.partitioners", "get_default_op_list"),
    "functorch_config": ("torch._functorch", "config"),
    "partitioner_size_of": ("torch._functorch.partitioners", "_size_of"),  # bytes it prices a value at
    # Inductor: the pass and partitioner hooks, compile entry points, layout decisions
    "CustomGraphPass": ("torch._inductor.custom_graph_pass", "CustomGraphPass"),
    "CustomPartitionerFn": ("torch._inductor.custom_graph_pass", "CustomPartitionerFn"),
    "get_hash_for_files": ("torch._inductor.custom_graph_pass", "get_hash_for_files"),
    "compile_fx": ("torch._inductor.compile_fx", "compile_fx"),
    "select_decomp_table": ("torch._inductor.decomposition", "select_decomp_table"),  # what Inductor lowers
    "OutputCode": ("torch._inductor.output_code", "OutputCode"),
    "GraphLowering": ("torch._inductor.graph", "GraphLowering"),
    "TorchCompileInductorWrapper": ("torch", "_TorchCompileInductorWrapper"),
    "stable_topological_sort": ("torch._inductor.pattern_matcher", "stable_topological_sort"),
    # stores a computed value as a buffer of the given strides (a copy only if it has others)
    "force_stride_order": ("torch._inductor.inductor_prims", "force_stride_order"),
    # fake tensors and metadata
    "detect_fake_mode": ("torch._guards", "detect_fake_mode"),
    "FakeTensor": ("torch._subclasses.fake_tensor", "FakeTensor"),
    "FakeTensorMode": ("torch._subclasses.fake_tensor", "FakeTensorMode"),
    "extract_tensor_metadata": ("torch.fx.passes.shape_prop", "_extract_tensor_metadata"),
    "make_fx": ("torch.fx.experimental.proxy_tensor", "make_fx"),  # traces a computation into a joint graph
    "OpOverload": ("torch._ops", "OpOverload"),
    "get_computation_dtype": ("torch._prims_common", "get_computation_dtype"),
    "pytree": ("torch.utils._pytree", ""),
    "is_non_overlapping_and_dense_or_false": ("torch._prims_common", "is_non_overlapping_and_dense_or_false"),
    # Inductor's lowering of max_pool2d_with_indices: int8 offsets within the window
    "low_memory_max_pool_with_offsets": ("torch.ops.prims", "_low_memory_max_pool_with_offsets"),
    # Inductor's random ops: one draw of seeds per device, which each random op reads
    "inductor_seeds": ("torch.ops.prims", "inductor_seeds"),
}

# AOTAutograd's graph conventions, read and written in node.meta
OUTPUT_DESCRIPTORS = "desc"  # on a graph's output node: what each output is
DYNAMO_GRAPH_ARGUMENT = "grapharg"  # on a Dynamo placeholder: where the input came from
PARTITIONER_TAG = "partitioner_tag"  # where the partitioner must place a node


class TorchInternalsError(ImportError):
    """A torch internal memsave_fx relies on is missing from the installed torch."""


def __getattr__(name: str) -> Any:
    if name not in _INTERNALS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module_name, attribute = _INTERNALS[name]
    value = _resolve(module_name, attribute)
    globals()[name] = value  # resolved once
    return value


def _resolve(module_name: str, attribute: str) -> Any:
    symbol = f"{module_name}.{attribute}"
    try:
        if module_name.startswith("torch.ops."):
            namespace = getattr(torch.ops, module_name.removeprefix("torch.ops."))
            return getattr(namespace, attribute).default
        module = importlib.import_module(module_name)
        return getattr(module, attribute) if attribute else module
    except (ImportError, AttributeError, RuntimeError) as error:
        raise TorchInternalsError(
            f"memsave_fx needs {symbol}, which torch {torch.__version__} does not have ({error}). "
            "This torch release changed an internal memsave's passes rely on; memsave_fx stops "
            "rather than compute something else. Use a torch version memsave_fx is tested on, "
            "or a newer memsave_fx."
        ) from error


def check_internals() -> dict[str, str]:
    """Resolve every internal; return the missing ones, by name, with the error text."""
    missing = {}
    for name in _INTERNALS:
        try:
            __getattr__(name)
        except TorchInternalsError as error:
            missing[name] = str(error)
    return missing


@contextlib.contextmanager
def autograd_cache_disabled() -> Iterator[None]:
    """AOTAutograd's cache off: a hit skips the joint pass and the partitioner, which record."""
    config = __getattr__("functorch_config")
    if not hasattr(config, "enable_autograd_cache"):
        raise TorchInternalsError(
            f"memsave_fx needs torch._functorch.config.enable_autograd_cache, which torch {torch.__version__} does not have"
        )
    with config.patch(enable_autograd_cache=False):
        yield


def autograd_cache_hits() -> int:
    """How many graphs AOTAutograd's cache has served in this process."""
    return __getattr__("counters")["aot_autograd"]["autograd_cache_hit"]


@contextlib.contextmanager
def partitioner_sizes(size_of: Callable[[fx.Node, Callable[[fx.Node], int]], int]) -> Iterator[None]:
    """The min-cut partitioner prices each value at `size_of(node, its_own_size_of)` bytes, in
    its cuts and in its memory-budget knapsack alike."""
    module = importlib.import_module("torch._functorch.partitioners")
    own = __getattr__("partitioner_size_of")
    module._size_of = lambda node: size_of(node, own)
    try:
        yield
    finally:
        module._size_of = own


def inductor_compiler(mode: str | None, options: dict[str, Any]) -> Any:
    """What `torch.compile(backend="inductor", mode=mode, options=options)` compiles with: it
    validates the options and expands the mode, and exposes the resulting `.config`."""
    return __getattr__("TorchCompileInductorWrapper")(mode, options, dynamic=None)


def compile_with_inductor(inductor: Any, gm: fx.GraphModule, example_inputs: Any, config_patches: dict[str, Any]) -> Any:
    """Compile `gm` with `inductor` (an `inductor_compiler`) and `config_patches` on top of its
    own config. Before torch 2.13 the wrapper takes no patches: both go to compile_fx directly."""
    if "config_patches" in inspect.signature(type(inductor).__call__).parameters:
        return inductor(gm, example_inputs, config_patches=config_patches)
    return __getattr__("compile_fx")(gm, example_inputs, config_patches={**inductor.config, **config_patches})


def runs_channels_last(gm: fx.GraphModule) -> bool:
    """Whether Inductor's lowering runs training graph `gm`'s convolutions channels-last (its
    layout optimisation), under the Inductor configuration in effect."""
    return bool(__getattr__("GraphLowering").decide_layout_opt(gm, is_inference=False))


def channels_last_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """The nodes whose dense 4-D values Inductor's lowering lays out channels-last where it must
    choose (a saved value, say): none without layout optimisation; with it, Inductor's own rule
    (a convolution's inputs and outputs, what feeds them, and what they feed)."""
    if not runs_channels_last(gm):
        return set()
    # The rule reads only the graph module of the lowering it is a method of.
    lowering = types.SimpleNamespace(module=gm)
    return set(__getattr__("GraphLowering").find_nodes_prefer_channels_last(lowering))


def tracer_class(graph: fx.Graph) -> type | None:
    """The tracer class a graph was made with, to make a copy of the same kind."""
    return graph._tracer_cls


def tag_for_backward(node: fx.Node) -> None:
    """Place `node` in the backward graph: the partitioner may not compute it in the forward."""
    _tag(node, "must_be_in_backward", "_has_tag_must_be_in_backward")


def tag_for_forward(node: fx.Node) -> None:
    """Place `node` in the forward graph."""
    _tag(node, "must_be_in_forward", "_has_tag_must_be_in_forward")


def is_tagged_for_backward(node: fx.Node) -> bool:
    return node.meta.get(PARTITIONER_TAG) == "must_be_in_backward"


_checked_tags: set[str] = set()


def _tag(node: fx.Node, tag: str, partitioner_predicate: str) -> None:
    node.meta[PARTITIONER_TAG] = tag
    if tag in _checked_tags:
        return
    # Once per tag: the partitioner still reads it, else the rewrite's values could be moved.
    predicate = _resolve("torch._functorch.partitioners", partitioner_predicate)
    if not predicate(node):
        raise TorchInternalsError(
            f"torch {torch.__version__}'s partitioner no longer reads the node tag {PARTITIONER_TAG}={tag!r}"
        )
    _checked_tags.add(tag)


INHERITED_META = (PARTITIONER_TAG, "stack_trace", "seq_nr", "nn_module_stack", "fwd_nn_module_stack")
"""Copied onto new nodes so the partitioner places them and tools can attribute them."""
