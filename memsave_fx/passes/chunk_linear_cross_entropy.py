"""Keep no logits for backward: the LM head's cross-entropy in row chunks (exact; on by default).

In LLM fine-tuning the largest value kept for backward is usually the logits, or their fp32
log-softmax, which the cross-entropy backward reads; its gradient is as large again. But the
loss is a scalar: d loss / d logits = tangent * (softmax(logits) - onehot(labels)) / count,
and all of it but the tangent is known in the forward. This pass replaces
`cross_entropy(linear(h, W[, b]) [.float()] [views, a shift], labels)`, as AOTAutograd traces
it (HF's `ForCausalLMLoss` included: `ignore_index`, mean or sum, a division by
`num_items_in_batch`), with `memsave_fx.linear_cross_entropy.linear_cross_entropy`, traced
into the graph. It forms the loss and its gradients with respect to h, W and b a block of rows
at a time in the forward, with no more matmuls than stock compilation does in forward and
backward together, and the backward only scales them by the loss's tangent. Inductor fuses
each block's log-softmax, loss and gradient as it fuses stock's, so no fp32 block is written,
and the gradient of one block (in the logits' dtype) is the only vocabulary-wide value the
forward adds. The logits, when the graph returns them, are computed once and not kept. A LoRA'd
head (peft's `lora.Linear` on `lm_head`: `(h @ W.T + (lora_A(h) @ B.T) * scaling).to(W.dtype)`)
is covered too, with the gradients with respect to lora_A's output and B; lora_A itself stays
in the graph.

When the logits are returned, AOTAutograd's backward also takes their tangent, which autograd
fills with zeros when only the loss is differentiated: `memsave::linear_backward_unless_zero`
adds its contribution, and skips the matmuls for an all-zero tangent.

Label smoothing, class weights, soft-capped or scaled logits, a z-loss, a head that is neither
one linear layer nor one with a LoRA adapter, and a loss that is not a scalar are declined,
each with its reason, and the graph left as it is.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import operator

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int
from torch.utils.checkpoint import CheckpointPolicy

from .. import _compat
from ..analysis import IS_BACKWARD, IS_FORWARD, is_tangent
from ..config import MemsaveConfig
from .. import linear_cross_entropy as _kernels  # registers the memsave:: ops
from ..memory import allocation_nbytes, size_hint
from .base import Rewrite, insert_call, is_view

aten = torch.ops.aten
prims = torch.ops.prims
memsave = torch.ops.memsave
log = logging.getLogger(__name__)

# The rows go in blocks of about this many logits, so that each block's gradient in the
# logits' dtype (the only vocabulary-wide value the fused kernels write) stays small; at most
# MAX_CHUNKS blocks, each its own kernels in the graph.
ELEMENTS_PER_CHUNK = 2**22
MAX_CHUNKS = 8

_LINEARS = (aten.mm.default, aten.addmm.default)
_TRANSPOSES = (aten.permute.default, aten.t.default)
_ROW_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.alias.default)


class _Declined(Exception):
    """This cross-entropy is not one the pass replaces; the message says why."""


@dataclasses.dataclass
class _Linear:
    """One matmul term of the logits: `input @ weight.T (+ bias)`, times `scale`."""

    mm: fx.Node  # mm(input, W.T) or addmm(bias, input, W.T), [N, V]
    input: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    scale: float = 1.0
    nodes: list[fx.Node] = dataclasses.field(default_factory=list)  # from mm to the sum: views, casts, the scaling

    @property
    def hidden(self) -> fx.Node:
        return self.input


@dataclasses.dataclass
class _LossHead:
    linear: _Linear  # the head's linear layer
    low_rank: _Linear | None  # a LoRA adapter's lora_B(lora_A(h)) * scaling, added to it
    logits: fx.Node  # the logits as the model returns them: the linear's, or (LoRA) the sum cast back
    logits_dtype: torch.dtype | None  # with a LoRA adapter: what the sum is cast to
    combine: list[fx.Node]  # with a LoRA adapter: the sum, and its cast back
    path: list[fx.Node]  # logits -> the log-softmax's input: views, an upcast, a shift
    shift: fx.Node | None  # a slice of the rows (the causal shift), if any
    log_softmax: list[fx.Node]  # its nodes, the log-probabilities last
    target: fx.Node  # the labels as the loss reads them, one per row of the log-softmax's input
    ignore_index: int
    mean: bool
    loss: fx.Node  # the scalar cross-entropy
    loss_nodes: list[fx.Node]  # the forward nodes from the log-probabilities to the loss

    @property
    def hidden(self) -> fx.Node:
        return self.linear.input

    @property
    def weight(self) -> fx.Node:
        return self.linear.weight

    @property
    def terms(self) -> list[_Linear]:
        return [self.linear] if self.low_rank is None else [self.linear, self.low_rank]

    @property
    def head_nodes(self) -> list[fx.Node]:
        """The forward nodes from the matmuls to the logits."""
        return [*(n for term in self.terms for n in (term.mm, *term.nodes)), *self.combine]

    @property
    def released(self) -> tuple[str, ...]:
        return tuple(n.name for n in (*self.head_nodes, *self.path, *self.log_softmax, *self.loss_nodes))


def chunk_linear_cross_entropy(graph: fx.Graph, config: MemsaveConfig) -> list[Rewrite]:
    if not config.chunked_loss:
        return []
    rewrites = []
    for anchor in _log_softmax_anchors(graph):
        try:
            head = _match(anchor)
            if head is None:
                continue  # not a linear layer's logits: no loss head
            plan = _BackwardPlan.of(graph, head)
            _check_worth_keeping(head, plan)
            _rewrite(graph, head, plan)
        except _Declined as declined:
            rewrite = Rewrite(chunk_linear_cross_entropy.__name__, anchor.name, (), False, str(declined))
        else:
            rewrite = Rewrite(chunk_linear_cross_entropy.__name__, head.loss.name, head.released, True, _reason(head))
        log.debug("%s: %s", rewrite.node, rewrite.reason)
        rewrites.append(rewrite)
    if any(r.applied for r in rewrites):
        _compat.stable_topological_sort(graph)
    return rewrites


# --- matching the forward ------------------------------------------------------------------


def _log_softmax_anchors(graph: fx.Graph) -> list[fx.Node]:
    """The forward's row-wise log-softmaxes over a 2-d input: `_log_softmax`, or the first
    node (`amax`) of its decomposition."""
    anchors = []
    for node in graph.nodes:
        if not node.meta.get(IS_FORWARD) or node.meta.get(IS_BACKWARD):
            continue
        if node.target is aten._log_softmax.default or node.target is aten.amax.default:
            source = node.args[0]
            if isinstance(source, fx.Node) and source.meta["val"].ndim == 2 and _last_dim(node.args[1], 2):
                anchors.append(node)
    return anchors


def _last_dim(dim: object, ndim: int) -> bool:
    dims = dim if isinstance(dim, (list, tuple)) else [dim]
    return len(dims) == 1 and dims[0] in (ndim - 1, -1)


def _match(anchor: fx.Node) -> _LossHead | None:
    found = _head_behind(anchor.args[0])
    if found is None:
        return None
    end, path = found
    if end.target in _LINEARS:
        linear, low_rank, logits, logits_dtype, combine = _linear_term(end), None, end, None, []
    else:
        terms = _lora_terms(end)
        if terms is None:
            return None  # a sum of things that are not linear layers: no loss head
        linear, low_rank = terms
        logits, logits_dtype, combine = end, None, [end]
        # peft casts the sum back to the layer's dtype: those are the logits the model returns.
        if path and _is_cast(path[0]) and path[0].meta["val"].dtype == linear.mm.meta["val"].dtype:
            logits, logits_dtype, combine, path = path[0], path[0].meta["val"].dtype, [end, path[0]], path[1:]
    shift = _check_path(path)
    log_softmax = _log_softmax_nodes(anchor)
    if (dtype := log_softmax[-1].meta["val"].dtype) not in (torch.float32, torch.float64):
        _refuse_half_precision(dtype)
    target, ignore_index, mean, loss, loss_nodes = _nll(log_softmax[-1])
    head = _LossHead(linear, low_rank, logits, logits_dtype, combine, path, shift, log_softmax, target, ignore_index, mean, loss, loss_nodes)
    _check_forward_readers(head)
    return head


def _head_behind(logits: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
    """The mm/addmm, or the sum of two terms, whose output reaches `logits` through
    single-input forward ops, and those ops (nearest the head first); None if there is none
    within a few ops."""
    path: list[fx.Node] = []
    node = logits
    for _ in range(12):
        if node.op != "call_function":
            return None
        if node.target in _LINEARS or (node.target is aten.add.Tensor and all(isinstance(a, fx.Node) for a in node.args[:2])):
            return node, path[::-1]
        path.append(node)
        node = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        if node is None:
            return None
    return None


def _linear_term(mm: fx.Node, scale: float = 1.0, nodes: list[fx.Node] | None = None) -> _Linear:
    hidden, transposed = mm.args[-2:]
    if not (transposed.target in _TRANSPOSES and transposed.args[0].meta["val"].ndim == 2):
        raise _Declined(f"the logits {mm.name} multiply {transposed.name}, not a transposed weight")
    bias = mm.args[0] if mm.target is aten.addmm.default else None
    if bias is not None and (bias.meta["val"].ndim != 1 or mm.kwargs):
        raise _Declined(f"{mm.name} adds {bias.name}, not a bias vector")
    return _Linear(mm, hidden, transposed.args[0], bias, scale, nodes or [])


def _lora_terms(add: fx.Node) -> tuple[_Linear, _Linear] | None:
    """The head's linear layer and its LoRA adapter's term, `lora_B(lora_A(h)) * scaling`,
    whose sum is `add`; None when neither side is a linear layer."""
    sides = [_term_behind(side) for side in add.args[:2]]
    if all(side is None for side in sides):
        return None
    other = [a.name for a, side in zip(add.args[:2], sides) if side is None]
    scaled = [side for side in sides if side is not None and side[1] is not None]
    if other or add.kwargs or len(scaled) != 1:
        with_what = f" with {', '.join(other)}" if other else ""
        raise _Declined(
            f"the logits pass through add.Tensor{with_what} before the cross-entropy (a bias, "
            "scaling, or a head that is neither one linear layer nor one with a LoRA adapter)"
        )
    (base_mm, _, base_nodes), (low_mm, scale, low_nodes) = sorted(sides, key=lambda side: side[1] is not None)
    linear, low_rank = _linear_term(base_mm, 1.0, base_nodes), _linear_term(low_mm, scale, low_nodes)
    if low_rank.bias is not None:
        raise _Declined(f"the LoRA adapter's lora_B ({low_mm.name}) has a bias")
    if low_rank.input.meta["val"].shape[-1] >= linear.input.meta["val"].shape[-1]:
        raise _Declined(f"{low_mm.name}, added to the logits, is not of lower rank than the head")
    return linear, low_rank


def _term_behind(node: fx.Node) -> tuple[fx.Node, float | None, list[fx.Node]] | None:
    """(mm, scale or None, the nodes from it to `node`) when `node` is a matmul through views,
    widening casts and at most one multiplication by a number; None otherwise."""
    nodes: list[fx.Node] = []
    scale = None
    for _ in range(8):
        if node.op != "call_function":
            return None
        if node.target in _LINEARS:
            return node, scale, nodes[::-1]
        if node.target is aten.mul.Tensor and scale is None and isinstance(node.args[1], (int, float)):
            scale = float(node.args[1])
        elif not (node.target in _ROW_VIEWS or _is_widening_cast(node)):
            return None
        nodes.append(node)
        node = node.args[0]
        if not isinstance(node, fx.Node):
            return None
    return None


def _is_widening_cast(node: fx.Node) -> bool:
    if not _is_cast(node):
        return False
    before, after = node.args[0].meta["val"].dtype, node.meta["val"].dtype
    return after.is_floating_point and after.itemsize >= before.itemsize


def _check_path(path: list[fx.Node]) -> fx.Node | None:
    """Refuse anything between the linear and the log-softmax but views keeping the rows in
    order, a widening cast, a copy, and one slice of rows; return the slice."""
    shift = None
    for node in path:
        value = node.meta["val"]
        if node.target in _ROW_VIEWS or node.target is aten.clone.default:
            if value.shape[-1] != node.args[0].meta["val"].shape[-1]:
                raise _Declined(f"{node.name} reshapes the logits' vocabulary dimension")
            continue
        if _is_cast(node):
            if value.dtype.itemsize < node.args[0].meta["val"].dtype.itemsize or not value.dtype.is_floating_point:
                raise _Declined(f"{node.name} narrows the logits to {value.dtype}")
            continue
        if node.target is aten.slice.Tensor and shift is None and _slices_rows(node):
            shift = node
            continue
        other = [a.name for a in node.all_input_nodes[1:]]
        with_what = f" with {', '.join(other)}" if other else ""
        raise _Declined(
            f"the logits pass through {_op(node)}{with_what} before the cross-entropy "
            "(soft-capping, scaling, or a head that is neither one linear layer nor one with a LoRA adapter)"
        )
    return shift


def _is_cast(node: fx.Node) -> bool:
    """`convert_element_type`, or `_to_copy` changing only the dtype (`.float()` where
    nothing decomposed it)."""
    if node.target is prims.convert_element_type.default:
        return True
    return node.target is aten._to_copy.default and set(node.kwargs) <= {"dtype"}


def _slices_rows(node: fx.Node) -> bool:
    source, dim = node.args[0].meta["val"], node.args[1]
    step = node.args[4] if len(node.args) > 4 else 1
    return step == 1 and dim % source.ndim != source.ndim - 1


def _refuse_half_precision(dtype: torch.dtype) -> None:
    raise _Declined(
        f"the log-softmax is computed in {str(dtype).removeprefix('torch.')}, whose rounding the "
        "chunks would not reproduce (upcast the logits with .float(), as transformers does)"
    )


def _log_softmax_nodes(anchor: fx.Node) -> list[fx.Node]:
    """The log-softmax's nodes, its output last: `_log_softmax` itself, or the decomposition
    x - amax - log(sum(exp(x - amax)))."""
    if anchor.target is aten._log_softmax.default:
        if anchor.args[2]:
            raise _Declined(f"{anchor.name} converts its input to half precision")
        return [anchor]
    source = anchor.args[0]
    shifted = _only_user(anchor, aten.sub.Tensor, lambda n: n.args == (source, anchor))
    exp = _only_user(shifted, aten.exp.default)
    total = _only_user(exp, aten.sum.dim_IntList, lambda n: _last_dim(n.args[1], 2))
    log_total = _only_user(total, aten.log.default)
    log_probs = _only_user(log_total, aten.sub.Tensor, lambda n: n.args == (shifted, log_total))
    return [anchor, shifted, exp, total, log_total, log_probs]


def _only_user(node: fx.Node, target: object, check=lambda n: True) -> fx.Node:
    """The one forward user of `node` that is `target` and passes `check`."""
    users = [u for u in node.users if u.target is target and check(u) and u.meta.get(IS_FORWARD)]
    if len(users) != 1:
        raise _Declined(f"{node.name} is not followed by the {_name(target)} of a log-softmax")
    return users[0]


def _nll(log_probs: fx.Node) -> tuple[fx.Node, int, bool, fx.Node, list[fx.Node]]:
    """(labels, ignore_index, mean, loss, nodes) of the negative log-likelihood over
    `log_probs`: `nll_loss_forward`, or its decomposition (gather, mask, sum, divide)."""
    readers = _readers_through_views(log_probs)
    for reader in readers:
        if reader.target is prims.convert_element_type.default and reader.args[1].itemsize < log_probs.meta["val"].dtype.itemsize:
            _refuse_half_precision(reader.args[1])
    picks = [u for u in readers if u.target in (aten.gather.default, aten.nll_loss_forward.default)]
    others = [u for u in readers if u not in picks]
    if others:
        raise _Declined(
            f"the log-probabilities are also read by {', '.join(sorted({_op(u) for u in others}))} "
            "(label smoothing, class weights, or another term over them)"
        )
    if len(picks) != 1:
        raise _Declined("the log-probabilities are read by no single negative log-likelihood")
    pick = picks[0]
    if pick.target is aten.nll_loss_forward.default:
        return _nll_loss_forward(pick)
    return _decomposed_nll(pick)


def _readers_through_views(node: fx.Node) -> list[fx.Node]:
    readers = []
    for user in _forward_users(node):
        readers += _readers_through_views(user) if is_view(user) else [user]
    return readers


def _nll_loss_forward(node: fx.Node) -> tuple[fx.Node, int, bool, fx.Node, list[fx.Node]]:
    _, target, weight, reduction, ignore_index = node.args[:5]
    if weight is not None:
        raise _Declined(f"{node.name} weights its classes")
    if reduction not in (1, 2):
        raise _Declined("the loss is not reduced to a scalar (reduction='none')")
    (loss,) = [u for u in node.users if u.target is operator.getitem and u.args[1] == 0] or [None]
    if loss is None:
        raise _Declined(f"{node.name}'s loss is not used")
    return target, ignore_index, reduction == 1, loss, [node, *node.users]


def _decomposed_nll(gather: fx.Node) -> tuple[fx.Node, int, bool, fx.Node, list[fx.Node]]:
    """gather(lp, 1, unsqueeze(where(t != ii, t, 0))) -> squeeze -> neg -> where(t != ii, ., 0)
    -> sum [-> div(., sum(t != ii))]."""
    index = gather.args[2]
    if gather.args[1] not in (1, -1) or index.target is not aten.unsqueeze.default:
        raise _Declined(f"{gather.name} gathers along another dimension")
    safe_target = index.args[0]
    if safe_target.target is not aten.where.self or not _is_ignore_mask(safe_target.args[0]):
        raise _Declined(f"{gather.name}'s labels are not masked by an ignore_index")
    mask = safe_target.args[0]
    target, ignore_index = mask.args
    squeeze = _single_forward_user(gather, (aten.squeeze.dim, aten.squeeze.dims))
    neg = _single_forward_user(squeeze, (aten.neg.default,))
    masked = _single_forward_user(neg, (aten.where.self,))
    if not _is_ignore_mask(masked.args[0], target, ignore_index):
        raise _Declined(f"{masked.name} masks the loss otherwise than by the ignore_index")
    users = _forward_users(masked)
    if len(users) != 1 or users[0].target is not aten.sum.default:
        what = ", ".join(sorted({_op(u) for u in users})) or "nothing"
        raise _Declined(f"the per-row losses go to {what}: the loss is not reduced to a scalar by a sum or mean (class weights, or reduction='none')")
    total = users[0]
    nodes = [gather, squeeze, neg, masked, total]
    divide = [u for u in _forward_users(total) if u.target is aten.div.Tensor and _is_count(u.args[1], target, ignore_index)]
    if divide and len(total.users) == 1:
        return target, ignore_index, True, divide[0], nodes + divide
    return target, ignore_index, False, total, nodes


def _is_ignore_mask(node: object, target: fx.Node | None = None, ignore_index: int | None = None) -> bool:
    if not isinstance(node, fx.Node) or node.target is not aten.ne.Scalar:
        return False
    return target is None or node.args == (target, ignore_index)


def _is_count(node: object, target: fx.Node, ignore_index: int) -> bool:
    """sum(target != ignore_index), as a float."""
    if isinstance(node, fx.Node) and node.target is prims.convert_element_type.default:
        node = node.args[0]
    return isinstance(node, fx.Node) and node.target is aten.sum.default and _is_ignore_mask(node.args[0], target, ignore_index)


def _forward_users(node: fx.Node) -> list[fx.Node]:
    """The users the forward outputs need (not the backward's, nor its recomputations)."""
    return [u for u in node.users if u.meta.get(IS_FORWARD) or u.op == "output"]


def _single_forward_user(node: fx.Node, targets: tuple[object, ...]) -> fx.Node:
    users = _forward_users(node)
    if len(users) != 1 or users[0].target not in targets:
        what = ", ".join(sorted({_op(u) for u in users})) or "nothing"
        raise _Declined(f"{node.name} goes to {what}, not the negative log-likelihood's {_name(targets[0])}")
    return users[0]


# --- the backward ----------------------------------------------------------------------------


@dataclasses.dataclass
class _BackwardPlan:
    """What the backward reads of the head, and what replaces it."""

    loss_tangent: tuple[fx.Node, object]  # the loss's output tangent, and what the output divides the loss by (or None)
    logits_tangent: fx.Node | None  # the tangent of the returned logits, if they are returned
    returned_logits: fx.Node | None  # the logits (or a view of them) the graph returns
    # The backward's matmuls the kernel's gradients replace, in _GRADIENTS' order (None where
    # nothing needs that gradient): mm(G, W), mm(G.T, h) and sum(G, 0) for the linear layer,
    # then mm(G', B) and mm(G'.T, lora_A(h)) for a LoRA adapter.
    gradients: list[fx.Node | None]

    @classmethod
    def of(cls, graph: fx.Graph, head: _LossHead) -> _BackwardPlan:
        output = graph.output_node()
        values = list(output.args[0])
        descs = output.meta.get(_compat.OUTPUT_DESCRIPTORS) or [None] * len(values)
        tangents = {getattr(getattr(t.meta.get(_compat.OUTPUT_DESCRIPTORS), "output", None), "idx", None): t
                    for t in graph.find_nodes(op="placeholder") if is_tangent(t)}  # fmt: skip
        output_index = {id(v): getattr(d, "idx", None) for v, d in zip(values, descs) if isinstance(v, fx.Node)}

        # The loss: returned as it is, or divided by a number (HF's num_items_in_batch).
        loss_users = _forward_users(head.loss)
        divisor = None
        returned = head.loss
        if len(loss_users) == 1 and loss_users[0].target is aten.div.Tensor and loss_users[0].args[0] is head.loss:
            returned, divisor = loss_users[0], loss_users[0].args[1]
            if isinstance(divisor, fx.Node) and (divisor.meta["val"].numel() != 1 or divisor.meta.get(IS_BACKWARD)):
                raise _Declined(f"the loss is divided by {divisor.name}, not by a number")
        if id(returned) not in output_index or any(u.op != "output" for u in _forward_users(returned)):
            raise _Declined(f"the loss {head.loss.name} is used otherwise than returned (divided by a number at most)")
        loss_tangent = tangents.get(output_index[id(returned)])
        if loss_tangent is None:
            raise _Declined(f"the loss {head.loss.name} has no tangent")

        # The logits: returned through views keeping their elements in order, or not at all
        # (_check_forward_readers refused any other reader).
        returned_logits = [v for v in values if isinstance(v, fx.Node) and (v is head.logits or _views_of(v, head.logits))]
        if len(returned_logits) > 1:
            raise _Declined(f"the logits {head.logits.name} are returned more than once")
        logits_tangent = tangents.get(output_index[id(returned_logits[0])]) if returned_logits else None

        gradients = list(_linear_backward(head.linear))
        gradients += _linear_backward(head.low_rank)[:2] if head.low_rank is not None else [None, None]
        if not any(gradients):
            raise _Declined(f"the backward differentiates nothing through the head {head.linear.mm.name}")
        return cls((loss_tangent, divisor), logits_tangent, returned_logits[0] if returned_logits else None, gradients)


def _views_of(node: fx.Node, base: fx.Node) -> bool:
    while node.target in _ROW_VIEWS:
        node = node.args[0]
        if node is base:
            return True
    return False


def _linear_backward(term: _Linear) -> tuple[fx.Node | None, fx.Node | None, fx.Node | None]:
    """The backward's mm(G, W), mm(G.T, input) and sum(G, 0), where G is the term's output
    gradient; None for each the backward does not compute. Refuses a G read otherwise."""
    transposed = term.mm.args[-1]
    grad_input = [
        mm for back in transposed.users if not back.meta.get(IS_FORWARD) and back.target in _TRANSPOSES
        for mm in back.users if mm.target is aten.mm.default and mm.args[1] is back
    ]  # fmt: skip
    grad_weight = [
        mm for mm in term.input.users if mm.meta.get(IS_BACKWARD) and mm.target is aten.mm.default
        and mm.args[1] is term.input and mm.args[0].target in _TRANSPOSES
    ]  # fmt: skip
    if len(grad_input) > 1 or len(grad_weight) > 1:
        raise _Declined(f"the backward multiplies {term.mm.name}'s inputs more than once")
    grads = [g.args[0] for g in grad_input] + [g.args[0].args[0] for g in grad_weight]
    if not grads:
        return None, None, None
    if any(g is not grads[0] for g in grads):
        raise _Declined(f"the backward of {term.mm.name} is not one gradient's matmuls")
    grad_output = grads[0]
    grad_bias = [u for u in grad_output.users if u.target is aten.sum.dim_IntList and list(u.args[1]) == [0]]
    expected = {*grad_input, *(g.args[0] for g in grad_weight), *grad_bias}
    if set(grad_output.users) != expected or any(len(g.args[0].users) != 1 for g in grad_weight):
        raise _Declined(f"the logits' gradient {grad_output.name} is also read by {', '.join(sorted(_op(u) for u in set(grad_output.users) - expected))}")
    if term.bias is None and grad_bias:
        raise _Declined(f"{term.mm.name} has no bias, yet its gradient is summed")
    return (grad_input or [None])[0], (grad_weight or [None])[0], (grad_bias or [None])[0]


# --- the rewrite ------------------------------------------------------------------------------


def _rewrite(graph: fx.Graph, head: _LossHead, plan: _BackwardPlan) -> None:
    target = _target_per_row(graph, head)
    gradients = [g is not None for g in plan.gradients]
    low_rank = head.low_rank
    low_rank_args = (low_rank.input, low_rank.weight, low_rank.scale) if low_rank is not None else (None, None, 1.0)
    # Constants: with a symbolic row count, sized for the example's.
    rows = size_hint(head.hidden.meta["val"].shape[0])
    vocabulary = size_hint(head.weight.meta["val"].shape[0])
    chunks = max(1, min(MAX_CHUNKS, math.ceil(rows * vocabulary / ELEMENTS_PER_CHUNK)))
    tensors = {"hidden": head.hidden, "weight": head.weight, "bias": head.linear.bias, "target": target,
               "low_rank": low_rank_args[0], "low_rank_weight": low_rank_args[1]}  # fmt: skip
    absent = {name: None for name, node in tensors.items() if node is None}
    tensors = {name: node for name, node in tensors.items() if node is not None}
    constants = dict(
        **absent,
        ignore_index=int(head.ignore_index), mean=head.mean, dtype=head.log_softmax[-1].meta["val"].dtype,
        chunks=chunks, gradients=gradients, return_logits=plan.returned_logits is not None,
        low_rank_scale=low_rank_args[2], logits_dtype=head.logits_dtype,
    )  # fmt: skip
    loss, *grads, logits = _traced_into(
        graph, functools.partial(_call_with_names, _kernels.linear_cross_entropy, list(tensors), constants),
        list(tensors.values()), before=head.loss,
    )  # fmt: skip
    head.loss.replace_all_uses_with(loss)
    if plan.returned_logits is not None:
        graph.output_node().replace_input_with(plan.returned_logits, _returned_view(graph, logits, head, plan.returned_logits))

    loss_tangent, divisor = plan.loss_tangent
    first_reader = min((g for g in plan.gradients if g is not None), key=_order(graph))
    scale = loss_tangent
    if divisor is not None:
        scale = insert_call(graph, aten.div.Tensor, (loss_tangent, divisor), like=first_reader)
    from_tangent = None
    if plan.logits_tangent is not None:
        tangent = insert_call(graph, aten.view.default, (plan.logits_tangent, [-1, head.linear.mm.meta["val"].shape[-1]]), like=first_reader)
        call = insert_call(graph, memsave.linear_backward_unless_zero.default, (tangent, head.hidden, head.weight, gradients, *low_rank_args), like=first_reader)
        from_tangent = [insert_call(graph, operator.getitem, (call, i), like=first_reader) for i in range(len(gradients))]
    for index, (replaced, saved) in enumerate(zip(plan.gradients, grads)):
        if replaced is None:
            continue
        # Kept for the backward, never recomputed there: what they are computed from stays in the forward.
        saved.meta["recompute"] = CheckpointPolicy.MUST_SAVE
        grad = insert_call(graph, aten.mul.Tensor, (saved, scale), like=replaced)
        if from_tangent is not None:
            grad = insert_call(graph, aten.add.Tensor, (grad, from_tangent[index]), like=replaced)
        if grad.meta["val"].shape != replaced.meta["val"].shape:
            grad = insert_call(graph, aten.view.default, (grad, list(replaced.meta["val"].shape)), like=replaced)
        replaced.replace_all_uses_with(grad)


def _check_worth_keeping(head: _LossHead, plan: _BackwardPlan) -> None:
    """Refuse a head whose gradients, which the rewrite keeps for backward, take no fewer bytes
    than the logits stock compilation keeps: a classifier over a few classes, say."""
    kept = sum(allocation_nbytes(g) for g in plan.gradients if g is not None)
    logits = allocation_nbytes(head.logits)
    if kept >= logits:
        raise _Declined(f"the gradients formed in the forward ({kept} bytes) would take no fewer bytes than the logits ({logits} bytes)")


def _call_with_names(fn, names: list[str], constants: dict, *tensors):
    return fn(**dict(zip(names, tensors)), **constants)


def _traced_into(graph: fx.Graph, fn, inputs: list[fx.Node], *, before: fx.Node) -> tuple[fx.Node | None, ...]:
    """Trace `fn` over the inputs' fake values, decomposed as Inductor decomposes (so that it
    fuses the result as it fuses the graph's own ops), and insert its ops before `before`;
    return the nodes of its outputs."""
    values = [node.meta["val"] for node in inputs]
    traced = _compat.make_fx(fn, decomposition_table=_compat.select_decomp_table(), tracing_mode="fake")(*values)
    existing = set(graph.nodes)
    placeholders = traced.graph.find_nodes(op="placeholder")
    with graph.inserting_before(before):
        outputs = graph.graph_copy(traced.graph, dict(zip(placeholders, inputs)))
    for node in graph.nodes:
        if node not in existing:
            for key in _compat.INHERITED_META:
                if key in before.meta:
                    node.meta[key] = before.meta[key]
            # Not tagged for the forward: the partitioner may recompute any of it in the backward
            # (a memory budget, a tiny head), which a forward-only tag would make invalid.
            node.meta.pop(_compat.PARTITIONER_TAG, None)
            node.meta[IS_FORWARD], node.meta[IS_BACKWARD] = True, False
    return tuple(outputs)


def _in_forward(node: fx.Node) -> fx.Node:
    _compat.tag_for_forward(node)
    node.meta[IS_FORWARD], node.meta[IS_BACKWARD] = True, False
    return node


def _returned_view(graph: fx.Graph, logits: fx.Node, head: _LossHead, returned: fx.Node) -> fx.Node:
    """The kernel's [N, V] `logits` as the graph returns them: the views from the head's
    matmul to its logits, then those from its logits to `returned`, replayed (so that symbolic
    sizes stay the graph's own)."""
    chain = []
    node = returned
    while node is not head.logits:
        chain.append(node)
        node = node.args[0]
    views = [n for n in head.linear.nodes if n.target in _ROW_VIEWS] + chain[::-1]
    for view in views:
        logits = _in_forward(insert_call(graph, view.target, (logits, *view.args[1:]), view.kwargs, like=head.loss))
    return logits


def _check_forward_readers(head: _LossHead) -> None:
    """Refuse a head whose values the forward reads elsewhere (a z-loss, a second term over the
    logits): their gradients would reach the logits by another way than the cross-entropy's."""
    own = {*head.head_nodes, *head.path, *head.log_softmax, *head.loss_nodes}
    for node in (*head.head_nodes, *head.path, *head.log_softmax, *head.loss_nodes):
        if node is head.loss:
            continue
        others = [u for u in _forward_users(node) if u not in own and not _feeds_output_only(u)]
        if others:
            raise _Declined(
                f"{node.name} is also read by {', '.join(sorted({_op(u) for u in others}))} "
                "(a z-loss, or another term over the logits)"
            )


def _feeds_output_only(node: fx.Node) -> bool:
    """Whether `node` is the output, or views of its input that go only to it."""
    if node.op == "output":
        return True
    return node.target in _ROW_VIEWS and all(map(_feeds_output_only, node.users)) or (is_view(node) and not _forward_users(node))


def _target_per_row(graph: fx.Graph, head: _LossHead) -> fx.Node:
    """The labels, one per row of the logits: the loss's own, or, when the logits' rows were
    shifted by a slice, those put back in place with ignore_index in the rows sliced off."""
    if head.shift is None:
        return head.target
    if not all(is_concrete_int(d) for d in head.shift.args[0].meta["val"].shape):
        raise _Declined(f"the logits' rows are shifted by {head.shift.name} over a symbolic size")
    sliced = head.shift.meta["val"].shape[:-1]
    full = head.shift.args[0].meta["val"].shape[:-1]
    _, dim, start, end = (*head.shift.args, None, None)[:4]
    labels = insert_call(graph, aten.view.default, (head.target, list(sliced)), like=head.loss)
    ignored = insert_call(graph, aten.full.default, (list(full), head.ignore_index), {"dtype": head.target.meta["val"].dtype, "device": head.target.meta["val"].device}, like=head.loss)
    placed = insert_call(graph, aten.slice_scatter.default, (ignored, labels, dim, start, end), like=head.loss)
    return insert_call(graph, aten.view.default, (placed, [-1]), like=head.loss)


def _order(graph: fx.Graph):
    order = {node: i for i, node in enumerate(graph.nodes)}
    return order.__getitem__


def _reason(head: _LossHead) -> str:
    value = head.logits.meta["val"]
    shape = "×".join(str(d) for d in value.shape)
    adapter = " with a LoRA adapter" if head.low_rank is not None else ""
    return (
        f"logits ({shape} {str(value.dtype).removeprefix('torch.')}) of the cross-entropy over a linear head{adapter}: its gradients are formed "
        "in row chunks in the forward, and the backward scales them by the loss's tangent"
    )


def _op(node: fx.Node) -> str:
    return node.target.__name__ if node.op == "call_function" and hasattr(node.target, "__name__") else str(node.target)


def _name(target: object) -> str:
    return getattr(target, "__name__", str(target)).split(".")[0]
