"""The memory plan: what memsave keeps for backward, against stock compilation, before anything runs.

`plan(model, *args)` compiles a copy of the model whose parameters and inputs are fake tensors,
through the backend's own path with code generation switched off, once with memsave's passes
and once without (the baseline). It reads the partitioned graphs the two runs produced:
`memsave_fx.memory` says what each keeps and allocates; the joint-graph rewrites say why.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import json
import re
import types
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
from torch import nn

from .analysis import SAVED_AS, SOURCE, Decision, InputKind, display_name
from . import _compat
from .backend import MemsaveBackend
from .config import environment_variable
from .measure import is_sharded
from .memory import (
    SavedStorage,
    Timeline,
    allocation_nbytes,
    is_parameter_or_buffer,
    memory_timeline,
    saved_storages,
    size_hint,
    storage_base,
)
from .record import CompiledGraph

if TYPE_CHECKING:
    from os import PathLike

__all__ = ["MemoryPlan", "SavedTensor", "plan"]


@dataclasses.dataclass(frozen=True)
class SavedTensor:
    """One tensor stock compilation or memsave keeps for backward (one storage)."""

    name: str  # the forward value ("relu_3"), or the input it is ("args[0]", "conv.weight (channels-last copy)")
    module: str  # the module that computed it ("layer2.0.conv1"; "" for the model itself)
    op: str  # the op that produced it ("relu"), or "input", "parameter", "buffer"
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int  # what memsave keeps for it: 0 when dropped
    decision: Decision
    reason: str
    baseline_nbytes: int  # what stock compilation keeps for it
    graph: int = 0  # which compiled graph (graph breaks give several)


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Saved and peak bytes of one training step, memsave against the baseline (stock compilation).

    Peak bytes are estimates: parameters, buffers, inputs, saved tensors, gradients and every
    intermediate alive at each op of the partitioned graphs, with Inductor's pointwise fusion.
    """

    saved_bytes: int
    baseline_saved_bytes: int
    peak_bytes: int
    baseline_peak_bytes: int
    tensors: tuple[SavedTensor, ...]  # largest first, by what stock compilation keeps
    parameter_bytes: int  # parameters and buffers
    input_bytes: int
    gradient_bytes: int
    timeline: Timeline  # total bytes alive after each op
    baseline_timeline: Timeline
    baseline: str  # what the baseline compiles with
    graphs: int
    # memsave options set by MEMSAVE_<OPTION> variables: "share_norms=True (MEMSAVE_SHARE_NORMS)"
    options_from_environment: tuple[str, ...] = ()

    @classmethod
    def from_graphs(cls, memsave: Sequence[CompiledGraph], baseline: Sequence[CompiledGraph]) -> MemoryPlan:
        """Combine the traced graphs of a model (in execution order): the forwards run in
        order, then the backwards in reverse, each holding what the others keep meanwhile."""
        if len(memsave) != len(baseline) or any(g.forward is None for g in (*memsave, *baseline)):
            raise ValueError("a plan needs a traced forward graph, with and without memsave, per compiled graph")
        tensors = [t for i, (m, b) in enumerate(zip(memsave, baseline)) for t in _saved_tensors(m, b, i)]
        # Largest first, by what stock compilation keeps: what memsave changed comes first.
        tensors.sort(key=lambda t: (-t.baseline_nbytes, -t.nbytes))
        config = memsave[0].config
        fuses_pointwise = config.compiler == "inductor"
        timelines = [memory_timeline(g.forward, g.backward, fuses_pointwise=fuses_pointwise) for g in memsave]
        baseline_timelines = [memory_timeline(g.forward, g.backward, fuses_pointwise=fuses_pointwise) for g in baseline]
        parameter_bytes, input_bytes = _input_bytes(memsave)
        resident = parameter_bytes + input_bytes
        timeline, baseline_timeline = _stack(timelines, resident), _stack(baseline_timelines, resident)
        return cls(
            saved_bytes=sum(t.nbytes for t in tensors),
            baseline_saved_bytes=sum(t.baseline_nbytes for t in tensors),
            peak_bytes=timeline.peak,
            baseline_peak_bytes=baseline_timeline.peak,
            tensors=tuple(tensors),
            parameter_bytes=parameter_bytes,
            input_bytes=input_bytes,
            gradient_bytes=sum(_gradient_bytes(g) for g in memsave),
            timeline=timeline,
            baseline_timeline=baseline_timeline,
            baseline="stock Inductor" if fuses_pointwise else "AOTAutograd's min-cut partition (compiler='eager')",
            graphs=len(memsave),
            options_from_environment=tuple(
                f"{name}={getattr(config, name)!r} ({environment_variable(name)})" for name in config.from_environment
            ),
        )

    def by_module(self) -> dict[str, tuple[int, int]]:
        """Saved bytes per module: (memsave, baseline), largest baseline first."""
        totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for tensor in self.tensors:
            totals[tensor.module][0] += tensor.nbytes
            totals[tensor.module][1] += tensor.baseline_nbytes
        ordered = sorted(totals.items(), key=lambda item: (-item[1][1], -item[1][0], item[0]))
        return {module: (kept, baseline) for module, (kept, baseline) in ordered}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_dict(self) -> dict[str, Any]:
        tensors = [
            {
                **dataclasses.asdict(t),
                "shape": list(t.shape),
                "dtype": str(t.dtype).removeprefix("torch."),
                "decision": t.decision.value,
            }
            for t in self.tensors
        ]
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {
            **fields,
            "tensors": tensors,
            "timeline": dataclasses.asdict(self.timeline),
            "baseline_timeline": dataclasses.asdict(self.baseline_timeline),
        }

    def __str__(self) -> str:
        return self.table()

    def table(self, largest: int = 10) -> str:
        """The plan as text: totals, saved bytes by module, and the `largest` tensors."""
        lines = [
            f"memsave memory plan ({self.graphs} graph{'s' * (self.graphs != 1)}; baseline: {self.baseline})",
            f"{'':24}{'baseline':>12}{'memsave':>12}{'ratio':>8}",
            _row("saved for backward", self.baseline_saved_bytes, self.saved_bytes),
            _row("peak (estimated)", self.baseline_peak_bytes, self.peak_bytes),
            f"{'parameters + buffers':24}{_format_bytes(self.parameter_bytes):>12}",
            f"{'inputs':24}{_format_bytes(self.input_bytes):>12}",
            f"{'gradients':24}{_format_bytes(self.gradient_bytes):>12}",
            "",
            "saved for backward, by module:",
        ]
        if self.options_from_environment:
            lines.insert(1, f"options from the environment: {', '.join(self.options_from_environment)}")
        by_module = {_display_name(module) or "(model)": totals for module, totals in self.by_module().items()}
        # Names in full, up to a width where the table would wrap; cut from the left beyond.
        width = min(_MODULE_WIDTH, max(map(len, by_module), default=0)) + 2
        lines.append(f"  {'module':{width}}{'baseline':>12}{'memsave':>12}{'ratio':>8}")
        for module, (kept, baseline) in by_module.items():
            lines.append("  " + _row(module, baseline, kept, width=width))
        lines += ["", f"largest saved tensors ({min(largest, len(self.tensors))} of {len(self.tensors)}):"]
        ordered = sorted(self.tensors, key=lambda t: -max(t.baseline_nbytes, t.nbytes))[:largest]
        columns = [
            ("name", [_display_name(t.name) for t in ordered], 44),
            ("module", [_display_name(t.module) or "(model)" for t in ordered], _MODULE_WIDTH),
            ("op", [t.op for t in ordered], 20),
            ("shape", ["x".join(map(str, t.shape)) or "scalar" for t in ordered], 20),
            ("dtype", [str(t.dtype).removeprefix("torch.") for t in ordered], 9),
        ]
        widths = [min(cap, max(len(title), *map(len, cells))) + 2 for title, cells, cap in columns]
        header = "".join(f"{title:{w}}" for (title, _, _), w in zip(columns, widths))
        lines.append(f"  {header}{'baseline':>11}{'memsave':>11}  decision: reason")
        for i, t in enumerate(ordered):
            cells = "".join(
                f"{_clip(column[i], w - 2, from_left=title in ('name', 'module')):{w}}"
                for (title, column, _), w in zip(columns, widths)
            )
            lines.append(
                f"  {cells}{_format_bytes(t.baseline_nbytes):>11}{_format_bytes(t.nbytes):>11}  "
                f"{t.decision.value}: {t.reason}"
            )
        return "\n".join(lines)

    def plot(self, path: str | PathLike[str], modules: int = 12) -> None:
        """Write a PNG: live memory over the step, baseline against memsave, and saved bytes
        of the `modules` largest modules. Needs matplotlib (`pip install memsave_fx[plot]`)."""
        try:
            from matplotlib.figure import Figure
        except ImportError as error:
            raise ImportError("MemoryPlan.plot needs matplotlib: pip install 'memsave_fx[plot]'") from error

        figure = Figure(figsize=(13, 5), layout="constrained")
        over_time, per_module = figure.subplots(1, 2, width_ratios=[3, 2])
        highest = 0
        for timeline, label, color in (
            (self.baseline_timeline, f"baseline ({self.baseline})", "tab:gray"),
            (self.timeline, "memsave", "tab:blue"),
        ):
            x, y = _step_axis(timeline)
            mib = [b / 2**20 for b in y]
            over_time.plot(x, mib, label=f"{label}: peak {_format_bytes(max(y, default=0))}", color=color)
            if y:
                peak = max(range(len(y)), key=y.__getitem__)
                over_time.plot([x[peak]], [mib[peak]], marker="o", color=color)
                highest = max(highest, mib[peak])
        over_time.axvline(1.0, color="black", linewidth=0.8, linestyle=":")
        over_time.set_xticks([0, 0.5, 1, 1.5, 2], ["start", "forward", "", "backward", "end"])
        # The two runs' graphs hold different ops, so one x is not one op in both: say so.
        over_time.set_xlabel("each run's own ops, in order: forward scaled to 0..1, backward to 1..2 (compare peaks, not points)")
        over_time.set_ylabel("live memory (MiB, estimated)")
        over_time.set_title("memory over one training step")
        over_time.set_ylim(0, 1.25 * highest or 1)
        over_time.legend(loc="upper right")

        top = list(self.by_module().items())[:modules]
        names = [_clip(_display_name(module), 40, from_left=True) or "(model)" for module, _ in top][::-1]
        rows = range(len(names))
        baseline = [b / 2**20 for _, (_, b) in top][::-1]
        kept = [k / 2**20 for _, (k, _) in top][::-1]
        per_module.barh([r + 0.2 for r in rows], baseline, height=0.4, color="tab:gray", label="baseline")
        per_module.barh([r - 0.2 for r in rows], kept, height=0.4, color="tab:blue", label="memsave")
        per_module.set_yticks(list(rows), names, fontsize=8)
        per_module.set_xlabel("saved for backward (MiB)")
        per_module.set_title(f"saved bytes, {len(top)} largest modules")
        per_module.legend(loc="lower right")
        figure.savefig(path, dpi=120)


