"""Inductor's partitioner, followed by what only the partitioned graphs can decide.

The joint-graph passes decide what the backward may read; `min_cut_rematerialization_partition`
then decides what crosses from forward to backward. `pack_saved_masks` acts on that saved set
itself: values with a few possible codes cross packed into bytes. A boolean mask takes 1 bit
per element; a max-pool's argmax offsets within its window (int8 in Inductor's lowering) take
2 bits for a window of up to 4 elements and 4 bits for up to 16 (3x3).

The kernel that computes the codes stores them as bytes, in the layout stock Inductor would
store a saved mask in, and the forward's own readers of the codes (a dropout's multiplication)
read those bytes; a small kernel packs that buffer, read as one flat run, and dies with it. In
the backward a small kernel unpacks them into bytes again just before they are first read.
Packing and unpacking are int16 arithmetic (runs of codes shifted into place and summed; shifts
and a mask), which Inductor generates on CPU and GPU. Inductor's C++ backend does not vectorise
int16, so it emits those two kernels as plain loops, without the vectorisation analysis of each
load index that took most of the extra compile time of a small CNN. The codes
are written and read through float, which sidesteps Inductor's C++ bool path, which is slow
(measured here on 512k elements: a compare-and-store kernel took 3 ms writing bool, 0.06 ms
writing uint8 through float; a `where` took 1.06 ms reading bool, 0.06 ms reading uint8
through float).

The partitioner prices each value as it will cross, a mask at its packed size. Its cuts then
weigh a mask as what it costs, and `torch._functorch.config.activation_memory_budget` is a
fraction of what memsave keeps at budget 1 (packed), not of what stock compilation keeps.
"""

from __future__ import annotations

import contextlib
import logging
import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx

from . import _compat
from ._compat import CustomPartitionerFn, OutputCode
from .analysis import CODE_BITS, CONVERTED_FOR_CONVOLUTION, SAVED_AS, Decision, SavedAs
from .memory import mark_layout_copies
from .passes.base import insert_call
from .record import CompiledGraph

aten = torch.ops.aten
prims = torch.ops.prims
log = logging.getLogger(__name__)

_BYTE = 8
_CHANNELS_LAST_ORDER = (0, 2, 3, 1)  # an NCHW value's dims, outermost first in memory


class MemsavePartitioner(CustomPartitionerFn):
    """Inductor's `custom_partitioner_fn`: the min-cut partitioner, then `pack_saved_masks`.

    `pack_masks=False` leaves the min-cut partition as it is (stock compilation, or a compiler
    that does not fuse the packing arithmetic). `keep_graphs` records the graphs for a plan,
    marked with the copies Inductor's lowering makes, if `lowered_by_inductor` (Inductor's
    configuration applies only here).
    """

    def __init__(
        self,
        uuid: str,
        record: CompiledGraph | None = None,
        *,
        pack_masks: bool,
        keep_graphs: bool = False,
        lowered_by_inductor: bool = True,
    ) -> None:
        self._uuid = uuid
        self.record = record
        self.pack_masks = pack_masks
        self.keep_graphs = keep_graphs
        self.lowered_by_inductor = lowered_by_inductor

    def __call__(
        self, gm: fx.GraphModule, joint_inputs: Sequence[object], **kwargs: Any
    ) -> tuple[fx.GraphModule, fx.GraphModule]:
        # Priced as they will cross, so that the cut and the memory budget's knapsack weigh a
        # mask at its packed size, and the budget is a fraction of what memsave keeps.
        pricing = _compat.partitioner_sizes(_packed_size_of) if self.pack_masks else contextlib.nullcontext()
        with pricing:
            forward, backward = _compat.min_cut_rematerialization_partition(gm, joint_inputs, **kwargs)
        # Graphs kept for a plan run as they are, in the layouts of their fake metadata.
        generates_code = self.lowered_by_inductor and not self.keep_graphs
        packed = pack_saved_masks(forward, backward, in_inductors_layout=generates_code) if self.pack_masks else 0
        seeds_moved = draw_seeds_first(forward.graph)
        hoisted = hoist_converting_convolutions(backward.graph)
        if packed or seeds_moved:
            forward.recompile()
        if packed or hoisted:
            backward.recompile()
        if self.record is not None:
            self.record.add_packed_masks(packed)
            if self.keep_graphs and self.lowered_by_inductor:
                mark_layout_copies(forward)
                mark_layout_copies(backward)
            if self.keep_graphs:
                self.record.forward, self.record.backward = forward, backward
        return forward, backward

    def uuid(self) -> str:
        return f"{self._uuid} pack_masks={self.pack_masks}"

    def __deepcopy__(self, memo: dict[int, object]) -> MemsavePartitioner:
        # Inductor copies its configuration, this partitioner included; a copy would record elsewhere.
        return self

    def __getstate__(self) -> dict[str, object]:
        # Inductor pickles its configuration, this partitioner included, into its FX graph
        # cache key. What decides the partition goes in; the record, bookkeeping that holds
        # graphs and fake tensors (which cannot be pickled), does not.
        return {**vars(self), "record": None}


