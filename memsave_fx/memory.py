"""What a partitioned forward/backward pair keeps for backward, and how much memory it allocates.

`saved_storages` lists the storages the forward hands to the backward the way
`saved_tensors_hooks` counts them: views resolved to the storage they share, each storage
once, parameters and buffers left out. `memory_timeline` walks both graphs in execution order
and tracks the bytes alive after each op, each value freed after its last use.

Two facts of Inductor's code generation change what is allocated, and the graphs alone do not
show them, so they are modelled here:
- a pointwise op whose consumers all compute it inside their own kernels (pointwise ops,
  reductions, scatters, concatenations) is fused into them, and its output is never allocated;
- under layout optimisation, a 4-D input or view that a convolution reads, or that is saved,
  is copied to channels-last (`mark_layout_copies`, which must run inside the compilation,
  where Inductor's configuration applies).
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Iterable

import torch
import torch.fx as fx

from . import _compat
from .analysis import SOURCE, InputKind, is_tangent

aten = torch.ops.aten

LAYOUT_COPY = "memsave_layout_copy"  # on an input or view Inductor copies to channels-last

# Ops whose output shares its input's storage although their schemas do not say so.
_STORAGE_SHARING_OPS = frozenset({aten._unsafe_view.default, aten._reshape_alias.default})


@dataclasses.dataclass(frozen=True)
class SavedStorage:
    """One storage the forward keeps for backward."""

    base: fx.Node  # the forward node that allocates it
    saved: tuple[fx.Node, ...]  # the saved values that live in it
    nbytes: int
    layout_copy: bool  # a channels-last copy Inductor makes of `base`, an input or a view


@dataclasses.dataclass(frozen=True)
class Timeline:
    """Bytes alive after each op beyond the graph inputs (parameters, buffers, the caller's inputs)."""

    forward: tuple[int, ...]
    backward: tuple[int, ...]

    @property
    def peak(self) -> int:
        return max((*self.forward, *self.backward), default=0)


def saved_outputs(forward: fx.GraphModule) -> list[fx.Node]:
    """The forward's outputs that go to the backward, tensors only."""
    output = forward.graph.output_node()
    values = output.args[0]
    descs = output.meta.get(_compat.OUTPUT_DESCRIPTORS) or [None] * len(values)
    return [
        value
        for value, desc in zip(values, descs)
        if isinstance(desc, _compat.SavedForBackwardsAOTOutput) and _is_tensor(value)
    ]


def user_outputs(forward: fx.GraphModule) -> list[fx.Node]:
    """The forward's tensor outputs that go to the caller (model outputs, mutated inputs)."""
    output = forward.graph.output_node()
    saved = set(saved_outputs(forward))
    return [value for value in output.args[0] if _is_tensor(value) and value not in saved]


def storage_base(node: fx.Node) -> fx.Node:
    """The node whose allocation `node`'s value lives in (itself unless it is a view)."""
    while (base := _viewed(node)) is not None:
        node = base
    return node


def saved_storages(forward: fx.GraphModule) -> list[SavedStorage]:
    groups: dict[fx.Node, list[fx.Node]] = {}
    for node in saved_outputs(forward):
        groups.setdefault(storage_base(node), []).append(node)
    storages = []
    for base, nodes in groups.items():
        layout_copy = bool(base.meta.get(LAYOUT_COPY))
        if not layout_copy and is_parameter_or_buffer(base):
            continue  # held by the module anyway; the hooks' definition leaves it out
        storages.append(SavedStorage(base, tuple(nodes), allocation_nbytes(base), layout_copy))
    return storages


def mark_layout_copies(gm: fx.GraphModule) -> None:
    """Mark the graph inputs and views that Inductor's lowering copies to channels-last.

    Under layout optimisation, Inductor gives dense 4-D values on the way to a convolution
    channels-last strides. A computed value is simply laid out so; an input or a view is copied
    where a convolution reads it, or where it is saved (then the copy is what is saved). This
    applies Inductor's own decisions (`decide_layout_opt`, `find_nodes_prefer_channels_last`),
    so it must run under the configuration of the compilation.
    """
    prefer_channels_last = _compat.channels_last_nodes(gm)
    if not prefer_channels_last:
        return  # no layout optimisation
    saved = set(saved_outputs(gm))
    convolution_arguments = {
        argument
        for conv in gm.graph.find_nodes(op="call_function", target=aten.convolution.default)
        for argument in conv.args[:2]
    }
    for node in (saved & prefer_channels_last) | convolution_arguments:
        value = node.meta.get("val") if isinstance(node, fx.Node) else None
        if (
            (node.op == "placeholder" or _viewed(node) is not None)
            and isinstance(value, torch.Tensor)
            and value.dim() == 4
            and _compat.is_non_overlapping_and_dense_or_false(value)
            and not value.is_contiguous(memory_format=torch.channels_last)
        ):
            node.meta[LAYOUT_COPY] = True


def memory_timeline(forward: fx.GraphModule, backward: fx.GraphModule | None, *, fuses_pointwise: bool) -> Timeline:
    """Bytes alive after each op of the forward, then of the backward, beyond the graph inputs.

    The forward ends holding what it saved and what it returned. The backward starts with those
    plus the incoming gradients, frees each saved tensor after its last use, and ends holding
    the gradients it returned and the forward's outputs.
    """
    saved = saved_storages(forward)
    forward_steps = _walk(
        forward.graph,
        fuses_pointwise=fuses_pointwise,
        start={},
        kept=[*saved_outputs(forward), *user_outputs(forward)],
        aliases={},
    )
    if backward is None:
        return Timeline(tuple(forward_steps), ())
    saved_bases = {storage.base for storage in saved}
    returned = {storage_base(node) for node in user_outputs(forward)} - saved_bases
    returned_bytes = sum(allocation_nbytes(node) for node in returned if node.op != "placeholder")
    # The backward receives each saved value as a placeholder of the same name. Saved graph
    # inputs (not copies) are the caller's tensors: already counted with the inputs.
    storage_of = {node.name: storage for storage in saved for node in storage.saved}
    received: dict[fx.Node, object] = {}
    start: dict[object, int] = {}
    for placeholder in backward.graph.find_nodes(op="placeholder"):
        storage = storage_of.get(placeholder.name)
        if storage is not None and (storage.layout_copy or storage.base.op != "placeholder"):
            received[placeholder] = storage
            start[storage] = storage.nbytes
        elif is_tangent(placeholder) and _is_tensor(placeholder):
            start[placeholder] = allocation_nbytes(placeholder)
    backward_steps = _walk(
        backward.graph,
        fuses_pointwise=fuses_pointwise,
        start=start,
        kept=backward.graph.output_node().all_input_nodes,
        aliases=received,
        offset=returned_bytes,
    )
    return Timeline(tuple(forward_steps), tuple(backward_steps))


def allocation_nbytes(node: fx.Node) -> int:
    """The bytes `node`'s own allocation takes (a dense copy, for a layout copy)."""
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor):
        return 0
    if node.meta.get(LAYOUT_COPY):
        return size_hint(value.numel()) * value.element_size()
    return size_hint(value.untyped_storage().nbytes())


