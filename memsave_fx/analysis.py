"""Which gradients a joint forward/backward graph really computes, and what each backward read is for.

The joint graph that AOTAutograd hands to the pass has `primals_*` placeholders (parameters,
buffers and user inputs alike), `tangents_*` placeholders, and one output list holding the
forward outputs followed by one gradient slot per primal. A frozen parameter looks like any
other primal: it shows only as a `None` gradient slot, and in the `output_mask` of fused
backward ops that still read its partner activation.

`analyze_joint_graph` writes its results into `node.meta`; it is the single source of truth
for the rewrite passes and for the memory plan:

- ``IS_BACKWARD``: the node depends on a tangent, or is tagged to run in the backward.
- ``IS_FORWARD``: the node is needed to compute the forward outputs. A node that is neither
  (a backward recomputation of a forward value) runs wherever the partitioner puts it.
- ``DIFFERENTIABLE``: the node depends on a primal whose gradient is requested.
- ``LIVE_OUTPUTS``: which of the node's outputs feed a requested gradient (output indices;
  single-output nodes use index 0).
- ``ARG_PURPOSES``: for each tensor argument (by schema name), what the node reads it for.
- ``BACKWARD_READS``: on every value computed without tangents and read by the backward,
  the list of `BackwardRead(reader, argument, purpose)`.
"""

from __future__ import annotations

import dataclasses
import enum
import operator
from collections.abc import Iterable, Sequence

import torch
import torch.fx as fx

from . import _compat

aten = torch.ops.aten

IS_BACKWARD = "memsave_is_backward"
IS_FORWARD = "memsave_is_forward"
DIFFERENTIABLE = "memsave_differentiable"
LIVE_OUTPUTS = "memsave_live_outputs"
ARG_PURPOSES = "memsave_arg_purposes"
BACKWARD_READS = "memsave_backward_reads"
GRADIENT_OF = "memsave_gradient_of"  # on a primal placeholder: its gradient node, or None
SOURCE = "memsave_source"  # on a primal placeholder: the `GraphInput` it holds
SAVED_AS = "memsave_saved_as"  # on a forward value saved in place of another: a `SavedAs`
CODE_BITS = "memsave_code_bits"  # on a forward value of small codes: the bits each element needs
# On a backward value that Inductor's lowering copies to channels-last where a convolution or a
# convolution backward reads it as its weight.
CONVERTED_FOR_CONVOLUTION = "memsave_converted_for_convolution"


class InputKind(enum.Enum):
    PARAMETER = "parameter"
    BUFFER = "buffer"
    INPUT = "input"  # anything the caller passes: the model's inputs, other tensors


@dataclasses.dataclass(frozen=True)
class GraphInput:
    """A Dynamo graph input, named as users know it: "layer1.0.conv1.weight", "args[0]"."""

    name: str
    kind: InputKind


class Decision(enum.Enum):
    """What memsave does with a tensor stock compilation would keep for backward."""

    KEPT = "kept"
    DROPPED = "dropped"
    COMPRESSED = "compressed"  # kept exactly, in fewer bytes
    APPROXIMATED = "approximated"  # replaced by a lossy stand-in
    SHARED = "shared"  # rebuilt from another kept tensor


@dataclasses.dataclass(frozen=True)
class SavedAs:
    """Marks a saved forward value that stands in for `original` (a node name)."""

    decision: Decision
    original: str
    reason: str


class ReadPurpose(enum.Enum):
    GRADIENT = "gradient"  # the data feeds a requested gradient
    UNREQUESTED = "unrequested"  # the data feeds only outputs that nobody requested
    METADATA = "metadata"  # only shape, strides, dtype or device are used


@dataclasses.dataclass(frozen=True)
class BackwardRead:
    reader: fx.Node
    argument: str
    purpose: ReadPurpose


@dataclasses.dataclass(frozen=True)
class JointGraphInfo:
    primals: tuple[fx.Node, ...]
    tangents: tuple[fx.Node, ...]
    gradients: dict[fx.Node, fx.Node]  # primal -> its gradient, for requested gradients only

    @property
    def frozen_primals(self) -> tuple[fx.Node, ...]:
        return tuple(p for p in self.primals if p not in self.gradients)


# For fused backward ops, the outputs whose *data* depend on an argument's data, by schema
# argument name. Arguments not listed feed every output. An empty set means the kernel reads
# only the argument's metadata.
_ALL = None
_OutputDeps = dict[str, frozenset[int]]


def _convolution_backward_deps(node: fx.Node) -> _OutputDeps:
    # Outputs: grad_input, grad_weight, grad_bias. grad_input needs only the input's shape,
    # grad_weight only the weight's; an output the mask leaves out is not computed at all.
    grad_input, grad_weight, _ = node.args[10] if len(node.args) > 10 else node.kwargs["output_mask"]
    return {
        "input": frozenset({1}) if grad_weight else frozenset(),
        "weight": frozenset({0}) if grad_input else frozenset(),
    }