class GraphWithoutCodegen(OutputCode):
    """Inductor's compiled-graph interface over the graph itself, run as it is."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self._boxed_call = True

    def __call__(self, inputs: list[Any]) -> Any:
        arguments = list(inputs)
        inputs.clear()  # the boxed convention: the callee owns its inputs
        return self.gm(*arguments)

    def post_compile(self, *args: Any, **kwargs: Any) -> None:
        pass

    def set_triton_bundle(self, triton_bundle: Any) -> None:
        pass

    def prepare_for_serialization(self) -> None:
        raise NotImplementedError("a graph traced for a memory plan is not cached")


def keep_graph_without_codegen(
    record: CompiledGraph, gm: fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any
) -> GraphWithoutCodegen:
    """An `inner_compile` for `compile_fx` that generates no code. It keeps an inference graph;
    the partitioner keeps a training graph's forward and backward."""
    if kwargs.get("is_inference"):
        mark_layout_copies(gm)
        record.forward = gm
    return GraphWithoutCodegen(gm)


def pack_saved_masks(forward: fx.GraphModule, backward: fx.GraphModule, *, in_inductors_layout: bool) -> int:
    """Save every boolean mask and max-pool offset tensor the forward hands to the backward
    packed into bytes (see the module docstring); return how many were packed.

    `in_inductors_layout`: Inductor generates the graphs' code and lays out their values, so
    the codes may be stored in its layout (`_stored_order`). A graph run as it is computes in
    the layouts of its nodes' fake metadata, which the readers' metadata was computed for."""
    output = forward.graph.output_node()
    outputs = list(output.args[0])
    descs = output.meta.get(_compat.OUTPUT_DESCRIPTORS) or [None] * len(outputs)
    backward_inputs = {node.name: node for node in backward.graph.find_nodes(op="placeholder")}
    channels_last = _compat.channels_last_nodes(forward) if in_inductors_layout else set()
    packed_count = 0
    for position, (saved, desc) in enumerate(zip(outputs, descs)):
        if not isinstance(desc, _compat.SavedForBackwardsAOTOutput):
            continue
        code = _code_of(saved)
        received = backward_inputs.get(saved.name)
        if code is None or received is None or not received.users:
            continue
        bits, what = code
        _compute_early(saved)
        # Packed as soon as computed, so the full-width mask (and what it is computed from)
        # need not stay alive to the end of the forward.
        order = _stored_order(saved, channels_last)
        outputs[position] = _pack(forward.graph, saved, bits, order, before=saved.next)
        packing = f"{what} packed at {bits} bit{'s' * (bits > 1)} per element"
        earlier = saved.meta.get(SAVED_AS)  # a joint pass's stand-in keeps its decision
        outputs[position].meta[SAVED_AS] = (
            SavedAs(earlier.decision, earlier.original, f"{earlier.reason}, {packing}")
            if earlier is not None
            else SavedAs(Decision.COMPRESSED, saved.name, packing)
        )
        # Unpacked where first read: the unpacked codes are a buffer, alive from there on.
        first_reader = next(n for n in backward.graph.nodes if n in received.users)
        unpacked = _unpack(backward.graph, received, saved.meta["val"], bits, order, before=first_reader)
        received.replace_all_uses_with(unpacked, delete_user_cb=lambda user: user.meta.get("memsave_unpack") is None)
        packed_count += 1
    if packed_count:
        output.args = (tuple(outputs), *output.args[1:])
        log.debug("packed %d saved masks and offsets", packed_count)
    return packed_count


