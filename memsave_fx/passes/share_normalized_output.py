"""Keep one tensor per LayerNorm/RMSNorm for its own backward and its consumers' (`share_norms`).

MS-LayerNorm and MS-RMSNorm (Yang et al., ICML 2024). A norm computes the per-row
`rstd = rsqrt(statistic + eps)`, the normalised `x̂ = centered · rstd` (`centered` is `x - mean`,
or `x` itself for RMSNorm) and its output `y = γ·x̂ + β`. Stock compilation keeps the norm's
input (or x̂) for the norm's backward, and keeps y as well when a consumer needs its input for a
weight gradient (a trainable linear, LoRA's A): the partitioner never recomputes a value that a
matmul reads in the backward. After this pass the backward reads only x̂, in the output's dtype,
and rstd:

- a read of y, of any step from x̂ to y, or of a view of them, reads that value rebuilt from x̂
  in the backward, by the forward's own ops (`partitioner_tag` "must_be_in_backward");
- the norm's own backward reads `centered` as x̂ / rstd.

The rebuilt y is bitwise the forward's where x̂ is kept in the dtype the forward scales it in
(fp32 models, and RMSNorms that cast x̂ before the weight, as Llama's does). A LayerNorm computed
in fp32 for a bf16 model keeps x̂ in bf16, and its rebuilt y is within bf16 rounding. The norm's
input gradient is exact up to rounding. The pass applies only where the backward then reads
fewer bytes of the norm's values.
"""

from __future__ import annotations

import dataclasses
import logging
import operator

import torch
import torch.fx as fx

from ..analysis import IS_FORWARD, SAVED_AS, Decision, SavedAs
from ..config import MemsaveConfig
from .base import BackwardCopier, Rewrite, insert_call, is_view, materialises

aten = torch.ops.aten
prims = torch.ops.prims
log = logging.getLogger(__name__)

_AFFINE_OPS = (aten.mul.Tensor, aten.add.Tensor)
_COMMUTATIVE = (aten.mul.Tensor, aten.add.Tensor)
_COPIES = (aten.clone.default, aten.alias.default, prims.convert_element_type.default)


@dataclasses.dataclass(frozen=True)
class _Norm:
    kind: str  # "LayerNorm" or "RMSNorm"
    source: fx.Node  # the input the statistics read
    rstd: fx.Node
    centered: fx.Node  # what rstd scales: source - mean, or source itself
    normalized: fx.Node  # x̂ = centered · rstd
    affine: tuple[fx.Node, ...]  # x̂ -> y: per-feature muls and adds, dtype casts
    statistics: tuple[fx.Node, ...]  # from the source to rstd, and the mean

    @property
    def output(self) -> fx.Node:
        return self.affine[-1] if self.affine else self.normalized

    @property
    def forward_ops(self) -> set[object]:
        """The `seq_nr`s of the norm's forward ops, which their backward nodes share."""
        own = (*self.statistics, self.normalized, *self.affine)
        nodes = own if self.centered is self.source else (*own, self.centered)
        return {n.meta.get("seq_nr") for n in nodes} - {None}


def share_normalized_output(graph: fx.Graph, config: MemsaveConfig) -> list[Rewrite]:
    if not config.share_norms:
        return []
    rewrites = []
    for rstd in list(graph.find_nodes(op="call_function", target=aten.rsqrt.default)):
        norm = _match_norm(rstd)
        if norm is None:
            continue
        rewrite = _share(graph, norm)
        log.debug("%s: %s", rewrite.node, rewrite.reason)
        rewrites.append(rewrite)
    return rewrites


