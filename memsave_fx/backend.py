"""The `memsave` torch.compile backend.

Dynamo's graph goes to Inductor's `compile_fx` (or, with `compiler="eager"`, to AOTAutograd
with no code generation). In both, `MemsavePass` runs on the joint forward/backward graph
before the partitioner chooses what to save, so the rewrites change what is kept.
The backend is registered only through the `torch_dynamo_backends` entry point.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx

from ._version import __version__
from .config import MemsaveConfig

if TYPE_CHECKING:
    from .joint_pass import MemsavePass
    from .passes import Rewrite

log = logging.getLogger(__name__)

_JOINT_PASS_OPTION = "joint_custom_pre_pass"
_PARTITIONER_OPTION = "custom_partitioner_fn"


@dataclasses.dataclass
class CompiledGraph:
    """What the backend did with one Dynamo graph (graph breaks give several)."""

    index: int
    config: MemsaveConfig
    num_nodes: int
    # None until AOTAutograd traces a joint graph; it stays None for a graph served from
    # AOTAutograd's cache, since the pass does not run then.
    rewrites: list[Rewrite] | None = None
    has_backward: bool = False
    packed_masks: int = 0  # boolean masks saved at 1 bit per element

    @property
    def released(self) -> list[str]:
        """Forward values the rewrites stopped the backward from reading."""
        return [name for r in self.rewrites or () if r.applied for name in r.released]


class MemsaveBackend:
    """A torch.compile backend; `compiled` lists what it compiled, one entry per graph."""

    def __init__(self, config: MemsaveConfig | None = None) -> None:
        self.config = config or MemsaveConfig()
        self.compiled: list[CompiledGraph] = []

    def __repr__(self) -> str:
        return f"MemsaveBackend({self.config!r})"

    def __call__(
        self,
        gm: fx.GraphModule,
        example_inputs: Sequence[Any],
        *,
        mode: str | None = None,
        options: dict[str, Any] | None = None,
    ) -> Callable[..., Any]:
        overrides, inductor_options = MemsaveConfig.split_options(options)
        config = dataclasses.replace(self.config, **overrides)
        _check_available(config)
        for reserved in (_JOINT_PASS_OPTION, _PARTITIONER_OPTION):
            if reserved in inductor_options:
                raise ValueError(
                    f"option {reserved!r} is reserved for memsave's own passes; "
                    f"valid memsave options: {', '.join(sorted(MemsaveConfig.option_names()))}"
                )
        if config.compiler == "eager" and (mode not in (None, "default") or inductor_options):
            raise ValueError(
                "compiler='eager' generates no code, so it takes no Inductor mode or "
                f"options; got mode={mode!r}, options={sorted(inductor_options)}"
            )
        record = CompiledGraph(len(self.compiled), config, len(gm.graph.nodes))
        self.compiled.append(record)
        # Imported here: Inductor's modules are heavy, and `import memsave_fx` stays lean.
        from .joint_pass import MemsavePass
        from .partition import MemsavePartitioner

        joint_pass = MemsavePass(config, record, _input_names(gm))
        if config.compiler == "eager":
            return _compile_eager(gm, example_inputs, joint_pass)
        # Inductor's own wrapper validates the remaining options and expands `mode`.
        inductor = torch._TorchCompileInductorWrapper(mode, inductor_options, dynamic=None)
        patches = {
            _JOINT_PASS_OPTION: joint_pass,
            _PARTITIONER_OPTION: MemsavePartitioner(config, joint_pass.uuid(), record),
        }
        return inductor(gm, example_inputs, config_patches=patches)


def _input_names(gm: fx.GraphModule) -> list[str]:
    """Readable names of the Dynamo graph's inputs: "layer1.0.conv1.weight", or the source."""
    names = []
    for node in gm.graph.find_nodes(op="placeholder"):
        source = getattr(node.meta.get("grapharg"), "source", None)
        source_name = source.name if source is not None else node.name
        if callable(source_name):  # a method, not a property, in some torch versions
            source_name = source_name()
        attributes = re.findall(r"_(?:modules|parameters|buffers)\['([^']+)'\]", source_name)
        # L['args'][0] -> args[0]: Dynamo's local-variable quoting says nothing to users.
        names.append(".".join(attributes) if attributes else re.sub(r"^L\['(\w+)'\]", r"\1", source_name))
    return names


def _compile_eager(
    gm: fx.GraphModule, example_inputs: Sequence[Any], joint_pass: MemsavePass
) -> Callable[..., Any]:
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.backends.debugging import boxed_nop
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    def partition(joint_module: fx.GraphModule, joint_inputs: Any, **kwargs: Any):
        joint_pass(joint_module.graph)
        joint_module.recompile()
        return min_cut_rematerialization_partition(joint_module, joint_inputs, **kwargs)

    return aot_autograd(
        fw_compiler=boxed_nop,
        bw_compiler=boxed_nop,
        partition_fn=partition,
        keep_inference_input_mutations=True,
    )(gm, example_inputs)


_NOT_YET_AVAILABLE = {
    "approx_activations": True,
    "share_norms": True,
}


def _check_available(config: MemsaveConfig) -> None:
    # Refuse rather than silently compile without a requested lossy or sharing pass.
    for name, value in _NOT_YET_AVAILABLE.items():
        if getattr(config, name) == value:
            raise NotImplementedError(f"memsave option {name}={value!r} is not available in memsave_fx {__version__}")
    if config.pool_activations != 1:
        raise NotImplementedError(
            f"memsave option pool_activations={config.pool_activations} is not available in "
            f"memsave_fx {__version__}; use 1"
        )


def backend(**config: Any) -> MemsaveBackend:
    """A memsave backend with the given `MemsaveConfig` options, for `torch.compile(backend=...)`."""
    return MemsaveBackend(MemsaveConfig(**config))


# The entry point target: `torch.compile(model, backend="memsave")` finds it by name.
memsave_backend = MemsaveBackend()
