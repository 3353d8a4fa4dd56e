"""What the backend did with each graph it compiled: the record users inspect.

A record holds names, reasons and counts, never the model: the graph module and example
inputs it can be traced again from (for a plan, or to re-derive a record AOTAutograd's cache
served) are held by the compiled function, and the record reaches them only while that lives.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch.fx as fx

from . import _compat
from .analysis import GraphInput
from .config import MemsaveConfig

if TYPE_CHECKING:
    from .passes import Rewrite
    from .plan import MemoryPlan

Retrace = Callable[[bool], "CompiledGraph"]  # rewrite=True: memsave's graphs; False: stock's


@dataclasses.dataclass(eq=False)
class CompiledGraph:
    """What the backend did with one Dynamo graph (graph breaks give several).

    `rewrites` lists what each pass rewrote or declined, and why; `packed_masks` counts the
    boolean masks and max-pool offsets saved packed into bytes. For a graph AOTAutograd's cache
    served (`from_cache`), the passes did not run: both are re-derived, by tracing the graph
    again without generating code, when first read while the compiled function is alive.
    """

    index: int
    config: MemsaveConfig
    num_nodes: int
    inputs: tuple[GraphInput, ...] = ()
    from_cache: bool = False
    # The partitioned graphs, kept only when tracing without code generation (a plan):
    # code generation goes on to rewrite them in place.
    forward: fx.GraphModule | None = dataclasses.field(default=None, repr=False)
    backward: fx.GraphModule | None = dataclasses.field(default=None, repr=False)
    _rewrites: list[Rewrite] | None = dataclasses.field(default=None, repr=False)
    _packed_masks: int = dataclasses.field(default=0, repr=False)
    _has_backward: bool = dataclasses.field(default=False, repr=False)
    _retrace: Callable[[], Retrace | None] = dataclasses.field(default=lambda: None, repr=False)

    # Written while compiling, by the joint pass and the partitioner.
    def add_rewrites(self, rewrites: list[Rewrite], has_backward: bool) -> None:
        self._rewrites = (self._rewrites or []) + rewrites
        self._has_backward |= has_backward

    def add_packed_masks(self, count: int) -> None:
        self._packed_masks += count

    @property
    def traced(self) -> bool:
        """Whether the joint pass ran on this graph (False for a cache hit until re-derived)."""
        return self._rewrites is not None

    @property
    def rewrites(self) -> list[Rewrite] | None:
        """What each pass rewrote or declined; None only for a cache hit whose compiled
        function was freed before the record was first read."""
        self._rederive()
        return self._rewrites

    @property
    def has_backward(self) -> bool:
        """Whether the graph has a backward (False for an inference graph)."""
        self._rederive()
        return self._has_backward

    @property
    def packed_masks(self) -> int:
        self._rederive()
        return self._packed_masks

    @property
    def released(self) -> list[str]:
        """Forward values the rewrites stopped the backward from reading."""
        return [name for r in self.rewrites or () if r.applied for name in r.released]

    def hold_retrace(self, retrace: Retrace, holder: Callable[..., Any]) -> Callable[..., Any]:
        """Let the record retrace while `holder` (the compiled function) lives, and no longer:
        the retrace holds the graph module and its example inputs, the model's tensors."""
        try:
            # What Dynamo keeps is the innermost of nested `torch._dynamo.disable` wrappers.
            _compat.innermost_fn(holder)._memsave_retrace = retrace
        except (AttributeError, TypeError):  # an object without a __dict__: wrap it
            compiled = holder

            def holder(*args: Any) -> Any:
                return compiled(*args)

            holder._memsave_retrace = retrace
        self._retrace = weakref.WeakMethod(retrace) if hasattr(retrace, "__self__") else weakref.ref(retrace)
        return holder

    def retrace(self, rewrite: bool) -> CompiledGraph:
        """This graph partitioned again without generating code, with memsave's rewrites or
        without them (stock compilation)."""
        retrace = self._retrace()
        if retrace is None:
            raise RuntimeError(
                f"graph {self.index} cannot be traced again: its compiled function (and with it "
                "the model's graph) was freed, or it was not compiled by a MemsaveBackend call. "
                "Plan while the compiled model is alive."
            )
        return retrace(rewrite)

    def plan(self) -> MemoryPlan:
        """The memory plan of this graph against stock compilation, traced without code generation."""
        from .plan import MemoryPlan

        memsave = self if self.forward is not None else self.retrace(True)
        return MemoryPlan.from_graphs([memsave], [self.retrace(False)])

    def _rederive(self) -> None:
        if not self.from_cache or self.traced or self._retrace() is None:
            return
        traced = self.retrace(True)
        self._rewrites, self._packed_masks = traced._rewrites or [], traced._packed_masks
        self._has_backward = traced._has_backward