def plan(model: nn.Module, *args: Any, options: dict[str, Any] | None = None, **kwargs: Any) -> MemoryPlan:
    """What `torch.compile(model, backend="memsave", options=options)` keeps for backward in a
    step on `model(*args, **kwargs)`, against stock compilation, computed on fake tensors.

    Nothing runs on real data: the parameters and inputs are replaced by fake tensors of the
    same shape, dtype, device and `requires_grad`. Meta-device tensors are planned as CPU tensors.

    For a `DistributedDataParallel` model, pass one rank's batch: the plan is of what each rank
    keeps, with the graphs split where DDP's gradient buckets end, as compiling DDP does.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"plan takes an nn.Module, got {type(model).__name__}")
    _refuse_sharded(model)
    backend = MemsaveBackend(generate_code=False)  # takes `options` through torch.compile, as compiling does
    backend.resolve(None, options)  # bad options fail here, not wrapped in Dynamo's compile error
    compile_backend: Callable[..., Any] = backend
    if isinstance(model, nn.parallel.DistributedDataParallel):
        # The options go to the backend itself: the DDP optimizer passes none on.
        model, compile_backend = model.module, _as_ddp_compiles(model, functools.partial(backend, options=options))
        options = None
    # Tensors the model creates itself (caches, masks) are faked as they meet the mode.
    fake_mode = _compat.FakeTensorMode(allow_non_fake_inputs=True)
    fake = functools.partial(_fake, fake_mode)
    fake_model = _fake_copy(model, fake)
    fake_args, fake_kwargs = _compat.pytree.tree_map_only(torch.Tensor, fake, (args, kwargs))
    # Static: a plan is for these shapes and values. Automatic dynamism would carry over from
    # earlier plans (Dynamo keys it by code location) and turn, say, a module's float eps
    # into a tensor input whose value a fake tensor cannot give.
    compiled = torch.compile(_fresh_copy(_call), backend=compile_backend, options=options, dynamic=False, **_ISOLATED)
    # A cache hit would skip the passes and the partitioner, which record the graphs.
    with fake_mode, _compat.autograd_cache_disabled():
        compiled(fake_model, fake_args, fake_kwargs)
    if not backend.compiled:
        raise RuntimeError(f"torch.compile captured no graph from {type(model).__name__}: there is nothing to plan")
    baseline = [graph.retrace(False) for graph in backend.compiled]
    return MemoryPlan.from_graphs(backend.compiled, baseline)


def _refuse_sharded(model: nn.Module) -> None:
    if any(is_sharded(p) for p in model.parameters()):
        raise TypeError(
            "plan cannot copy a model with sharded (DTensor) parameters, as FSDP2's fully_shard "
            "and tensor parallelism make them; plan the model before sharding it, with one "
            "rank's batch: under FSDP2 each rank computes with the gathered parameters"
        )


def _as_ddp_compiles(ddp: nn.parallel.DistributedDataParallel, compile_fn: Callable[..., Any]) -> Callable[..., Any]:
    """`compile_fn` as compiling DDP applies it. DDP runs its module on each rank's batch; under
    Dynamo's DDP optimizer (the default) each graph is split where DDP's gradient buckets end and
    the pieces are compiled one by one, which changes what is saved: a value crossing a split
    is an output of one piece."""
    if _compat.get_optimize_ddp_mode() != "ddp_optimizer":
        return compile_fn
    return _compat.DDPOptimizer(ddp.bucket_bytes_cap, compile_fn).compile_fn


def _call(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return model(*args, **kwargs)


def _fresh_copy(function: types.FunctionType) -> types.FunctionType:
    """`function` with a code object of its own. Dynamo keeps what it compiled on code
    objects; a plan's entries then die with the copy instead of filling the recompile limit
    of the code the user compiles."""
    return types.FunctionType(function.__code__.replace(), function.__globals__, function.__name__)


# The model's own frames (after a graph break) keep entries too: a region of their own keeps
# them out of the user's recompile limit (torch >= 2.13).
_ISOLATED = {"isolate_recompiles": True} if "isolate_recompiles" in inspect.signature(torch.compile).parameters else {}


def _fake(fake_mode: _compat.FakeTensorMode, tensor: torch.Tensor) -> torch.Tensor:
    """A fake tensor like `tensor`. Meta tensors become CPU tensors: the meta device has no
    kernels to choose between (attention, convolution layouts), so its plan would be no one's."""
    if tensor.device.type != "meta":
        return fake_mode.from_tensor(tensor)
    with fake_mode:
        cpu = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device="cpu")
    return cpu.requires_grad_(tensor.requires_grad)