def draw_seeds_first(graph: fx.Graph) -> bool:
    """Move Inductor's seed draws (`inductor_seeds`, one per device, which every random op of
    the forward reads) to the start of the forward, where stock Inductor's scheduler puts them;
    return whether any moved. Left where the partitioner put them, among the forward's pointwise
    ops, each is an extern call that splits the C++ kernel around it: one more kernel to compile.
    Nothing moves where another op also draws from the generator: the order of draws decides
    their values."""
    draws = [node for node in graph.nodes if _draws_from_generator(node)]
    seeds = [node for node in draws if node.target is _compat.inductor_seeds]
    first_op = next(node for node in graph.nodes if node.op != "placeholder")
    if not seeds or len(seeds) < len(draws) or seeds == [first_op]:
        return False
    for node in seeds:
        first_op.prepend(node)
    return True


def hoist_converting_convolutions(graph: fx.Graph) -> int:
    """Move each convolution or convolution backward whose weight Inductor's lowering copies to
    channels-last (`CONVERTED_FOR_CONVOLUTION`) ahead of the library call just before it, where
    it does not depend on that call, with what it reads that is computed since and the outputs
    it unpacks; return how many moved.

    The C++ backend generates the pointwise ops between two library calls as one kernel. The
    copy is made just before the call that reads it; where that follows another library call
    directly (the two branches of a residual block), the copy alone was a kernel to compile.
    Moved ahead, it joins the kernel computing the gradient both read, as under stock Inductor,
    whose backward reads the channels-last copy saved by the forward. (A frozen weight's input
    gradient is a transposed convolution, `replace_frozen_convolution_backward`.)"""
    moved = 0
    for call in [node for node in graph.nodes if node.target in _LIBRARY_CALLS]:
        weight = call.args[2] if call.target is aten.convolution_backward.default else call.args[1]
        if not (isinstance(weight, fx.Node) and weight.meta.get(CONVERTED_FOR_CONVOLUTION)):
            continue
        nodes = list(graph.nodes)
        position = {node: i for i, node in enumerate(nodes)}
        call_before = next((n for n in reversed(nodes[: position[call]]) if n.target in _LIBRARY_CALLS), None)
        if call_before is None:
            continue
        since = _ancestors_from(call, position[call_before], position)
        if call_before in since or any(map(_draws_from_generator, since)):
            continue  # it depends on that call, or moving would reorder draws from the generator
        unpacked = [user for user in call.users if user.target is operator.getitem]
        for node in [*sorted(since, key=position.__getitem__), call, *unpacked]:
            call_before.prepend(node)
        moved += 1
    return moved


# Calls into a library, which end the kernel Inductor's C++ backend is generating.
_LIBRARY_CALLS = frozenset({aten.convolution.default, aten.convolution_backward.default})


def _ancestors_from(node: fx.Node, start: int, position: dict[fx.Node, int]) -> set[fx.Node]:
    """The nodes `node` depends on that sit at `start` or later."""
    found: set[fx.Node] = set()
    pending = [node]
    while pending:
        for dependency in pending.pop().all_input_nodes:
            if position[dependency] >= start and dependency not in found:
                found.add(dependency)
                pending.append(dependency)
    return found


def _draws_from_generator(node: fx.Node) -> bool:
    return isinstance(node.target, _compat.OpOverload) and torch.Tag.nondeterministic_seeded in node.target.tags


