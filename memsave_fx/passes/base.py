"""What every rewrite pass shares: its signature, its record, and node creation."""

from __future__ import annotations

import contextlib
import dataclasses
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

from .. import _compat
from ..config import MemsaveConfig


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