def _walk(
    graph: fx.Graph,
    *,
    fuses_pointwise: bool,
    start: dict[object, int],
    kept: Iterable[fx.Node],
    aliases: dict[fx.Node, object],
    offset: int = 0,
) -> list[int]:
    """Live bytes after each op. Storages are keyed by the node allocating them, or by
    `aliases[node]` for placeholders backed by a storage of `start` (alive from the beginning).
    The storages of `kept` nodes are never freed; placeholders allocate nothing."""
    nodes = list(graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    materialized = _materialized(nodes, fuses_pointwise)

    def storage_key(node: fx.Node) -> object:
        base = storage_base(node)
        return base if base.meta.get(LAYOUT_COPY) else aliases.get(base, base)

    # Where each value is computed: a fused op runs inside the kernels of its consumers.
    computed_at: dict[fx.Node, int] = {}
    for node in reversed(nodes):
        consumers = [computed_at[user] for user in node.users]
        fused = node.op == "call_function" and node not in materialized and _viewed(node) is None
        computed_at[node] = max(consumers) if fused and consumers else position[node]
    last_use: dict[object, int] = {key: 0 for key in start}
    for node in nodes:
        if node.op == "output" or not (_is_tensor(node) or node.target is operator.getitem):
            continue
        key = storage_key(node)
        uses = [computed_at[user] for user in node.users]
        last_use[key] = max(last_use.get(key, 0), computed_at[node], *uses)
    never_freed = {storage_key(node) for node in kept}
    frees: dict[int, list[object]] = {}
    for key, when in last_use.items():
        if key not in never_freed:
            frees.setdefault(when, []).append(key)

    live = dict(start)
    total = offset + sum(live.values())
    steps = []
    for i, node in enumerate(nodes):
        if node in materialized:
            live[node] = allocation_nbytes(node)
            total += live[node]
        steps.append(total)
        for key in frees.get(i, ()):
            total -= live.pop(key, 0)
    return steps


def _materialized(nodes: Iterable[fx.Node], fuses_pointwise: bool) -> set[fx.Node]:
    """The nodes that allocate their output (not views, not fused into their consumers)."""
    materialized: set[fx.Node] = set()
    fusible_consumer: dict[fx.Node, bool] = {}
    for node in reversed(list(nodes)):
        if node.meta.get(LAYOUT_COPY):
            materialized.add(node)
        if node.op != "call_function":
            fusible_consumer[node] = False
            continue
        if _viewed(node) is not None:
            fusible_consumer[node] = all(fusible_consumer[u] for u in node.users)
            continue
        inline = _computed_inline(node)
        fusible_consumer[node] = inline or _fuses_its_inputs(node)
        if not _is_tensor(node) and node.target is not operator.getitem:
            continue  # a tuple of outputs: its getitems are the allocations
        fused = fuses_pointwise and inline and bool(node.users) and all(fusible_consumer[u] for u in node.users)
        if not fused:
            materialized.add(node)
    return materialized


# Ops Inductor lowers as pointwise computations although their schemas carry no pointwise
# tag, and consumers that compute pointwise inputs inside their own kernels (by name, all
# overloads: Inductor registers some of these ops only once it is imported).
_INLINE_OPS = frozenset(
    {
        "aten::full",
        "aten::scalar_tensor",
        "aten::arange",
        "prims::iota",
        "prims::_low_memory_max_pool_offsets_to_indices",
        "aten::constant_pad_nd",
        "aten::index",
        "aten::gather",
    }
)
_INPUT_FUSING_OPS = frozenset(
    {
        "aten::cat",
        "aten::scatter",
        "aten::scatter_add",
        "aten::index_put",
        "aten::slice_scatter",
        "aten::select_scatter",
        "prims::inductor_force_stride_order",  # realizes a computed input in the layout asked for
    }
)
_MAX_POINTWISE_CAT_INPUTS = 8  # Inductor's max_pointwise_cat_inputs: a cat of more is a buffer


def _op_name(target: object) -> str:
    if isinstance(target, _compat.OpOverload):
        return target.name().partition(".")[0]
    return ""


def _computed_inline(node: fx.Node) -> bool:
    if node.target is aten.cat.default:
        return len(node.args[0]) <= _MAX_POINTWISE_CAT_INPUTS
    return torch.Tag.pointwise in getattr(node.target, "tags", ()) or _op_name(node.target) in _INLINE_OPS


def _fuses_its_inputs(node: fx.Node) -> bool:
    return torch.Tag.reduction in getattr(node.target, "tags", ()) or _op_name(node.target) in _INPUT_FUSING_OPS


def _viewed(node: fx.Node) -> fx.Node | None:
    """The node whose storage `node` is a view of, or None (also for a copy Inductor makes)."""
    if node.op != "call_function" or node.meta.get(LAYOUT_COPY):
        return None
    target = node.target
    if target is operator.getitem:
        parent = node.args[0]
        return _viewed(parent) if isinstance(parent, fx.Node) and _is_view_op(parent.target) else None
    if _is_view_op(target) or (target is aten.reshape.default and _is_contiguous(node.args[0])):
        source = node.args[0]
        return source if isinstance(source, fx.Node) else None
    return None


def _is_view_op(target: object) -> bool:
    return isinstance(target, _compat.OpOverload) and (target.is_view or target in _STORAGE_SHARING_OPS)


def _is_contiguous(node: object) -> bool:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return isinstance(value, torch.Tensor) and bool(value.is_contiguous())


def _is_tensor(node: object) -> bool:
    return isinstance(node, fx.Node) and isinstance(node.meta.get("val"), torch.Tensor)


def is_parameter_or_buffer(node: fx.Node) -> bool:
    source = node.meta.get(SOURCE)
    return node.op == "placeholder" and source is not None and source.kind is not InputKind.INPUT


def size_hint(value: int | torch.SymInt) -> int:
    """A concrete size: symbolic sizes are estimated from the example inputs' sizes."""
    if isinstance(value, torch.SymInt):
        from torch.fx.experimental.symbolic_shapes import optimization_hint

        return optimization_hint(value, fallback=1)
    return int(value)