def _fake_copy(model: nn.Module, fake: Callable[[torch.Tensor], torch.Tensor]) -> nn.Module:
    """A deep copy of `model` whose tensors are fake; the real ones are never copied."""
    memo: dict[int, Any] = {}
    for module in model.modules():
        for parameter in module._parameters.values():
            if parameter is not None and id(parameter) not in memo:
                memo[id(parameter)] = nn.Parameter(fake(parameter), parameter.requires_grad)
        for value in (*module._buffers.values(), *vars(module).values()):
            if isinstance(value, torch.Tensor) and id(value) not in memo:
                memo[id(value)] = fake(value)
    return copy.deepcopy(model, memo)


def _saved_tensors(memsave: CompiledGraph, baseline: CompiledGraph, graph: int) -> list[SavedTensor]:
    """One row per storage either run keeps, matched by the value it holds."""
    if memsave.backward is None:
        return []
    kept = {_identity(s): s for s in saved_storages(memsave.forward)}
    stock = {_identity(s): s for s in saved_storages(baseline.forward)} if baseline.backward is not None else {}
    memsave_nodes = {node.name: node for node in memsave.forward.graph.nodes}
    why_released = _release_reasons(memsave)
    recomputed = {node.name for node in memsave.backward.graph.nodes}
    readers = _ReadersOf(memsave)
    rows = []
    for identity in [*stock, *(i for i in kept if i not in stock)]:
        ours, theirs = kept.get(identity), stock.get(identity)
        name, layout_copy = identity
        marked = next((n.meta[SAVED_AS] for n in ours.saved if SAVED_AS in n.meta), None) if ours else None
        if ours is None:
            decision, reason = Decision.DROPPED, why_released.get(name) or _why_dropped(name, recomputed)
        elif marked is not None:
            decision, reason = marked.decision, marked.reason
        else:
            decision, reason = Decision.KEPT, readers.describe(ours)
        if theirs is None:
            reason += " (stock compilation does not keep it)"
        # Described as the value it holds: a stand-in's original, a copy's source.
        node = theirs.base if theirs else memsave_nodes.get(name, ours.base)
        value = node.meta["val"]
        rows.append(
            SavedTensor(
                name=f"{display_name(node)} (channels-last copy)" if layout_copy else display_name(node),
                module=_module_path(node),
                op=_op_name(node),
                shape=tuple(size_hint(d) for d in value.shape),
                dtype=value.dtype,
                nbytes=ours.nbytes if ours else 0,
                decision=decision,
                reason=reason,
                baseline_nbytes=theirs.nbytes if theirs else 0,
                graph=graph,
            )
        )
    return rows