def _packed_size_of(node: fx.Node, size_of: Callable[[fx.Node], int]) -> int:
    """Bytes `node` takes across the partition once `pack_saved_masks` packs it."""
    code = _code_of(node)
    if code is None:
        return size_of(node)
    return -(-node.meta["val"].numel() * code[0] // _BYTE)


def _code_of(node: object) -> tuple[int, str] | None:
    """(bits per element, what it is) for a saved value with few enough codes to pack."""
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(value, torch.Tensor) or not all(isinstance(s, int) for s in value.shape):
        return None
    if node.meta.get(CODE_BITS) is not None:
        return node.meta[CODE_BITS], "codes"
    if value.dtype == torch.bool:
        return 1, "boolean mask"
    if value.dtype == torch.int8 and node.target is operator.getitem and node.args[1] == 1:
        pool = node.args[0]
        if getattr(pool, "target", None) is _compat.low_memory_max_pool_with_offsets:
            window = math.prod(pool.args[1])
            bits = next((b for b in (2, 4) if window <= 2**b), None)
            if bits is not None:
                return bits, f"max-pool offsets in a window of {window}"
    return None


def _pack(graph: fx.Graph, codes: fx.Node, bits: int, order: list[int], *, before: fx.Node) -> fx.Node:
    def call(target, *args, **kwargs):
        return insert_call(graph, target, args, kwargs, like=codes, before=before)

    value = codes.meta["val"]
    per_byte = _BYTE // bits
    # The kernel that computes the codes stores them as bytes, densely in `order`, and
    # packing reads that buffer as one flat run. Inlined into the codes' own kernel instead,
    # packing gave Inductor's C++ code generation a 4-d load index per code of each byte to
    # analyse for vectorisation; a flat run gives one-variable indices, and int16 none to analyse.
    as_float = call(prims.convert_element_type.default, codes, torch.float32)
    as_bytes = call(prims.convert_element_type.default, as_float, torch.uint8)
    stored = call(_compat.force_stride_order, as_bytes, _dense_strides(value.shape, order))
    # The forward's own readers (a dropout's multiplication) read the stored codes too: computed
    # once, not again in each reader's kernel (a dropout mask's random draw, into a float buffer).
    readers = [user for user in codes.users if user is not as_float and user.op != "output"]
    if readers:
        codes.replace_all_uses_with(_from_bytes(call, stored, value.dtype), delete_user_cb=readers.__contains__)
    in_memory_order = call(aten.permute.default, stored, order)
    if value.numel() % per_byte:
        flat = call(aten.reshape.default, in_memory_order, [value.numel()])
        in_memory_order = call(aten.constant_pad_nd.default, flat, [0, -value.numel() % per_byte], 0)
    # Byte j holds element j of run 0, of run 1, ...: every term reads a contiguous run. Run k
    # is shifted to bit bits*k, and the runs summed in groups of at most 4, then the groups:
    # Inductor unrolls a sum over fewer than `unroll_reductions_threshold` (8) elements into
    # pointwise adds, one plain loop, where a sum over all 8 runs would be a reduction kernel.
    group = min(per_byte, 4)
    shape = [per_byte // group, group, -1]
    runs = call(prims.convert_element_type.default, call(aten.reshape.default, in_memory_order, shape), torch.int16)
    positions = call(prims.iota.default, per_byte, start=0, step=bits, dtype=torch.int16, device=value.device, requires_grad=False)
    shifted = call(aten.bitwise_left_shift.Tensor, runs, call(aten.view.default, positions, [*shape[:2], 1]))
    in_groups = call(aten.sum.dim_IntList, shifted, [1], dtype=torch.int16)
    packed = call(aten.sum.dim_IntList, in_groups, [0], dtype=torch.int16)
    return call(prims.convert_element_type.default, packed, torch.uint8)


def _unpack(
    graph: fx.Graph, packed: fx.Node, like: torch.Tensor, bits: int, order: list[int], *, before: fx.Node
) -> fx.Node:
    per_byte = _BYTE // bits
    byte_count = -(-like.numel() // per_byte)
    with _compat.detect_fake_mode([packed.meta["val"]]):
        packed.meta["val"] = packed.meta["val"].new_empty([byte_count], dtype=torch.uint8)
    packed.meta.pop("tensor_meta", None)

    def call(target, *args, **kwargs):
        node = insert_call(graph, target, args, kwargs, like=before)
        node.meta["memsave_unpack"] = True
        return node

    as_int = call(prims.convert_element_type.default, packed, torch.int16)
    # Row k of (per_byte, bytes) is code k of each byte.
    positions = call(prims.iota.default, per_byte, start=0, step=bits, dtype=torch.int16, device=like.device, requires_grad=False)
    shifted = call(aten.bitwise_right_shift.Tensor, as_int, call(aten.view.default, positions, [per_byte, 1]))
    codes = call(aten.bitwise_and.Scalar, shifted, 2**bits - 1)
    # Unpacked in a two-variable kernel of its own, into bytes that the kernels reading the
    # codes then read, through views, as they read a saved mask under stock Inductor.
    stored = call(_compat.force_stride_order, call(prims.convert_element_type.default, codes, torch.uint8), [byte_count, 1])
    flat = call(aten.reshape.default, stored, [-1])
    if per_byte * byte_count != like.numel():  # the padding
        flat = call(aten.slice.Tensor, flat, 0, 0, like.numel())
    in_memory_order = call(aten.view.default, flat, [like.shape[d] for d in order])
    restored = call(aten.permute.default, in_memory_order, sorted(range(len(order)), key=order.__getitem__))
    return _from_bytes(call, restored, like.dtype)


def _from_bytes(call: Callable[..., fx.Node], codes: fx.Node, dtype: torch.dtype) -> fx.Node:
    """Codes stored as bytes, read as `dtype` through float, as they were written: Inductor's
    C++ bool path is slow."""
    as_float = call(prims.convert_element_type.default, codes, torch.float32)
    if dtype == torch.bool:
        return call(aten.ne.Scalar, as_float, 0.0)
    return call(prims.convert_element_type.default, as_float, dtype)


def _compute_early(node: fx.Node) -> None:
    """Move `node` up to just after the last of its inputs. The partitioner appends what it
    moves from the backward (a ReLU's mask, say) at the end of the forward; computed there,
    what it reads stays alive through the forward, and Inductor schedules it, with what it
    fuses with, after everything else."""
    if _draws_from_generator(node):
        return  # moving it would reorder what draws from the generator
    position = {n: i for i, n in enumerate(node.graph.nodes)}
    last_input = max(node.all_input_nodes, key=position.__getitem__, default=None)
    if last_input is not None and last_input.op != "placeholder" and last_input.next is not node:
        last_input.append(node)


def _stored_order(codes: fx.Node, channels_last: set[fx.Node]) -> list[int]:
    """The memory order to store saved `codes` in: channels-last for a 4-D boolean mask that
    Inductor lays out so (see `_compat.channels_last_nodes`), as it would store it unpacked;
    computed so from channels-last values, stored in the fake value's contiguous order it took
    a transposing kernel of its own. Otherwise the value's own order: max-pool offsets stored
    channels-last cost the backward's scatter an extra copy of its int64 indices."""
    value = codes.meta["val"]
    if codes in channels_last and value.dtype == torch.bool and value.dim() == 4:
        return list(_CHANNELS_LAST_ORDER)
    return _memory_order(value)


def _dense_strides(shape: Sequence[int], order: list[int]) -> list[int]:
    """The strides of a dense tensor of `shape` laid out in `order`, outermost dim first."""
    strides = [0] * len(shape)
    step = 1
    for d in reversed(order):
        strides[d] = step
        step *= shape[d]
    return strides


def _memory_order(value: torch.Tensor) -> list[int]:
    """The dims from outermost to innermost in memory (a permutation making `value` contiguous)."""
    return sorted(range(value.dim()), key=lambda d: (-value.stride(d), d))
