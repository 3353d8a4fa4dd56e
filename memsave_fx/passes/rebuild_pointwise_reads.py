"""Rebuild in the backward the wide pointwise copies a matmul reads there (exact; on by default).

The partitioner never recomputes a value that a matmul (or any op it cannot fuse) reads in the
backward: it keeps the value as it is. In LLM LoRA that value is a wide copy of a narrow one.
peft casts each LoRA'd linear's bf16 input to the adapters' fp32 and applies `lora_dropout`,
and lora_A's weight gradient reads `dropout(x.float())`: 4 bytes per element where `x` has 2,
kept once per module although q, k and v read the same `x`.

Such a value is an exact function of narrower ones: a widening cast loses nothing, and dropout's
output is its input times a boolean mask (kept at 1 bit, see `memsave_fx.partition`) times a
constant. This pass computes it again in the backward, right before its reader, by the forward's
own ops, from the narrow sources (`partitioner_tag` "must_be_in_backward", so that the
partitioner cannot move it back). The sources are kept once for every module that reads them;
the partitioner may recompute them in turn from what it keeps anyway (down_proj's input
`silu(gate) * up` from SwiGLU's own saved `gate` and `up`).

Only ops whose result does not depend on how Inductor fuses them are rebuilt, so the rebuilt
value is bitwise the forward's: views, widening casts, and multiplications and divisions by a
scalar computed in fp32 or fp64. Low-precision arithmetic is not, since a fused kernel may skip
its rounding. A value is rebuilt only where its sources, each counted once among the values
that share it, are fewer bytes than the value; otherwise the pass declines and records why.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.fx as fx

from ..analysis import BACKWARD_READS, IS_BACKWARD, IS_FORWARD, ReadPurpose
from ..config import MemsaveConfig
from .base import BackwardCopier, Rewrite, is_view, materialises

aten = torch.ops.aten
prims = torch.ops.prims
log = logging.getLogger(__name__)

_FULL_PRECISION = (torch.float32, torch.float64)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_BYTE = 8


@dataclasses.dataclass
class _Candidate:
    value: fx.Node  # the forward value a materialising backward op reads
    base: fx.Node  # the computed value it is a view of (itself if none)
    ops: tuple[fx.Node, ...]  # the forward ops rebuilt, sources first
    sources: tuple[fx.Node, ...]  # what the rebuild reads from the forward

    @property
    def nbytes(self) -> int:
        return _nbytes(self.base)


def rebuild_pointwise_reads(graph: fx.Graph, config: MemsaveConfig) -> list[Rewrite]:
    if not config.exact_compression:
        return []
    candidates = [c for c in map(_candidate, _values_read_by_materialising_ops(graph)) if c is not None]
    if not candidates:
        return []
    mask_bits = 1 if config.compiler == "inductor" else _BYTE  # masks are packed under Inductor only
    accepted, declined = _worth_rebuilding(candidates, mask_bits)
    rewrites = [_declined(c, reason) for c, reason in declined]
    copier = BackwardCopier(graph)
    order = {node: i for i, node in enumerate(graph.nodes)}
    for candidate in accepted:
        reads_apart = _reads_apart(candidate)
        if not _stays_apart(candidate, reads_apart):
            reason = "its rebuild would read the forward's own inputs with the forward's own ops, and merge back into the forward"
            rewrites.append(_declined(candidate, reason))
            continue
        readers = [r for r in candidate.value.users if r.meta[IS_BACKWARD]]
        rebuilt = _rebuild(copier, candidate, reads_apart, before=min(readers, key=order.__getitem__))
        for reader in readers:
            reader.replace_input_with(candidate.value, rebuilt)
        rewrites.append(_applied(candidate, mask_bits))
    for rewrite in rewrites:
        log.debug("%s: %s", rewrite.node, rewrite.reason)
    return rewrites


def _reads_apart(candidate: _Candidate) -> dict[fx.Node, bool]:
    """For each op of the rebuild, whether its copy reads a copy kept apart from the forward's
    value (see `BackwardCopier.form_apart`): a computed copy is apart, a view as apart as its base."""
    reads_apart: dict[fx.Node, bool] = {}
    apart: set[fx.Node] = set()
    for op in candidate.ops:  # sources first
        reads_apart[op] = any(i in apart for i in op.all_input_nodes)
        if reads_apart[op] or not is_view(op):
            apart.add(op)
    return reads_apart


def _stays_apart(candidate: _Candidate, reads_apart: dict[fx.Node, bool]) -> bool:
    """Whether every op of the rebuild has a copy the partitioner keeps apart from it."""
    return all(BackwardCopier.form_apart(op, op.args, op.kwargs, reads_apart=reads_apart[op]) is not None for op in candidate.ops)


def _rebuild(copier: BackwardCopier, candidate: _Candidate, reads_apart: dict[fx.Node, bool], *, before: fx.Node) -> fx.Node:
    built: dict[fx.Node, fx.Node] = {}
    for op in candidate.ops:  # sources first
        args, kwargs = fx.node.map_arg((op.args, op.kwargs), lambda a: built.get(a, a))
        built[op] = copier.copy(op, args, kwargs, reads_apart=reads_apart[op], before=before)
    return built[candidate.value]


def _values_read_by_materialising_ops(graph: fx.Graph) -> list[fx.Node]:
    """Forward values some backward op reads, for a requested gradient, as it is: a matmul
    or another op the partitioner cannot fuse with a recomputation."""
    return [
        node for node in graph.nodes
        if node.meta.get(IS_FORWARD) and not node.meta.get(IS_BACKWARD)
        and any(r.purpose is ReadPurpose.GRADIENT and materialises(r.reader) for r in node.meta.get(BACKWARD_READS, ()))
    ]  # fmt: skip


def _candidate(value: fx.Node) -> _Candidate | None:
    """The rebuild of `value` from its nearest sources the backward reads anyway or that are
    not exactly rebuildable; None when `value` is no exact pointwise function of others."""
    ops: list[fx.Node] = []
    sources: list[fx.Node] = []
    seen: set[fx.Node] = set()

    def visit(node: fx.Node, is_root: bool) -> None:
        if node in seen:
            return
        seen.add(node)
        if not _exactly_rebuildable(node) or (not is_root and _read_by_backward(node)):
            sources.append(node)
            return
        for source in node.all_input_nodes:
            visit(source, False)
        ops.append(node)

    visit(value, True)
    if all(is_view(op) for op in ops):
        return None  # nothing computed: the partitioner keeps a view's base
    base = value
    while is_view(base):
        base = base.args[0]
    return _Candidate(value, base, tuple(ops), tuple(sources))


def _exactly_rebuildable(node: fx.Node) -> bool:
    """Whether the node is a forward op that gives the same bits however Inductor fuses it."""
    value = node.meta.get("val")
    if node.op != "call_function" or not node.meta.get(IS_FORWARD) or not isinstance(value, torch.Tensor):
        return False
    if is_view(node):
        return True
    if node.target is prims.convert_element_type.default:
        source = node.args[0].meta["val"].dtype
        return value.dtype in _FLOATS and (source == torch.bool or (source in _FLOATS and _widens(source, value.dtype)))
    if node.target is aten.mul.Tensor:
        return value.dtype in _FULL_PRECISION
    if node.target is aten.div.Tensor:
        return value.dtype in _FULL_PRECISION and not isinstance(node.args[1], fx.Node)
    return False


def _widens(source: torch.dtype, target: torch.dtype) -> bool:
    """Whether every `source` value is exactly a `target` value."""
    return source == target or (target.itemsize > source.itemsize and target != torch.float16)


def _read_by_backward(node: fx.Node) -> bool:
    return bool(node.meta.get(BACKWARD_READS))


def _worth_rebuilding(
    candidates: list[_Candidate], mask_bits: int
) -> tuple[list[_Candidate], list[tuple[_Candidate, str]]]:
    """Split the candidates into those whose sources, each shared equally among the values
    rebuilt from it, take fewer bytes than the value, and the others with the reason."""
    accepted = list(candidates)
    declined: list[tuple[_Candidate, str]] = []
    while True:
        sharing: dict[fx.Node, int] = {}
        for candidate in accepted:
            for source in candidate.sources:
                sharing[source] = sharing.get(source, 0) + 1
        costly = []
        for candidate in accepted:
            share = sum(_source_bytes(s, mask_bits) / sharing[s] for s in candidate.sources)
            if share >= candidate.nbytes:
                sources = _describe(candidate.sources, mask_bits)
                costly.append((candidate, f"rebuilding it from {sources} keeps {share:.0f} bytes for its {candidate.nbytes}: nothing to save"))
        if not costly:
            return accepted, declined
        declined.extend(costly)
        dropped = {id(c) for c, _ in costly}
        accepted = [c for c in accepted if id(c) not in dropped]


def _source_bytes(source: fx.Node, mask_bits: int) -> float:
    """What keeping `source` for the rebuild adds: nothing for a parameter or a value the
    backward reads anyway, a bit per element for a packed mask."""
    if source.op == "placeholder" or _read_by_backward(source):
        return 0.0
    value = source.meta["val"]
    if value.dtype == torch.bool:
        return value.numel() * mask_bits / _BYTE
    return float(_nbytes(source))


def _nbytes(node: fx.Node) -> int:
    value = node.meta["val"]
    return value.numel() * value.dtype.itemsize


def _dtype(node: fx.Node) -> str:
    return str(node.meta["val"].dtype).removeprefix("torch.")


def _describe(sources: tuple[fx.Node, ...], mask_bits: int) -> str:
    """"mul_9 (bfloat16) and the 1-bit mask gt_3": values first, masks after."""
    values = [f"{s.name} ({_dtype(s)})" for s in sources if s.meta["val"].dtype != torch.bool]
    mask = "the 1-bit mask" if mask_bits == 1 else "the boolean mask"
    masks = [f"{mask} {s.name}" for s in sources if s.meta["val"].dtype == torch.bool]
    return " and ".join(filter(None, (", ".join(values), ", ".join(masks))))


def _applied(candidate: _Candidate, mask_bits: int) -> Rewrite:
    widens = any(op.target is prims.convert_element_type.default for op in candidate.ops)
    masked = any(s.meta["val"].dtype == torch.bool for s in candidate.sources)
    what = f"{_dtype(candidate.base)} {'dropout output' if masked else 'copy'}{' of a widened value' if widens and masked else ''}"
    reason = f"{what} rebuilt in the backward from {_describe(candidate.sources, mask_bits)}"
    released = tuple(dict.fromkeys(n.name for n in (candidate.base, candidate.value)))
    return Rewrite(rebuild_pointwise_reads.__name__, candidate.value.name, released, True, reason)


def _declined(candidate: _Candidate, reason: str) -> Rewrite:
    return Rewrite(rebuild_pointwise_reads.__name__, candidate.value.name, (), False, f"{candidate.base.name}: {reason}")