def _identity(storage: SavedStorage) -> tuple[str, bool]:
    """What a storage holds, comparable across the two runs: the node name, or for a stand-in
    the name of the value it stands in for."""
    for node in storage.saved:
        if SAVED_AS in node.meta:
            return node.meta[SAVED_AS].original, False
    return storage.base.name, storage.layout_copy


def _release_reasons(graph: CompiledGraph) -> dict[str, str]:
    reasons: dict[str, str] = {}
    for rewrite in graph.rewrites or ():
        if rewrite.applied:
            for name in (*rewrite.released, rewrite.node):
                reasons.setdefault(name, rewrite.reason)
    return reasons


def _why_dropped(name: str, backward_names: set[str]) -> str:
    if name in backward_names:
        return "recomputed in backward: the partitioner found it cheaper than keeping it"
    return "no longer read by the backward"


class _ReadersOf:
    """Which backward ops read a saved storage, and for which requested gradients."""

    _SHOWN = 2  # gradient names spelled out; the rest are counted
    _SEARCHED = 400  # backward nodes visited looking for the nearest gradients

    def __init__(self, graph: CompiledGraph) -> None:
        self.backward = graph.backward.graph
        self.placeholders = {n.name: n for n in self.backward.find_nodes(op="placeholder")}
        output = self.backward.output_node()
        descs = output.meta.get(_compat.OUTPUT_DESCRIPTORS) or [None] * len(output.args[0])
        self.gradient_of: dict[fx.Node, str] = {}
        for value, desc in zip(output.args[0], descs):
            index = getattr(getattr(desc, "grad_of", None), "idx", None)
            if isinstance(value, fx.Node) and index is not None and index < len(graph.inputs):
                self.gradient_of.setdefault(value, graph.inputs[index].name)
        # How many requested gradients each backward node feeds, as bit sets over the outputs.
        bit = {node: 1 << i for i, node in enumerate(self.gradient_of)}
        self.feeds: dict[fx.Node, int] = {}
        for node in reversed(self.backward.nodes):
            self.feeds[node] = bit.get(node, 0)
            for user in node.users:
                self.feeds[node] |= self.feeds[user]

    def describe(self, storage: SavedStorage) -> str:
        received = [self.placeholders[n.name] for n in storage.saved if n.name in self.placeholders]
        readers = sorted({_short_op(user) for node in received for user in _through_views(node)})
        feeds = 0
        for node in received:
            feeds |= self.feeds.get(node, 0)
        count = feeds.bit_count()
        if not readers:
            return "passed to the backward, which does not read it"
        nearest = self._nearest_gradients(received)
        names = ", ".join(nearest)
        if count > len(nearest):
            names += f" and {count - len(nearest)} more"
        target = f"the gradient of {names}" if count == 1 else f"the gradients of {names}"
        return f"read by {', '.join(readers)} for {target}" if count else f"read by {', '.join(readers)}"

    def _nearest_gradients(self, start: list[fx.Node]) -> list[str]:
        found: list[str] = []
        queue, seen = deque(start), set(start)
        while queue and len(found) < self._SHOWN and len(seen) < self._SEARCHED:
            node = queue.popleft()
            name = self.gradient_of.get(node)
            if name is not None and name not in found:
                found.append(name)
            for user in node.users:
                if user not in seen:
                    seen.add(user)
                    queue.append(user)
        return found