def _match_norm(rstd: fx.Node) -> _Norm | None:
    """The norm whose per-row `rstd` this is: rsqrt(var + eps) from `var_mean` (LayerNorm) or
    rsqrt(mean(x**2) + eps) (RMSNorm), scaling one forward value."""
    if not rstd.meta[IS_FORWARD]:
        return None
    shifted = rstd.args[0]
    if shifted.target not in (aten.add.Tensor, aten.add.Scalar) or not _positive_scalar(shifted.args[1]):
        return None  # without a positive eps, rstd may be infinite and x̂ / rstd undefined
    statistic = shifted.args[0]
    if statistic.target is operator.getitem and statistic.args[0].target is aten.var_mean.correction:
        var_mean = statistic.args[0]
        source, dims = var_mean.args[0], var_mean.args[1]
        means = [u for u in var_mean.users if u.args[1] == 1]
        if statistic.args[1] != 0 or len(means) != 1:
            return None
        kind, statistics = "LayerNorm", (rstd, shifted, statistic, var_mean, means[0])
        candidates = [u for u in means[0].users if u.target is aten.sub.Tensor and u.args == (source, means[0])]
    elif statistic.target is aten.mean.dim and statistic.args[0].target is aten.pow.Tensor_Scalar:
        square = statistic.args[0]
        if square.args[1] != 2:
            return None
        source, dims = square.args[0], statistic.args[1]
        kind, statistics = "RMSNorm", (rstd, shifted, statistic, square)
        candidates = [source]
    else:
        return None
    for centered in candidates:
        normalized = [
            u for u in rstd.users
            if u.target is aten.mul.Tensor and set(u.args) == {centered, rstd} and u.meta[IS_FORWARD]
        ]  # fmt: skip
        if len(normalized) == 1:
            ndim = normalized[0].meta["val"].dim()
            affine = _affine_chain(normalized[0], {d % ndim for d in dims})
            return _Norm(kind, source, rstd, centered, normalized[0], affine, statistics)
    return None


