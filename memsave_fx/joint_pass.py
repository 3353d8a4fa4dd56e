"""The joint-graph pass Inductor runs before partitioning: memsave's rewrites, recorded."""

from __future__ import annotations

import functools
from pathlib import Path

import torch.fx as fx

from ._compat import CustomGraphPass, get_hash_for_files
from ._version import __version__
from .analysis import analyze_joint_graph, is_tangent, name_primals
from .config import MemsaveConfig
from .passes import run_passes
from .record import CompiledGraph


class MemsavePass(CustomGraphPass):
    """Inductor's `joint_custom_pre_pass`: runs the rewrite passes, records what they did.

    With `rewrite=False` it only names and analyses the graph, which stock compilation then
    partitions unchanged: the memory plan's baseline.
    """

    def __init__(self, config: MemsaveConfig, record: CompiledGraph | None = None, *, rewrite: bool = True) -> None:
        self.config = config
        self.record = record
        self.rewrite = rewrite

    def __call__(self, graph: fx.Graph) -> None:
        name_primals(graph, self.record.inputs if self.record is not None else ())
        if self.rewrite:
            rewrites = run_passes(graph, self.config)
        else:
            analyze_joint_graph(graph)
            rewrites = []
        if self.record is not None:
            self.record.add_rewrites(rewrites, has_backward=any(map(is_tangent, graph.find_nodes(op="placeholder"))))

    def uuid(self) -> str:
        return _pass_uuid(self.config, self.rewrite)

    def __deepcopy__(self, memo: dict[int, object]) -> MemsavePass:
        # Inductor copies its configuration, this pass included; a copy would record elsewhere.
        return self


@functools.cache
def _pass_uuid(config: MemsaveConfig, rewrite: bool) -> str:
    # The code, the version and every option, so that no cache serves a graph compiled
    # under other settings or by other code.
    sources = tuple(sorted(str(p) for p in Path(__file__).parent.rglob("*.py")))
    return get_hash_for_files(sources, extra=f"memsave_fx {__version__} {config!r} rewrite={rewrite}").hex()