def _through_views(node: fx.Node) -> list[fx.Node]:
    """The users of `node` that read its data, looking through views and getitems."""
    readers = []
    for user in node.users:
        if user.op == "call_function" and storage_base(user) is not user:
            readers += _through_views(user)
        else:
            readers.append(user)
    return readers


def _op_name(node: fx.Node) -> str:
    if node.op == "placeholder":
        source = node.meta.get(SOURCE)
        return source.kind.value if source is not None else InputKind.INPUT.value
    return _short_op(node)


def _short_op(node: fx.Node) -> str:
    if node.op != "call_function":
        return node.op
    packet = getattr(node.target, "overloadpacket", None)
    return getattr(packet, "__name__", None) or getattr(node.target, "__name__", str(node.target))


def _module_path(node: fx.Node) -> str:
    """The innermost module that computed `node` ("layer1.0.conv1"), from `nn_module_stack`;
    a parameter's module from its name; "" for the model's own inputs and top level."""
    source = node.meta.get(SOURCE)
    if source is not None:
        return source.name.rpartition(".")[0] if source.kind is not InputKind.INPUT else ""
    queue, seen = deque([node]), {node}
    while queue:  # nodes created by decompositions may lack the stack: ask their inputs
        current = queue.popleft()
        stack = current.meta.get("nn_module_stack") or current.meta.get("fwd_nn_module_stack")
        if stack:
            path, _ = list(stack.values())[-1]
            return _clean_module_path(path)
        for source_node in current.all_input_nodes:
            if source_node not in seen and source_node.op != "placeholder":
                seen.add(source_node)
                queue.append(source_node)
    return ""


