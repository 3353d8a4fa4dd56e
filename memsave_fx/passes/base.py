"""What every rewrite pass shares: its signature, its record, and node creation."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

from .. import _compat
from ..analysis import IS_BACKWARD, IS_FORWARD
from ..config import MemsaveConfig

aten = torch.ops.aten
prims = torch.ops.prims


@dataclasses.dataclass(frozen=True)
class Rewrite:
    """One backward node a pass rewrote, or declined to rewrite and why."""

    pass_name: str
    node: str  # the backward node, by name in the joint graph
    released: tuple[str, ...]  # forward values that node no longer reads
    applied: bool
    reason: str


RewritePass = Callable[[fx.Graph, MemsaveConfig], list[Rewrite]]


def output_users(node: fx.Node, live: frozenset[int]) -> dict[int, fx.Node] | None:
    """The getitem users of a multi-output node, by output index; None when the node is used
    otherwise, or when an output outside `live` still has users (replacing it would drop them)."""
    users = {user.args[1]: user for user in node.users if user.target is operator.getitem}
    if len(users) != len(node.users) or any(i not in live and u.users for i, u in users.items()):
        return None
    return users


def replace_outputs(graph: fx.Graph, node: fx.Node, users: dict[int, fx.Node], replacements: dict[int, fx.Node]) -> None:
    """Route each output of `node` to its replacement, then erase `node` and its getitems."""
    for index, user in users.items():
        if index in replacements:
            user.replace_all_uses_with(replacements[index])
        graph.erase_node(user)
    graph.erase_node(node)



def insert_call(
    graph: fx.Graph,
    target: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any] | None = None,
    *,
    like: fx.Node,
    before: fx.Node | None = None,
) -> fx.Node:
    """Insert `target(*args, **kwargs)` before `before` (default: `like`), with a fake
    `meta["val"]` and `like`'s tags."""
    kwargs = kwargs or {}
    with graph.inserting_before(before or like):
        node = graph.call_function(target, args, kwargs)
    fake_args, fake_kwargs = fx.node.map_arg((args, kwargs), lambda n: n.meta["val"])
    # Factory ops take no tensor, so the mode comes from the node being replaced.
    fake_mode = _compat.detect_fake_mode([n.meta["val"] for n in node.all_input_nodes] + [like.meta.get("val")])
    with fake_mode if fake_mode is not None else contextlib.nullcontext():
        value = target(*fake_args, **fake_kwargs)
    node.meta["val"] = value
    if isinstance(value, torch.Tensor):
        node.meta["tensor_meta"] = _compat.extract_tensor_metadata(value)
    for key in _compat.INHERITED_META:
        if key in like.meta:
            node.meta[key] = like.meta[key]
    return node


def is_view(node: fx.Node) -> bool:
    return node.op == "call_function" and getattr(node.target, "is_view", False)


def materialises(reader: fx.Node) -> bool:
    """Whether `reader`, or an op reading it through views, is one the partitioner cannot
    fuse with a recomputation of its input (a matmul, a convolution, attention): it keeps
    that input as it is rather than recompute it."""
    if is_view(reader):
        return any(materialises(user) for user in reader.users)
    return reader.op == "call_function" and not _op_types().is_fusible(reader)


@functools.cache
def _op_types() -> _compat.OpTypes:
    return _compat.get_default_op_list()


class BackwardCopier:
    """Forward ops computed again in the backward ("rebuild from what is kept").

    Each copy is tagged for the backward, so that the partitioner cannot move it back to the
    forward. A copy that reads the very inputs its forward op reads would be merged into that
    op by the partitioner's common-subexpression elimination, and the forward's value kept:
    such a copy takes a form that computes the same bits but reads differently (a commuted
    multiplication, a cast given its dtype by keyword), or is refused.
    """

    _COMMUTATIVE = (aten.mul.Tensor, aten.add.Tensor)

    def __init__(self, graph: fx.Graph) -> None:
        self.graph = graph

    def call(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None, *, like: fx.Node, before: fx.Node) -> fx.Node:
        """`target(*args, **kwargs)` in the backward, before `before`, described as `like`."""
        node = insert_call(self.graph, target, args, kwargs, like=like, before=before)
        _compat.tag_for_backward(node)
        node.meta[IS_BACKWARD] = True
        node.meta[IS_FORWARD] = False
        return node

    @classmethod
    def form_apart(
        cls, op: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any], *, reads_apart: bool
    ) -> tuple[Any, tuple[Any, ...], dict[str, Any]] | None:
        """(target, args, kwargs) computing what `op` computes on `args` without merging into
        `op`, where `reads_apart` says whether some argument is itself a copy kept apart from
        its forward value; None if there is none. A view is apart only if what it views is,
        since the elimination merges views of the same value."""
        if reads_apart or is_view(op):
            return op.target, args, kwargs
        if op.target in cls._COMMUTATIVE and len(args) == 2 and not kwargs and all(isinstance(a, fx.Node) for a in args):
            return op.target, (args[1], args[0]), kwargs
        if op.target is prims.convert_element_type.default:
            return op.target, (args[0],), {"dtype": args[1]}  # the dtype by keyword
        return None

    def copy(self, op: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None, *, reads_apart: bool, before: fx.Node) -> fx.Node:
        """`op` on `args` in the backward, in a form apart from `op` itself (see `form_apart`)."""
        form = self.form_apart(op, args, kwargs or {}, reads_apart=reads_apart)
        if form is None:
            raise ValueError(f"{op.name} ({op.target}) has no form the partitioner keeps apart from it")
        target, args, kwargs = form
        return self.call(target, args, kwargs, like=op, before=before)
