"""Stop backward ops that read a forward tensor only for its shape from keeping that tensor.

Pooling and padding backwards (`avg_pool2d_backward(grad_output, self, ...)`,
`reflection_pad2d_backward(grad_output, self, padding)`, ...) take the forward input to learn
its size and layout. Their kernels never read its data, yet the edge makes the partitioner
keep it. This pass hands them an uninitialised `empty_strided` of the same size, strides,
dtype and device, created in the backward: an allocation, never a fill.

`convolution_backward` without the input gradient reads the weight only for its shape. A
weight computed in the forward (Inductor's conv-BN folding in eval mode, a weight-norm
reparametrisation) is then kept for nothing; a parameter is an input, kept anyway, so it stays.
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from ..analysis import ARG_PURPOSES, IS_BACKWARD, SHAPE_ONLY_BACKWARD_OPS, ReadPurpose
from .. import _compat
from ..config import MemsaveConfig
from .base import Rewrite, insert_call

aten = torch.ops.aten
log = logging.getLogger(__name__)

_CONVOLUTION_WEIGHT = 2  # convolution_backward(grad_output, input, weight, ...)


def replace_shape_only_reads(graph: fx.Graph, config: MemsaveConfig) -> list[Rewrite]:
    rewrites = []
    for node in graph.nodes:
        if not node.meta[IS_BACKWARD]:
            continue
        if node.target in SHAPE_ONLY_BACKWARD_OPS:
            candidates = enumerate(node.args)
        elif node.target is aten.convolution_backward.default and node.args[_CONVOLUTION_WEIGHT].op != "placeholder":
            candidates = [(_CONVOLUTION_WEIGHT, node.args[_CONVOLUTION_WEIGHT])]
        else:
            continue
        for index, source in candidates:
            if not isinstance(source, fx.Node) or source.meta[IS_BACKWARD]:
                continue
            argument = node.target._schema.arguments[index].name
            if node.meta[ARG_PURPOSES][argument] is not ReadPurpose.METADATA:
                continue
            rewrite = _replace_argument(graph, node, index, source)
            log.debug("%s: %s", node.name, rewrite.reason)
            rewrites.append(rewrite)
    return rewrites


def _replace_argument(graph: fx.Graph, node: fx.Node, index: int, source: fx.Node) -> Rewrite:
    value = source.meta["val"]
    if not all(is_concrete_int(d) for d in (*value.shape, *value.stride())):
        return Rewrite(
            replace_shape_only_reads.__name__, node.name, (), False,
            f"{source.name} has a symbolic size or stride",
        )  # fmt: skip
    stand_in = insert_call(
        graph,
        aten.empty_strided.default,
        ([int(d) for d in value.shape], [int(s) for s in value.stride()]),
        {"dtype": value.dtype, "device": value.device},
        like=node,
    )
    # Created from nothing, it would otherwise be free to land in the forward and be saved.
    _compat.tag_for_backward(stand_in)
    node.replace_input_with(source, stand_in)
    return Rewrite(
        replace_shape_only_reads.__name__,
        node.name,
        (source.name,),
        True,
        f"{node.target.name()} read {source.name} only for its shape",
    )