def _clean_module_path(path: str) -> str:
    """Dynamo's "L['self'].layer1[0]._modules['conv1']" as "layer1.0.conv1"; modules reached
    through `__dict__['_modules']` (peft's wrappers) the same way."""
    path = re.sub(r"^L\['\w+'\]", "", path)
    path = path.replace(".__dict__['_modules']", "._modules")
    path = re.sub(r"(?:\._modules)?\['([^']+)'\]|\[(\d+)\]", lambda m: "." + (m.group(1) or m.group(2)), path)
    return path.strip(".")


def _input_bytes(graphs: Sequence[CompiledGraph]) -> tuple[int, int]:
    """Bytes of parameters and buffers (each once across graphs), and of the other inputs."""
    parameters: dict[str, int] = {}
    inputs = 0
    for graph in graphs:
        for node in graph.forward.graph.find_nodes(op="placeholder"):
            value = node.meta.get("val")
            if not isinstance(value, torch.Tensor):
                continue
            nbytes = size_hint(value.untyped_storage().nbytes())
            if is_parameter_or_buffer(node):
                parameters[node.meta[SOURCE].name] = nbytes
            else:
                inputs += nbytes
    return sum(parameters.values()), inputs


def _gradient_bytes(graph: CompiledGraph) -> int:
    if graph.backward is None:
        return 0
    gradients = graph.backward.graph.output_node().all_input_nodes
    return sum(allocation_nbytes(g) for g in {storage_base(n) for n in gradients})


