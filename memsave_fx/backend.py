"""The `memsave` torch.compile backend.

Dynamo's graph goes to Inductor's `compile_fx` (or, with `compiler="eager"`, to AOTAutograd
with no code generation). In both, `MemsavePass` runs on the joint forward/backward graph
before the partitioner chooses what to save, so the rewrites change what is kept.
The backend is registered only through the `torch_dynamo_backends` entry point.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx

from .analysis import GraphInput, InputKind
from .config import MemsaveConfig

if TYPE_CHECKING:
    from .joint_pass import MemsavePass
    from .passes import Rewrite
    from .plan import MemoryPlan

log = logging.getLogger(__name__)

_JOINT_PASS_OPTION = "joint_custom_pre_pass"
_PARTITIONER_OPTION = "custom_partitioner_fn"


@dataclasses.dataclass
class CompiledGraph:
    """What the backend did with one Dynamo graph (graph breaks give several)."""

    index: int
    config: MemsaveConfig
    num_nodes: int
    inputs: tuple[GraphInput, ...] = ()
    # None until AOTAutograd traces a joint graph; it stays None for a graph served from
    # AOTAutograd's cache, since the pass does not run then.
    rewrites: list[Rewrite] | None = None
    has_backward: bool = False
    packed_masks: int = 0  # boolean masks and max-pool offsets saved packed into bytes
    # The partitioned graphs, kept only when tracing without code generation (a plan):
    # code generation goes on to rewrite them in place.
    forward: fx.GraphModule | None = dataclasses.field(default=None, repr=False)
    backward: fx.GraphModule | None = dataclasses.field(default=None, repr=False)
    _trace: Callable[[bool], CompiledGraph] | None = dataclasses.field(default=None, repr=False)

    @property
    def released(self) -> list[str]:
        """Forward values the rewrites stopped the backward from reading."""
        return [name for r in self.rewrites or () if r.applied for name in r.released]

    def plan(self) -> MemoryPlan:
        """The memory plan of this graph against stock compilation, traced without code generation."""
        from .plan import MemoryPlan

        if self._trace is None:
            raise RuntimeError(f"graph {self.index} was not recorded by a MemsaveBackend call")
        memsave = self if self.forward is not None else self._trace(True)
        return MemoryPlan.from_graphs([memsave], [self._trace(False)])


class MemsaveBackend:
    """A torch.compile backend; `compiled` lists what it compiled, one entry per graph.

    With `generate_code=False` it only partitions: the compiled callables run the partitioned
    graphs as they are (on fake tensors, for `memsave_fx.plan`).
    """

    def __init__(self, config: MemsaveConfig | None = None, *, generate_code: bool = True) -> None:
        self.config = config or MemsaveConfig()
        self.generate_code = generate_code
        self.compiled: list[CompiledGraph] = []

    def __repr__(self) -> str:
        return f"MemsaveBackend({self.config!r})"

    def plans(self) -> list[MemoryPlan]:
        """One memory plan per compiled graph."""
        return [graph.plan() for graph in self.compiled]

    def __call__(
        self,
        gm: fx.GraphModule,
        example_inputs: Sequence[Any],
        *,
        mode: str | None = None,
        options: dict[str, Any] | None = None,
    ) -> Callable[..., Any]:
        config, inductor_options = self._resolve(mode, options)
        inputs = graph_inputs(gm)
        # Dynamo's fake mode, for a retrace outside Dynamo: under the DDP optimizer a split
        # piece's example inputs can mix its fake tensors with the caller's (a plan's).
        fake_mode = torch._guards.detect_fake_mode(example_inputs)
        trace = functools.partial(_trace, gm, example_inputs, fake_mode, config, inputs, mode, inductor_options)
        record = CompiledGraph(len(self.compiled), config, len(gm.graph.nodes), inputs, _trace=trace)
        self.compiled.append(record)
        return _compile(
            gm, example_inputs, config, record, mode, inductor_options, rewrite=True, generate_code=self.generate_code
        )

    def _resolve(self, mode: str | None, options: dict[str, Any] | None) -> tuple[MemsaveConfig, dict[str, Any]]:
        overrides, inductor_options = MemsaveConfig.split_options(options)
        config = dataclasses.replace(self.config, **overrides)
        for reserved in (_JOINT_PASS_OPTION, _PARTITIONER_OPTION):
            if reserved in inductor_options:
                raise ValueError(
                    f"option {reserved!r} is reserved for memsave's own passes; "
                    f"valid memsave options: {', '.join(sorted(MemsaveConfig.option_names()))}"
                )
        for key in inductor_options:
            # A misspelt memsave option would otherwise reach Inductor, whose error names only its own.
            close = difflib.get_close_matches(key, MemsaveConfig.option_names(), n=1, cutoff=0.8)
            if close:
                raise ValueError(
                    f"unknown option {key!r}; did you mean memsave's {close[0]!r}? "
                    f"valid memsave options: {', '.join(sorted(MemsaveConfig.option_names()))}"
                )
        if config.compiler == "eager" and (mode not in (None, "default") or inductor_options):
            raise ValueError(
                "compiler='eager' generates no code, so it takes no Inductor mode or "
                f"options; got mode={mode!r}, options={sorted(inductor_options)}"
            )
        return config, inductor_options


def graph_inputs(gm: fx.GraphModule) -> tuple[GraphInput, ...]:
    """The Dynamo graph's inputs, named as users know them: "layer1.0.conv1.weight", "args[0]"."""
    inputs = []
    for node in gm.graph.find_nodes(op="placeholder"):
        source = getattr(node.meta.get("grapharg"), "source", None)
        source_name = source.name if source is not None else node.name
        if callable(source_name):  # a method, not a property, in some torch versions
            source_name = source_name()
        attributes = re.findall(r"_(modules|parameters|buffers)\['([^']+)'\]", source_name)
        if attributes:
            kind = {"parameters": InputKind.PARAMETER, "buffers": InputKind.BUFFER}.get(attributes[-1][0], InputKind.INPUT)
            inputs.append(GraphInput(".".join(name for _, name in attributes), kind))
        else:
            # L['args'][0] -> args[0]: Dynamo's local-variable quoting says nothing to users.
            inputs.append(GraphInput(re.sub(r"^L\['(\w+)'\]", r"\1", source_name), InputKind.INPUT))
    return tuple(inputs)