def _positive_scalar(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _affine_chain(normalized: fx.Node, features: set[int]) -> tuple[fx.Node, ...]:
    """The forward steps from x̂ to the norm's output: each the only forward user of the one
    before, a dtype cast or a mul/add by a per-feature value (γ, β, 1 + γ) or a scalar."""
    chain: list[fx.Node] = []
    node = normalized
    while True:
        users = [u for u in node.users if u.meta[IS_FORWARD]]
        if len(users) != 1:
            break
        (user,) = users
        if user.target in _AFFINE_OPS and not user.kwargs and len(user.args) == 2:
            others = [a for a in user.args if a is not node]
            if len(others) != 1 or (isinstance(others[0], fx.Node) and not _per_feature(others[0], user, features)):
                break
        elif user.target is not prims.convert_element_type.default:
            break
        chain.append(user)
        node = user
    return tuple(chain)


def _per_feature(value: fx.Node, result: fx.Node, features: set[int]) -> bool:
    """Whether `value` is the same for every row of `result` (size 1 along each row dimension)."""
    shape, ndim = value.meta["val"].shape, result.meta["val"].dim()
    offset = ndim - len(shape)
    return all(shape[d - offset] == 1 for d in range(offset, ndim) if d not in features)


def _share(graph: fx.Graph, norm: _Norm) -> Rewrite:
    output = norm.output

    def declined(reason: str) -> Rewrite:
        return Rewrite(share_normalized_output.__name__, output.name, (), False, f"{norm.kind} {output.name}: {reason}")

    # The backward may recompute forward values of the norm (LayerNorm's recomputes x̂); it
    # reads them as the forward's own, as the partitioner's CSE would have it.
    duplicates = _duplicates(graph, (norm.source, norm.centered, norm.normalized, *norm.affine))
    rebuildable = _with_views((norm.normalized, *norm.affine))
    norm_ops = norm.forward_ops
    reads: list[tuple[fx.Node, fx.Node]] = []  # (backward reader, forward value it reads)
    kept: set[fx.Node] = set()  # the norm's values the backward still reads as they are
    live = _live(graph, duplicates)
    for reader in graph.nodes:
        if reader.meta[IS_FORWARD] or reader not in live:
            continue
        for value in reader.all_input_nodes:
            value = duplicates.get(value, value)
            by_norm = reader.meta.get("seq_nr") in norm_ops
            if value in rebuildable or (value is norm.centered and by_norm):
                reads.append((reader, value))
            elif value in norm.statistics[1:] or (value is norm.source and by_norm):
                kept.add(value)
    if not reads:
        return declined("the backward reads neither its output nor x̂")
    shared_dtype = _narrower(norm.normalized.meta["val"].dtype, output.meta["val"].dtype)
    step = _step_after_shared(norm, shared_dtype)
    if step is not None and step.target not in _COMMUTATIVE:
        return declined(f"x̂ is cast by {step.name} before its affine steps: rebuilding it would merge into the forward's")
    stock = _stock_keeps(norm, reads, kept)
    shared_bytes = norm.normalized.meta["val"].numel() * shared_dtype.itemsize
    if shared_bytes + _bytes(kept) >= _bytes(stock | kept):
        names = ", ".join(sorted(v.name for v in stock | kept))
        return declined(f"nothing to share: stock compilation keeps only {names}")

    for duplicate, original in duplicates.items():
        duplicate.replace_all_uses_with(original)
    shared = _shared_value(graph, norm, shared_dtype)
    rebuild = _Rebuilder(graph, norm, shared, rebuildable)
    for reader, value in reads:
        reader.replace_input_with(value, rebuild(value, before=reader))

    released = sorted({v.name for _, v in reads if v is not shared})
    dtype = str(shared_dtype).removeprefix("torch.")
    reason = (
        f"{norm.kind} {output.name}: its backward and the readers of its output share x̂ "
        f"({shared.name}, {dtype}) and rstd; {', '.join(released)} rebuilt from them in the backward"
    )
    shared.meta[SAVED_AS] = SavedAs(Decision.SHARED, shared.name, reason)
    return Rewrite(share_normalized_output.__name__, output.name, tuple(released), True, reason)


def _stock_keeps(norm: _Norm, reads: list[tuple[fx.Node, fx.Node]], kept: set[fx.Node]) -> set[fx.Node]:
    """What the partitioner would keep of the values `reads` read. A value a matmul (or any
    op it cannot fuse) reads in the backward is kept as it is. Values read by pointwise ops
    it recomputes from an earlier value of the chain source -> centered -> x̂ -> y, if one is
    kept: so besides the materialised ones it keeps the earliest value read."""
    chain = [norm.source, norm.centered, norm.normalized, *norm.affine]
    position = {value: index for index, value in enumerate(chain)}

    def base(value: fx.Node) -> fx.Node:  # the chain value a view reads
        while value not in position:
            value = value.args[0]
        return value

    materialised = {base(v) for reader, v in reads if materialises(reader)}
    available = [position[v] for v in materialised | kept if v in position]
    first_available = min(available, default=len(chain))
    earlier = [base(v) for reader, v in reads if not materialises(reader) and position[base(v)] < first_available]
    return materialised | ({min(earlier, key=position.__getitem__)} if earlier else set())


def _duplicates(graph: fx.Graph, values: tuple[fx.Node, ...]) -> dict[fx.Node, fx.Node]:
    """Other nodes computing what one of `values` computes, mapped to it: the same op, dtype
    and shape, on the same inputs up to copies and casts. A LayerNorm's backward recomputes
    x̂ this way, from the mean and rstd rounded to a bf16 input's dtype."""
    duplicates: dict[fx.Node, fx.Node] = {}

    def canonical(arg: object) -> object:
        while isinstance(arg, fx.Node):
            arg = duplicates.get(arg, arg)
            if arg.target not in _COPIES:
                break
            arg = arg.args[0]
        return arg

    keys = [(v, fx.node.map_arg(v.args, canonical)) for v in values]
    for node in graph.nodes:
        # Forward nodes stay as they are: the forward must be the stock one, bit for bit.
        if node.op != "call_function" or node in values or node.meta[IS_FORWARD]:
            continue
        args = fx.node.map_arg(node.args, canonical)
        for value, value_args in keys:
            if (node.target, args, node.kwargs) == (value.target, value_args, value.kwargs) and _same_type(node, value):
                duplicates[node] = value
                break
    return duplicates


def _same_type(a: fx.Node, b: fx.Node) -> bool:
    x, y = a.meta["val"], b.meta["val"]
    return x.dtype == y.dtype and x.shape == y.shape


def _live(graph: fx.Graph, duplicates: dict[fx.Node, fx.Node]) -> set[fx.Node]:
    """The nodes the outputs still need once each duplicate reads as its original."""
    live: set[fx.Node] = set()
    frontier = [graph.output_node()]
    while frontier:
        for source in frontier.pop().all_input_nodes:
            source = duplicates.get(source, source)
            if source not in live:
                live.add(source)
                frontier.append(source)
    return live


def _with_views(values: tuple[fx.Node, ...]) -> set[fx.Node]:
    """`values` and every forward view of them, transitively."""
    found = set(values)
    frontier = list(values)
    while frontier:
        for user in frontier.pop().users:
            if is_view(user) and user.meta[IS_FORWARD] and user not in found:
                found.add(user)
                frontier.append(user)
    return found


def _bytes(values: set[fx.Node]) -> int:
    return sum(v.meta["val"].numel() * v.meta["val"].dtype.itemsize for v in values)


def _narrower(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    return b if b.itemsize < a.itemsize else a


def _existing_shared(norm: _Norm, dtype: torch.dtype) -> int | None:
    """Where in (x̂, *affine) the forward already holds x̂ in `dtype`: x̂ itself, or its cast."""
    if norm.normalized.meta["val"].dtype == dtype:
        return 0
    first = norm.affine[0] if norm.affine else None
    if first is not None and first.target is prims.convert_element_type.default and first.args[1] == dtype:
        return 1
    return None


def _step_after_shared(norm: _Norm, dtype: torch.dtype) -> fx.Node | None:
    """The forward's affine step that reads the shared x̂ directly, if any."""
    chain = (norm.normalized, *norm.affine)
    position = _existing_shared(norm, dtype)
    return chain[position + 1] if position is not None and position + 1 < len(chain) else None


def _shared_value(graph: fx.Graph, norm: _Norm, dtype: torch.dtype) -> fx.Node:
    """x̂ in `dtype`: x̂ itself, the forward's own cast of it, or a new cast in the forward."""
    position = _existing_shared(norm, dtype)
    if position is not None:
        return (norm.normalized, *norm.affine)[position]
    cast = (norm.normalized, dtype)
    return insert_call(graph, prims.convert_element_type.default, cast, like=norm.normalized, before=norm.normalized.next)


class _Rebuilder:
    """Forward values of the norm, computed in the backward from the shared x̂ and rstd."""

    def __init__(self, graph: fx.Graph, norm: _Norm, shared: fx.Node, rebuildable: set[fx.Node]) -> None:
        self.copier = BackwardCopier(graph)
        self.norm = norm
        self.shared = shared
        self.rebuildable = rebuildable
        self.built: dict[fx.Node, fx.Node] = {shared: shared}

    def __call__(self, value: fx.Node, *, before: fx.Node) -> fx.Node:
        if value not in self.built:
            self.built[value] = self._build(value, before)
        return self.built[value]

    def _build(self, value: fx.Node, before: fx.Node) -> fx.Node:
        norm, call = self.norm, self.copier.call
        if value is norm.centered:  # centered = x̂ / rstd
            normalized = self(norm.normalized, before=before)
            quotient = call(aten.div.Tensor, (normalized, norm.rstd), like=value, before=before)
            if quotient.meta["val"].dtype == value.meta["val"].dtype:
                return quotient
            return call(prims.convert_element_type.default, (quotient, value.meta["val"].dtype), like=value, before=before)
        if value is norm.normalized:  # the shared x̂ is a cast of it
            return call(prims.convert_element_type.default, (self.shared, value.meta["val"].dtype), like=value, before=before)
        # An affine step or a view: the forward's own op, on rebuilt inputs.
        args = fx.node.map_arg(value.args, lambda a: self(a, before=before) if a in self.rebuildable else a)
        return self.copier.copy(value, args, value.kwargs, reads_apart=args != value.args, before=before)
