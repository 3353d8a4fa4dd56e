"""Replace GELU's and SiLU's backward with a 2-bit surrogate derivative (`approx_activations`).

Approx-BP (Yang et al., ICML 2024): the forward stays exact; the backward uses the derivative
of `h(x) = sum_i a_i ReLU(x - c_i)`, which is piecewise constant. Each element then needs only
the number of thresholds `c_i` it exceeds, a code in 0..3 computed in the forward, so the
activation's input is no longer read by the backward; the partitioner saves the codes, and
`pack_saved_masks` packs them four to a byte. Constants: ReGELU2 and ReSiLU2 from the paper's
public code (see `SURROGATES`). Both GELU forms (erf and tanh) take ReGELU2.

Inductor decomposes GELU and SiLU before the joint pass; the backward is found as the nodes
that carry `original_aten` gelu_backward / silu_backward with one `seq_nr`. The pass applies
only where it saves memory: where the activation's input is read by the backward for nothing
else, and its output is not read by the backward at all (in SwiGLU, `silu(gate) * up`, the up
branch's gradient reads `silu(gate)` exactly, so the gate must stay and the codes would only add
to it).
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.fx as fx

from ..analysis import BACKWARD_READS, CODE_BITS, IS_BACKWARD, SAVED_AS, Decision, ReadPurpose, SavedAs
from ..config import MemsaveConfig
from .base import Rewrite, insert_call

aten = torch.ops.aten
prims = torch.ops.prims
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Surrogate:
    name: str
    thresholds: tuple[float, float, float]
    slopes: tuple[float, float, float, float]  # by code: the cumulative sums of a_i


# By backward op. Keyed by name: the `original_aten` that decomposed nodes carry need not be
# the very OpOverload object of `torch.ops.aten`.
SURROGATES = {
    "aten.gelu_backward.default": Surrogate(
        "ReGELU2",
        (-3.1858810036855245, -0.001178821281161997, 3.190832613414926),
        (0.0, -0.04922261145617846, 1.0487405950855513, 1.0),
    ),
    "aten.silu_backward.default": Surrogate(
        "ReSiLU2",
        (-6.3050461001646445, -0.0008684942046214787, 6.325815242089708),
        (0.0, -0.04060357190528599, 1.0403218566243821, 1.0),
    ),
}
_FORWARD_OF = {"aten.gelu_backward.default": "aten.gelu.default", "aten.silu_backward.default": "aten.silu.default"}


def approximate_activation_backward(graph: fx.Graph, config: MemsaveConfig) -> list[Rewrite]:
    if not config.approx_activations:
        return []
    rewrites = []
    for backward_op, group in _activation_backwards(graph):
        rewrite = _rewrite(graph, backward_op, group)
        log.debug("%s: %s", rewrite.node, rewrite.reason)
        rewrites.append(rewrite)
    return rewrites


def _activation_backwards(graph: fx.Graph) -> list[tuple[str, list[fx.Node]]]:
    """Each GELU/SiLU backward in the graph, by op name, with the nodes computing it: one aten
    node, or the nodes of its decomposition (which carry its `seq_nr`)."""
    groups: dict[tuple[str, object], list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if str(node.target) in SURROGATES:
            groups[(str(node.target), node.name)] = [node]
        elif _source_op(node) in SURROGATES:
            groups.setdefault((_source_op(node), node.meta.get("seq_nr")), []).append(node)
    return [(op, group) for (op, _), group in groups.items()]


def _source_op(node: fx.Node) -> str:
    """The aten op `node` is, or is part of the decomposition of."""
    return str(node.meta.get("original_aten", node.target))


def _rewrite(graph: fx.Graph, backward_op: str, group: list[fx.Node]) -> Rewrite:
    surrogate = SURROGATES[backward_op]
    members = set(group)
    outputs = [n for n in group if any(u not in members for u in n.users)]
    inputs = {i for n in group for i in n.all_input_nodes if i not in members and i.op != "get_attr"}
    forward_inputs = [i for i in inputs if not i.meta[IS_BACKWARD]]
    grads = [i for i in inputs if i.meta[IS_BACKWARD]]
    name = outputs[0].name if outputs else group[-1].name

    def declined(reason: str) -> Rewrite:
        return Rewrite(approximate_activation_backward.__name__, name, (), False, reason)

    if len(outputs) != 1 or len(forward_inputs) != 1 or len(grads) != 1:
        return declined(f"{surrogate.name}: the backward does not read one input and one gradient")
    (grad_input_node,), (x,), (grad,) = outputs, forward_inputs, grads
    other_reads = [r for r in x.meta.get(BACKWARD_READS, ()) if r.reader not in members and r.purpose is ReadPurpose.GRADIENT]
    if other_reads:
        return declined(f"{x.name} is also read by {other_reads[0].reader.name}: approximating saves nothing")
    activation_output = _forward_output(x, _FORWARD_OF[backward_op])
    if activation_output is not None and any(
        r.purpose is ReadPurpose.GRADIENT for r in activation_output.meta.get(BACKWARD_READS, ())
    ):
        return declined(
            f"the output {activation_output.name} is read by the backward, so {x.name} stays: approximating saves nothing"
        )

    codes = _codes(graph, x, surrogate)
    replacement = _surrogate_gradient(graph, grad, codes, surrogate, like=grad_input_node)
    grad_input_node.replace_all_uses_with(replacement)
    reason = f"{x.name} kept as its 2-bit {surrogate.name} code for the backward"
    codes.meta[SAVED_AS] = SavedAs(Decision.APPROXIMATED, x.name, reason)
    return Rewrite(approximate_activation_backward.__name__, name, (x.name,), True, reason)


def _forward_output(x: fx.Node, forward_op: str) -> fx.Node | None:
    """The output of the activation applied to `x`, or None if it is not found."""
    group: set[fx.Node] = set()
    frontier = list(x.users)
    while frontier:
        node = frontier.pop()
        if node not in group and _source_op(node) == forward_op and not node.meta.get(IS_BACKWARD):
            group.add(node)
            frontier.extend(node.users)
    outputs = [n for n in group if any(u not in group for u in n.users)]
    return outputs[0] if len(outputs) == 1 else None


def _codes(graph: fx.Graph, x: fx.Node, surrogate: Surrogate) -> fx.Node:
    """In the forward, right after `x`: how many thresholds each element exceeds, as uint8."""
    after = x.next

    def call(target, *args):
        return insert_call(graph, target, args, like=x, before=after)

    value = call(prims.convert_element_type.default, x, torch.float32)
    count = None
    for threshold in surrogate.thresholds:
        # Rounded to float32 first, so that a float32 and a float64 comparison agree.
        threshold = float(torch.tensor(threshold, dtype=torch.float32))
        exceeds = call(prims.convert_element_type.default, call(aten.gt.Scalar, value, threshold), torch.float32)
        count = exceeds if count is None else call(aten.add.Tensor, count, exceeds)
    codes = call(prims.convert_element_type.default, count, torch.uint8)
    codes.meta[CODE_BITS] = 2
    return codes


def _surrogate_gradient(graph: fx.Graph, grad: fx.Node, codes: fx.Node, surrogate: Surrogate, *, like: fx.Node) -> fx.Node:
    """grad * slope[code], computed in float32 and rounded once to the gradient's dtype."""

    def call(target, *args):
        return insert_call(graph, target, args, like=like)

    # Compared as float32: Inductor's uint8 vector comparisons ran the backward 1.5x slower.
    codes = call(prims.convert_element_type.default, codes, torch.float32)
    slope = None
    previous = 0.0
    for code, cumulative in enumerate(surrogate.slopes[1:], start=1):
        step = cumulative - previous
        previous = cumulative
        at_least = call(prims.convert_element_type.default, call(aten.ge.Scalar, codes, float(code)), torch.float32)
        term = call(aten.mul.Tensor, at_least, step)
        slope = term if slope is None else call(aten.add.Tensor, slope, term)
    dtype = like.meta["val"].dtype
    result = call(aten.mul.Tensor, call(prims.convert_element_type.default, grad, torch.float32), slope)
    return result if dtype == torch.float32 else call(prims.convert_element_type.default, result, dtype)