def _compile(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    config: MemsaveConfig,
    record: CompiledGraph,
    mode: str | None,
    inductor_options: dict[str, Any],
    *,
    rewrite: bool,
    generate_code: bool,
) -> Callable[..., Any]:
    """Compile `gm` as the backend does; `rewrite=False` gives stock compilation (the plan's
    baseline), `generate_code=False` stops after partitioning and keeps the graphs."""
    # Imported here: Inductor's modules are heavy, and `import memsave_fx` stays lean.
    from .joint_pass import MemsavePass
    from .partition import MemsavePartitioner

    joint_pass = MemsavePass(config, record, rewrite=rewrite)
    # Packing pays off only where Inductor fuses the packing arithmetic into its kernels.
    pack_masks = rewrite and config.exact_compression and config.compiler == "inductor"
    partitioner = MemsavePartitioner(
        joint_pass.uuid(),
        record,
        pack_masks=pack_masks,
        keep_graphs=not generate_code,
        lowered_by_inductor=config.compiler == "inductor",
    )
    if config.compiler == "eager":
        return _compile_eager(gm, example_inputs, joint_pass, partitioner)
    # Inductor's own wrapper validates the remaining options and expands `mode`.
    inductor = torch._TorchCompileInductorWrapper(mode, inductor_options, dynamic=None)
    patches = {_JOINT_PASS_OPTION: joint_pass, _PARTITIONER_OPTION: partitioner}
    if generate_code:
        return inductor(gm, example_inputs, config_patches=patches)
    from torch._inductor.compile_fx import compile_fx

    from .partition import keep_graph_without_codegen

    return compile_fx(
        gm,
        example_inputs,
        inner_compile=functools.partial(keep_graph_without_codegen, record),
        config_patches={**inductor.config, **patches},
    )


def _trace(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    fake_mode: torch._subclasses.FakeTensorMode | None,
    config: MemsaveConfig,
    inputs: tuple[GraphInput, ...],
    mode: str | None,
    inductor_options: dict[str, Any],
    rewrite: bool,
) -> CompiledGraph:
    """Partition `gm` again without generating code: with memsave's rewrites, or without (stock)."""
    record = CompiledGraph(-1, config, len(gm.graph.nodes), inputs)
    if fake_mode is not None:
        example_inputs = [_in_fake_mode(fake_mode, value) for value in example_inputs]
    # A cache hit would skip the joint pass and the partitioner, which record the graphs.
    with torch._functorch.config.patch(enable_autograd_cache=False):
        _compile(gm, example_inputs, config, record, mode, inductor_options, rewrite=rewrite, generate_code=False)
    return record


def _in_fake_mode(fake_mode: torch._subclasses.FakeTensorMode, value: Any) -> Any:
    if isinstance(value, torch._subclasses.FakeTensor) and value.fake_mode is not fake_mode:
        return fake_mode.from_tensor(value, static_shapes=True)
    return value


def _compile_eager(
    gm: fx.GraphModule, example_inputs: Sequence[Any], joint_pass: MemsavePass, partitioner: MemsavePartitioner
) -> Callable[..., Any]:
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.backends.debugging import boxed_nop

    def partition(joint_module: fx.GraphModule, joint_inputs: Any, **kwargs: Any):
        joint_pass(joint_module.graph)
        joint_module.recompile()
        return partitioner(joint_module, joint_inputs, **kwargs)

    return aot_autograd(
        fw_compiler=boxed_nop,
        bw_compiler=boxed_nop,
        partition_fn=partition,
        keep_inference_input_mutations=True,
    )(gm, example_inputs)


def backend(**config: Any) -> MemsaveBackend:
    """A memsave backend with the given `MemsaveConfig` options, for `torch.compile(backend=...)`."""
    return MemsaveBackend(MemsaveConfig(**config))


# The entry point target: `torch.compile(model, backend="memsave")` finds it by name.
memsave_backend = MemsaveBackend()