def _native_batch_norm_backward_deps(node: fx.Node) -> _OutputDeps:
    train = node.args[7] if len(node.args) > 7 else node.kwargs["train"]
    if train:
        return {}
    # Eval mode normalises with the running statistics: grad_input = grad_out * weight * rstd.
    return {
        "input": frozenset({1}),
        "weight": frozenset({0}),
        "running_mean": frozenset({1}),
        "running_var": frozenset({0, 1}),
        "save_mean": frozenset(),
        "save_invstd": frozenset(),
    }


# Backward ops that read one argument only for its shape; a pass may hand them an
# uninitialised stand-in, since their kernels (aten and Inductor lowerings alike) never touch
# that argument's data.
SHAPE_ONLY_BACKWARD_OPS = frozenset(
    {
        aten.avg_pool2d_backward.default,
        aten.avg_pool3d_backward.default,
        aten._adaptive_avg_pool2d_backward.default,
        aten._adaptive_avg_pool3d_backward.default,
        aten.max_pool2d_with_indices_backward.default,
        aten.max_pool3d_with_indices_backward.default,
        aten.reflection_pad1d_backward.default,
        aten.reflection_pad2d_backward.default,
        aten.reflection_pad3d_backward.default,
        aten.replication_pad1d_backward.default,
        aten.replication_pad2d_backward.default,
        aten.replication_pad3d_backward.default,
    }
)
_SHAPE_ONLY_OPS = SHAPE_ONLY_BACKWARD_OPS | {
    aten.empty_like.default,
    aten.zeros_like.default,
    aten.ones_like.default,
    aten.full_like.default,
    aten.new_empty.default,
    aten.new_zeros.default,
    aten.new_ones.default,
    aten.new_full.default,
    aten.sym_size.int,
    aten.sym_stride.int,
    aten.sym_numel.default,
    aten.sym_storage_offset.default,
}


def _self_shape_only_deps(node: fx.Node) -> _OutputDeps:
    return {"self": frozenset()}


_OUTPUT_DEPS = {
    aten.convolution_backward.default: _convolution_backward_deps,
    aten.native_batch_norm_backward.default: _native_batch_norm_backward_deps,
    **{op: _self_shape_only_deps for op in _SHAPE_ONLY_OPS},
}


def tensor_arguments(node: fx.Node) -> Iterable[tuple[str, fx.Node]]:
    """(schema argument name, input node) for every node argument, lists flattened."""
    schema = getattr(node.target, "_schema", None)
    names = [a.name for a in schema.arguments] if schema is not None else []
    for i, arg in enumerate(node.args):
        name = names[i] if i < len(names) else str(i)
        for leaf in _compat.pytree.tree_leaves(arg):
            if isinstance(leaf, fx.Node):
                yield name, leaf
    for name, arg in node.kwargs.items():
        for leaf in _compat.pytree.tree_leaves(arg):
            if isinstance(leaf, fx.Node):
                yield name, leaf


def _output_deps(node: fx.Node) -> _OutputDeps:
    deps_of = _OUTPUT_DEPS.get(node.target)
    return deps_of(node) if deps_of is not None else {}


def is_tangent(node: fx.Node) -> bool:
    return node.op == "placeholder" and str(node.target).startswith("tangents")


def is_primal(node: fx.Node) -> bool:
    return node.op == "placeholder" and str(node.target).startswith("primals")


def _split_outputs(graph: fx.Graph, primals: tuple[fx.Node, ...]) -> tuple[list[fx.Node], dict[fx.Node, fx.Node]]:
    """The forward outputs, and each primal whose gradient is requested mapped to its gradient."""
    output = graph.output_node()
    values = list(output.args[0]) if isinstance(output.args[0], (list, tuple)) else [output.args[0]]
    descs = output.meta.get(_compat.OUTPUT_DESCRIPTORS)
    if descs is not None and len(descs) == len(values):
        primal_by_desc = {p.meta.get(_compat.OUTPUT_DESCRIPTORS): p for p in primals}
        forward, slots = [], {}
        for value, desc in zip(values, descs):
            if isinstance(desc, _compat.GradAOTOutput):
                if isinstance(value, fx.Node):
                    slots[primal_by_desc[desc.grad_of]] = value
            elif isinstance(value, fx.Node):
                forward.append(value)
        return forward, slots
    # Without descriptors, AOTAutograd's layout: forward outputs, then one slot per primal.
    split = len(values) - len(primals)
    forward = [v for v in values[:split] if isinstance(v, fx.Node)]
    return forward, {p: g for p, g in zip(primals, values[split:]) if isinstance(g, fx.Node)}


