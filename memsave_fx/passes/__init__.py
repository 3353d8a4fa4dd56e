"""The rewrite passes, in the order they run.

Each pass has the signature `(graph, config) -> list[Rewrite]`, reads the annotations of
`memsave_fx.analysis`, changes only what it records, and leaves a graph it does not apply to
untouched. The analysis is rerun before every pass, so each sees the graph as it is.
"""

from __future__ import annotations

import logging

import torch.fx as fx

from ..analysis import analyze_joint_graph
from ..config import MemsaveConfig
from .approximate_activation_backward import approximate_activation_backward
from .base import Rewrite, RewritePass
from .chunk_linear_cross_entropy import chunk_linear_cross_entropy
from .flatten_saved_conv_inputs import flatten_saved_conv_inputs
from .pool_convolution_inputs import pool_convolution_inputs
from .rebuild_pointwise_reads import rebuild_pointwise_reads
from .replace_eval_batch_norm_backward import replace_eval_batch_norm_backward
from .replace_frozen_convolution_backward import replace_frozen_convolution_backward
from .replace_shape_only_reads import replace_shape_only_reads
from .share_normalized_output import share_normalized_output

__all__ = ["PASSES", "Rewrite", "RewritePass", "run_passes"]

log = logging.getLogger(__name__)

PASSES: tuple[RewritePass, ...] = (
    # First: the rewrites after it see a backward that no longer reads the logits.
    chunk_linear_cross_entropy,
    replace_frozen_convolution_backward,
    replace_eval_batch_norm_backward,
    replace_shape_only_reads,
    pool_convolution_inputs,  # opt-in: lossy
    approximate_activation_backward,  # opt-in: lossy
    # Before the norms': the values it rebuilds read a norm's output in the backward.
    rebuild_pointwise_reads,
    share_normalized_output,  # opt-in: exact up to rounding
    # Last: the rewrites above decide which graph inputs the backward still reads.
    flatten_saved_conv_inputs,
)


def run_passes(graph: fx.Graph, config: MemsaveConfig) -> list[Rewrite]:
    """Run every pass over a joint graph; a graph without backward is left as it is."""
    rewrites: list[Rewrite] = []
    for rewrite_pass in PASSES:
        if analyze_joint_graph(graph) is None:
            return rewrites
        done = rewrite_pass(graph, config)
        if any(r.applied for r in done):
            graph.eliminate_dead_code()
        log.debug("%s: %d rewrites", rewrite_pass.__name__, sum(r.applied for r in done))
        rewrites.extend(done)
    if rewrites:
        graph.lint()
        analyze_joint_graph(graph)  # leave fresh annotations for the plan
    return rewrites
