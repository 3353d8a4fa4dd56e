"""The `memsave` torch.compile backend.

Dynamo's graph goes to Inductor's `compile_fx` (or, with `compiler="eager"`, to AOTAutograd
with no code generation). In both, `MemsavePass` runs on the joint forward/backward graph
before the partitioner chooses what to save, so the rewrites change what is kept.
The backend is registered only through the `torch_dynamo_backends` entry point.
"""

from __future__ import annotations

import difflib
import functools
import logging
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx

from . import _compat
from .analysis import GraphInput, InputKind
from .config import MemsaveConfig
from .record import CompiledGraph

if TYPE_CHECKING:
    from .joint_pass import MemsavePass
    from .partition import MemsavePartitioner
    from .plan import MemoryPlan

log = logging.getLogger(__name__)

_JOINT_PASS_OPTION = "joint_custom_pre_pass"
_PARTITIONER_OPTION = "custom_partitioner_fn"


class MemsaveBackend:
    """A torch.compile backend; `compiled` lists what it compiled, one entry per graph.

    `options` are memsave's (`MemsaveConfig`'s keys); each compile takes the options
    torch.compile passes, then these, then the `MEMSAVE_<OPTION>` environment variables as they
    are at that compile, then the defaults. With `generate_code=False` it only partitions: the
    compiled callables run the partitioned graphs as they are (on fake tensors, for
    `memsave_fx.plan`).
    """

    def __init__(self, options: MemsaveConfig | dict[str, Any] | None = None, *, generate_code: bool = True) -> None:
        if isinstance(options, MemsaveConfig):  # every option given: the environment is not read
            options = {name: getattr(options, name) for name in MemsaveConfig.option_names()}
        self.options = dict(options or {})
        # Bad options fail here, not at the first compile. The environment is read at each
        # compile: the shared "memsave" backend is made at import, which must not fail on it.
        MemsaveConfig.from_options(self.options, environ={})
        self.generate_code = generate_code
        self.compiled: list[CompiledGraph] = []

    @property
    def config(self) -> MemsaveConfig:
        """The options a compile given none of its own gets now."""
        return MemsaveConfig.from_options(self.options)

    def __repr__(self) -> str:
        return f"MemsaveBackend({self.options!r})"

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
        config, inductor_options = self.resolve(mode, options)
        inputs = graph_inputs(gm)
        record = CompiledGraph(len(self.compiled), config, len(gm.graph.nodes), inputs)
        retrace = _Retrace(gm, example_inputs, config, inputs, mode, inductor_options)
        cache_hits = _compat.autograd_cache_hits()
        compiled = _compile(
            gm, example_inputs, config, record, mode, inductor_options, rewrite=True, generate_code=self.generate_code
        )
        # The joint pass and the partitioner did not run: the record is re-derived when read.
        record.from_cache = _compat.autograd_cache_hits() > cache_hits
        # Listed once compiled: Dynamo may abandon a graph mid-compile and restart its analysis.
        self.compiled.append(record)
        return record.hold_retrace(retrace, compiled)

    def resolve(self, mode: str | None, options: dict[str, Any] | None) -> tuple[MemsaveConfig, dict[str, Any]]:
        """The memsave config and the Inductor options that a compile with `mode` and `options`
        gets now; a bad or misspelt option raises a ValueError naming the valid ones."""
        overrides, inductor_options = MemsaveConfig.split_options(options)
        config = MemsaveConfig.from_options({**self.options, **overrides})
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
        source = getattr(node.meta.get(_compat.DYNAMO_GRAPH_ARGUMENT), "source", None)
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
    inductor = _compat.inductor_compiler(mode, inductor_options)
    patches = {_JOINT_PASS_OPTION: joint_pass, _PARTITIONER_OPTION: partitioner}
    if generate_code:
        return _compat.compile_with_inductor(inductor, gm, example_inputs, patches)
    from .partition import keep_graph_without_codegen

    return _compat.compile_fx(
        gm,
        example_inputs,
        inner_compile=functools.partial(keep_graph_without_codegen, record),
        config_patches={**inductor.config, **patches},
    )


class _Retrace:
    """Partitions a Dynamo graph again without generating code, with memsave's rewrites or
    without them (stock). It holds the graph and its example inputs, the model's tensors:
    the compiled function holds it, and records reach it weakly."""

    def __init__(
        self,
        gm: fx.GraphModule,
        example_inputs: Sequence[Any],
        config: MemsaveConfig,
        inputs: tuple[GraphInput, ...],
        mode: str | None,
        inductor_options: dict[str, Any],
    ) -> None:
        self.gm, self.example_inputs = gm, list(example_inputs)
        self.config, self.inputs, self.mode, self.inductor_options = config, inputs, mode, inductor_options
        # Dynamo's fake mode, for a retrace outside Dynamo: under the DDP optimizer a split
        # piece's example inputs can mix its fake tensors with the caller's (a plan's).
        self.fake_mode = _compat.detect_fake_mode(example_inputs)

    def __call__(self, rewrite: bool) -> CompiledGraph:
        record = CompiledGraph(-1, self.config, len(self.gm.graph.nodes), self.inputs)
        example_inputs = self.example_inputs
        if self.fake_mode is not None:
            example_inputs = [_in_fake_mode(self.fake_mode, value) for value in example_inputs]
        with _compat.autograd_cache_disabled():  # a hit would skip the passes, which record
            _compile(
                self.gm, example_inputs, self.config, record, self.mode, self.inductor_options,
                rewrite=rewrite, generate_code=False,
            )  # fmt: skip
        return record


def _in_fake_mode(fake_mode: Any, value: Any) -> Any:
    if isinstance(value, _compat.FakeTensor) and value.fake_mode is not fake_mode:
        return fake_mode.from_tensor(value, static_shapes=True)
    return value


def _compile_eager(
    gm: fx.GraphModule, example_inputs: Sequence[Any], joint_pass: MemsavePass, partitioner: MemsavePartitioner
) -> Callable[..., Any]:
    def partition(joint_module: fx.GraphModule, joint_inputs: Any, **kwargs: Any):
        joint_pass(joint_module.graph)
        joint_module.recompile()
        return partitioner(joint_module, joint_inputs, **kwargs)

    return _compat.aot_autograd(
        fw_compiler=_compat.boxed_nop,
        bw_compiler=_compat.boxed_nop,
        partition_fn=partition,
        keep_inference_input_mutations=True,
    )(gm, example_inputs)


def backend(**options: Any) -> MemsaveBackend:
    """A memsave backend with the given `MemsaveConfig` options, for `torch.compile(backend=...)`;
    options not given come from `MEMSAVE_<OPTION>` environment variables where these are set."""
    return MemsaveBackend(options)


# The entry point target: `torch.compile(model, backend="memsave")` finds it by name.
memsave_backend = MemsaveBackend()