def _ancestors(nodes: Iterable[fx.Node]) -> set[fx.Node]:
    found = set(nodes)
    frontier = list(found)
    while frontier:
        for source in frontier.pop().all_input_nodes:
            if source not in found:
                found.add(source)
                frontier.append(source)
    return found


def analyze_joint_graph(graph: fx.Graph) -> JointGraphInfo | None:
    """Annotate `graph` in place; None (and no annotations) for a graph without backward."""
    tangents = tuple(n for n in graph.find_nodes(op="placeholder") if is_tangent(n))
    if not tangents:
        return None
    primals = tuple(n for n in graph.find_nodes(op="placeholder") if is_primal(n))
    forward_outputs, gradients = _split_outputs(graph, primals)
    forward = _ancestors(forward_outputs)
    for primal in primals:
        primal.meta[GRADIENT_OF] = gradients.get(primal)

    # Forward propagation: tangent dependence and differentiability.
    requested = set(gradients)
    for node in graph.nodes:
        inputs = node.all_input_nodes
        node.meta[IS_FORWARD] = node in forward
        node.meta[IS_BACKWARD] = (
            is_tangent(node)
            or _compat.is_tagged_for_backward(node)
            or any(i.meta[IS_BACKWARD] for i in inputs)
        )
        node.meta[DIFFERENTIABLE] = node in requested or any(
            i.meta[DIFFERENTIABLE] for i in inputs
        )

    # Backward propagation: which outputs feed requested gradients (data), and which nodes
    # are needed only for their metadata.
    live: dict[fx.Node, set[int]] = {node: set() for node in graph.nodes}
    shape_needed: set[fx.Node] = set()
    for gradient in gradients.values():
        live[gradient].add(0)
    for node in reversed(graph.nodes):
        outputs = live[node]
        node.meta[LIVE_OUTPUTS] = frozenset(outputs)
        if node.op == "output":
            continue
        if node.target is operator.getitem:
            parent, index = node.args[0], node.args[1]
            if outputs:
                live[parent].add(index)
            elif node in shape_needed:
                shape_needed.add(parent)
            node.meta[ARG_PURPOSES] = {}
            continue
        deps = _output_deps(node)
        purposes: dict[str, ReadPurpose] = {}
        for argument, source in tensor_arguments(node):
            feeds = deps.get(argument, _ALL)
            if outputs and (feeds is _ALL or feeds & outputs):
                purpose = ReadPurpose.GRADIENT
                live[source].add(0)
            elif feeds is not _ALL and not feeds:
                purpose = ReadPurpose.METADATA
                if outputs or node in shape_needed:
                    shape_needed.add(source)
            else:
                purpose = ReadPurpose.UNREQUESTED
                if outputs or node in shape_needed:
                    shape_needed.add(source)
            # An argument read twice keeps its strongest purpose.
            previous = purposes.get(argument)
            if previous is None or _STRENGTH[purpose] > _STRENGTH[previous]:
                purposes[argument] = purpose
        node.meta[ARG_PURPOSES] = purposes

    for node in graph.nodes:
        node.meta.pop(BACKWARD_READS, None)
    for node in graph.nodes:
        if not node.meta[IS_BACKWARD] or node.op == "output":
            continue
        for argument, source in tensor_arguments(node):
            if not source.meta[IS_BACKWARD]:
                read = BackwardRead(node, argument, node.meta[ARG_PURPOSES][argument])
                source.meta.setdefault(BACKWARD_READS, []).append(read)
    return JointGraphInfo(primals, tangents, gradients)


_STRENGTH = {ReadPurpose.METADATA: 0, ReadPurpose.UNREQUESTED: 1, ReadPurpose.GRADIENT: 2}


def name_primals(graph: fx.Graph, inputs: Sequence[GraphInput]) -> None:
    """Record on each primal the Dynamo graph input it holds."""
    for primal in filter(is_primal, graph.find_nodes(op="placeholder")):
        index = getattr(primal.meta.get(_compat.OUTPUT_DESCRIPTORS), "idx", None)
        if index is not None and index < len(inputs):
            primal.meta[SOURCE] = inputs[index]


def display_name(node: fx.Node) -> str:
    """A primal's parameter or input name ("layer1.0.conv1.weight"); other nodes' own names."""
    source = node.meta.get(SOURCE)
    return source.name if source is not None else node.name


def needed_by_backward(node: fx.Node) -> bool:
    """Whether a forward value's data serves a requested gradient (after `analyze_joint_graph`)."""
    return any(r.purpose is ReadPurpose.GRADIENT for r in node.meta.get(BACKWARD_READS, ()))