def _stack(timelines: list[Timeline], resident: int) -> Timeline:
    """The step's timeline: forwards in order, then backwards in reverse, each on top of the
    inputs and of what the other graphs hold at that time."""
    held_after_forward = [t.forward[-1] if t.forward else 0 for t in timelines]
    held_after_backward = [t.backward[-1] if t.backward else h for t, h in zip(timelines, held_after_forward)]
    forward: list[int] = []
    for i, t in enumerate(timelines):
        below = resident + sum(held_after_forward[:i])
        forward += [below + b for b in t.forward]
    backward: list[int] = []
    for i in reversed(range(len(timelines))):
        below = resident + sum(held_after_forward[:i]) + sum(held_after_backward[i + 1 :])
        backward += [below + b for b in timelines[i].backward]
    return Timeline(tuple(forward), tuple(backward))


def _step_axis(timeline: Timeline) -> tuple[list[float], list[int]]:
    """Forward ops spread over [0, 1], backward ops over [1, 2]."""
    x = [i / max(len(timeline.forward), 1) for i in range(len(timeline.forward))]
    x += [1 + i / max(len(timeline.backward), 1) for i in range(len(timeline.backward))]
    return x, [*timeline.forward, *timeline.backward]


def _row(label: str, baseline: int, kept: int, width: int = 24) -> str:
    ratio = f"{kept / baseline:.2f}x" if baseline else "-"
    return f"{_clip(label, width - 2, from_left=True):{width}}{_format_bytes(baseline):>12}{_format_bytes(kept):>12}{ratio:>8}"


def _format_bytes(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


# The wrappers peft puts around a model (PeftModel.base_model, LoraModel.model): every name
# starts with them, so they tell nothing apart.
_WRAPPER_PREFIXES = ("base_model.model.",)
_MODULE_WIDTH = 60  # the widest module name the tables show in full


def _display_name(name: str) -> str:
    """A module or parameter name as the tables show it: without peft's wrapper prefix."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.removeprefix(prefix)
    return name


def _clip(text: str, width: int, *, from_left: bool = False) -> str:
    """`text` cut to `width` characters, at its end or, `from_left`, at its start: the end of a
    dotted name tells it from its neighbours ("…layers.0.mlp.down_proj")."""
    if len(text) <= width:
        return text
    return "…" + text[len(text) - width + 1 :] if from_left else text[: width - 1] + "…"


