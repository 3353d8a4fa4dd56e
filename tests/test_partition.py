import copy

import pytest
import torch
import torch.fx as fx
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

import memsave_fx
from memsave_fx import partition
from memsave_fx.backend import MemsaveBackend
from memsave_fx.analysis import CONVERTED_FOR_CONVOLUTION
from memsave_fx.partition import draw_seeds_first

from .utils import assert_grads_match, saved_bytes_of


def frozen_relu_net():
    # The frozen convs stop the backward from reading the ReLU outputs: masks are saved.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    model[2].requires_grad_(False)
    model[4].weight.requires_grad_(False)
    return model, [torch.randn(2, 3, 16, 16)]


def saved_dtypes(model, inputs, backend):
    dtypes = []

    def pack(tensor):
        dtypes.append(tensor.dtype)
        return tensor

    with saved_tensors_hooks(pack, lambda tensor: tensor):
        torch.compile(model, backend=backend)(*inputs)
    return dtypes


def test_saved_masks_cross_as_bits():
    model, inputs = frozen_relu_net()
    backend = memsave_fx.backend()
    dtypes = saved_dtypes(model, inputs, backend)
    assert torch.uint8 in dtypes and torch.bool not in dtypes
    assert backend.compiled[0].packed_masks == 2


def test_exact_compression_off_keeps_bool_masks():
    model, inputs = frozen_relu_net()
    backend = memsave_fx.backend(exact_compression=False)
    assert torch.bool in saved_dtypes(model, inputs, backend)
    assert backend.compiled[0].packed_masks == 0


def test_gradients_match_eager():
    model, inputs = frozen_relu_net()
    assert_grads_match(model, inputs, memsave_fx.backend())


def test_bytes_take_no_more_memory_than_bools():
    model, inputs = frozen_relu_net()
    assert saved_bytes_of(model, inputs, memsave_fx.backend()) < saved_bytes_of(model, inputs, "inductor")


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_odd_sizes_layouts_and_dtypes(dtype, channels_last):
    # 2 x 8 x 5 x 7 = 560 mask bits after the first conv: 70 bytes; 3 x 5 = 15 per channel later.
    model, _ = frozen_relu_net()
    model = model.to(dtype)
    x = torch.randn(2, 3, 9, 11, dtype=dtype)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    assert_grads_match(model, [x.requires_grad_()], memsave_fx.backend())


# --- every saved pattern that packs, against stock Inductor --------------------------------


class Clamp(nn.Module):
    def forward(self, x):
        return torch.clamp(x, -0.5, 0.5)


class Comparison(nn.Module):
    def forward(self, x):
        return torch.where(x > 0.3, x, 0.5 * x)


PATTERNS = {
    "relu": lambda: nn.ReLU(),
    "threshold": lambda: nn.Threshold(0.1, -1.0),
    "leaky_relu": lambda: nn.LeakyReLU(0.2),
    "hardtanh": lambda: nn.Hardtanh(-0.5, 0.5),
    "clamp": Clamp,
    "comparison": Comparison,
    "dropout": lambda: nn.Dropout(0.3),
    "max_pool_3x3": lambda: nn.MaxPool2d(3, 2, 1),
    "max_pool_2x2": lambda: nn.MaxPool2d(2),
}


def frozen_conv_after(*layers: nn.Module) -> nn.Sequential:
    """A trainable conv, then each layer followed by a conv with a frozen weight: what the
    layers save is read only through masks or offsets, never as the frozen convs' inputs."""
    torch.manual_seed(0)
    modules: list[nn.Module] = [nn.Conv2d(3, 3, 3)]
    for layer in layers:
        frozen = nn.Conv2d(3, 3, 1)
        frozen.weight.requires_grad_(False)
        modules += [layer, frozen]
    return nn.Sequential(*modules)


def assert_packed_and_exact(model: nn.Module, x: torch.Tensor) -> None:
    backend = memsave_fx.backend()
    dtypes: list[torch.dtype] = []

    def compiled_recording_saved_dtypes(model: nn.Module):
        compiled = torch.compile(model, backend=backend)

        def step(*inputs: torch.Tensor) -> torch.Tensor:
            with saved_tensors_hooks(lambda t: dtypes.append(t.dtype) or t, lambda t: t):
                return compiled(*inputs)

        return step

    # Random draws match Inductor's: both compile the same forward random ops.
    assert_grads_match(model, [x.requires_grad_()], backend, reference="inductor", prepare=compiled_recording_saved_dtypes)
    assert backend.compiled[0].packed_masks >= 1
    assert dtypes and torch.bool not in dtypes and torch.int8 not in dtypes, dtypes


@pytest.mark.parametrize("pattern", PATTERNS)
def test_each_pattern_is_packed_with_inductors_gradients(pattern):
    # 1 x 3 x 9 x 9 after the first conv: 243 elements, not a multiple of 8.
    model = frozen_conv_after(PATTERNS[pattern]())
    assert_packed_and_exact(model, torch.randn(1, 3, 11, 11))


@pytest.mark.slow
# Each pattern alone is checked in float32 above, and a mask in every dtype and layout in
# test_odd_sizes_layouts_and_dtypes: here all patterns together at the two extremes.
@pytest.mark.parametrize(("dtype", "channels_last"), [(torch.bfloat16, True), (torch.float64, False)], ids=str)
def test_all_patterns_in_narrow_and_wide_dtypes_and_layouts(dtype, channels_last):
    model = frozen_conv_after(*(make() for make in PATTERNS.values())).to(dtype)
    x = torch.randn(1, 3, 23, 23, dtype=dtype)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    assert_packed_and_exact(model, x)


def test_offsets_of_windows_over_16_stay_int8():
    model = frozen_conv_after(nn.MaxPool2d(5, 2, 2))
    dtypes = saved_dtypes(model, [torch.randn(1, 3, 13, 13, requires_grad=True)], memsave_fx.backend())
    assert torch.int8 in dtypes


def test_masks_are_packed_where_computed():
    """A mask packed only at the end of the forward would keep the full-width mask, and the
    values it is computed from, alive through the rest of the forward: the plan's peak then
    rose above stock Inductor's on BERT."""
    torch.manual_seed(0)
    layers = []
    for _ in range(4):
        layers += [nn.Linear(64, 64), nn.Dropout(0.2), nn.ReLU()]
    model = nn.Sequential(*layers)
    x = torch.randn(256, 64, requires_grad=True)
    plan = memsave_fx.plan(model, x)
    assert plan.saved_bytes < plan.baseline_saved_bytes
    assert plan.peak_bytes <= plan.baseline_peak_bytes, str(plan)


@pytest.mark.skipif(torch._inductor.config.force_disable_caches, reason="Inductor's caches are switched off")
def test_inductor_can_cache_what_memsave_compiles():
    # The partitioner goes into Inductor's cache key; a key that cannot be pickled (a record
    # holding fake tensors) makes Inductor bypass its cache and recompile every time.
    model, inputs = frozen_relu_net()
    backend = memsave_fx.backend()
    torch._dynamo.utils.counters.clear()
    torch.compile(model, backend=backend)(*inputs).sum().backward()
    counters = torch._dynamo.utils.counters["inductor"]
    assert counters["fxgraph_cache_bypass"] == 0
    assert counters["fxgraph_cache_miss"] + counters["fxgraph_cache_hit"] == 2  # forward and backward
    assert backend.compiled[0].packed_masks == 2  # the record still records


STORE_CODES = torch.ops.prims.inductor_force_stride_order.default  # how packing and unpacking store bytes


def graphs_for_inductor(model, inputs):
    """The record of the forward and backward graphs memsave hands Inductor."""
    backend = MemsaveBackend(generate_code=False)
    torch.compile(model, backend=backend)(*inputs)
    return backend.compiled[0]


def test_masks_are_unpacked_where_first_read():
    """Unpacked codes are a buffer of their own: unpacked together at the start of the backward,
    every mask would stay alive at a byte per element until read."""
    model, inputs = frozen_relu_net()
    graph = graphs_for_inductor(model, inputs).backward.graph
    order = {node: i for i, node in enumerate(graph.nodes)}
    unpacked = graph.find_nodes(op="call_function", target=STORE_CODES)
    assert len(unpacked) == 2
    for stored in unpacked:
        chain = [stored]
        while len(chain[-1].users) == 1 and next(iter(chain[-1].users)).meta.get("memsave_unpack"):
            chain.append(next(iter(chain[-1].users)))
        first_read = min(order[user] for user in chain[-1].users)
        assert not any(order[stored] < order[other] < first_read for other in unpacked if other is not stored)


def test_masks_are_computed_before_the_next_convolution():
    """The partitioner appends a ReLU's mask, moved from the backward, to the end of the forward:
    computed there, the ReLU's input stays alive to the end, and Inductor schedules the mask's
    kernels after everything else, in C++ functions of their own."""
    model, inputs = frozen_relu_net()
    graph = graphs_for_inductor(model, inputs).forward.graph
    stores = graph.find_nodes(op="call_function", target=STORE_CODES)
    order = {node: i for i, node in enumerate(graph.nodes)}
    convolutions = graph.find_nodes(op="call_function", target=torch.ops.aten.convolution.default)
    assert len(stores) == 2
    for stored in stores:
        relu = stored
        while relu.target is not torch.ops.aten.relu.default:
            relu = relu.args[0]
        assert not any(order[relu] < order[conv] < order[stored] for conv in convolutions)


@pytest.mark.parametrize("layout_optimization", [True, False], ids=["channels_last", "contiguous"])
def test_masks_are_stored_in_the_layout_stock_inductor_saves_them_in(layout_optimization):
    """Where Inductor runs convolutions channels-last, it saves a mask computed from their
    outputs channels-last too (seen unpacked, with exact compression off). Stored in the fake
    value's contiguous order instead, the codes took a transposing store of their own, in a
    kernel of its own."""
    model, inputs = frozen_relu_net()
    saved_layouts = []

    def record_layout(tensor):
        if tensor.dtype == torch.bool:
            saved_layouts.append(tensor.is_contiguous(memory_format=torch.channels_last))
        return tensor

    packed_forwards = []
    pack = partition.pack_saved_masks

    def pack_saved_masks(forward, backward, **kwargs):
        packed_forwards.append(forward)
        return pack(forward, backward, **kwargs)

    with torch._inductor.config.patch(layout_optimization=layout_optimization):
        with pytest.MonkeyPatch.context() as patch:  # the graphs Inductor generates code for
            patch.setattr(partition, "pack_saved_masks", pack_saved_masks)
            torch.compile(copy.deepcopy(model), backend=memsave_fx.backend())(*inputs)
        (forward,) = packed_forwards
        stores = forward.graph.find_nodes(op="call_function", target=STORE_CODES)
        with saved_tensors_hooks(record_layout, lambda tensor: tensor):
            torch.compile(copy.deepcopy(model), backend=memsave_fx.backend(exact_compression=False))(*inputs)
        assert_grads_match(model, inputs, memsave_fx.backend())
    assert len(stores) == 2 and saved_layouts == [layout_optimization] * 2
    for stored in stores:
        value = stored.meta["val"]
        assert value.is_contiguous(memory_format=torch.channels_last) is layout_optimization
        assert value.is_contiguous() is not layout_optimization


def test_graphs_run_without_code_generation_keep_their_fake_layouts():
    """A graph kept for a plan runs as it is, in the layouts its nodes' metadata was computed
    for. Masks stored channels-last there made their readers channels-last: a later view of
    a max-pool's output failed, and the gradients went wrong (found by the fuzz test)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.ConvTranspose2d(3, 8, 1), nn.LeakyReLU(), nn.Dropout(0.3), nn.ConvTranspose2d(8, 8, 1, groups=2),
        nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 3 * 3, 4),
    )  # fmt: skip
    for layer in model[3:]:
        layer.requires_grad_(False)
    with torch._inductor.config.patch(layout_optimization=True, fallback_random=True):
        assert_grads_match(model, [torch.randn(2, 3, 6, 6)], MemsaveBackend(generate_code=False))


def test_random_seeds_are_drawn_first():
    """Where the partitioner leaves it, mid-forward, Inductor's seed draw is an extern call
    that splits the C++ kernel around it."""
    model = frozen_conv_after(nn.ReLU(), nn.Dropout(0.3))
    graph = graphs_for_inductor(model, [torch.randn(1, 3, 11, 11, requires_grad=True)]).forward.graph
    first_op = next(node for node in graph.nodes if node.op != "placeholder")
    assert first_op.target is torch.ops.prims.inductor_seeds.default


def test_seeds_stay_where_another_op_draws_from_the_generator():
    def graph_with(*draws):
        graph = fx.Graph()
        x = graph.placeholder("x")
        nodes = [graph.call_function(torch.ops.aten.relu.default, (x,))]
        nodes += [graph.call_function(target, args) for target, args in draws]
        graph.output(tuple(nodes))
        return graph

    seeds = (torch.ops.prims.inductor_seeds.default, (1, torch.device("cpu")))
    alone = graph_with(seeds)
    assert draw_seeds_first(alone)
    assert [node.target for node in alone.nodes][1] is torch.ops.prims.inductor_seeds.default
    with_rand = graph_with(seeds, (torch.ops.aten.rand.default, ([2],)))
    before = list(with_rand.nodes)
    assert not draw_seeds_first(with_rand) and list(with_rand.nodes) == before


class ResidualBlock(nn.Module):
    """A 3x3 main path beside a 1x1 shortcut, whose convolution backwards both read the
    gradient of their sum."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.main = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.shortcut = nn.Conv2d(4, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.main(x) + self.shortcut(x))


@pytest.mark.parametrize("weights_train", [True, False], ids=["weights_train", "weights_frozen"])
def test_a_convolution_converting_its_weight_runs_ahead_of_an_independent_one(weights_train):
    """The channels-last copy of a flat-saved weight is made just before the library call that
    reads it: a convolution backward, or for a frozen weight the transposed convolution giving
    its input gradient. Right after the shortcut's call, the copy alone was a C++ kernel; ahead
    of it, the copy joins the kernel computing the gradient both read."""
    model, inputs = ResidualBlock(), [torch.randn(2, 4, 8, 8, requires_grad=not weights_train)]
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(weights_train or name.endswith("bias"))
    with torch._inductor.config.patch(layout_optimization=True):
        graph = graphs_for_inductor(model, inputs).backward.graph
        assert_grads_match(model, inputs, memsave_fx.backend())
    convolutions = (torch.ops.aten.convolution.default, torch.ops.aten.convolution_backward.default)
    library_calls = [n for n in graph.nodes if n.target in convolutions]
    weight_index = {convolutions[0]: 1, convolutions[1]: 2}
    converting = [n for n in library_calls if n.args[weight_index[n.target]].meta.get(CONVERTED_FOR_CONVOLUTION)]
    assert len(library_calls) == 3 and len(converting) == 2  # the 1x1 weight is channels-last already
    for call in converting:
        earlier = library_calls[: library_calls.index(call)]
        assert all(_depends_on(call, other) for other in earlier)


def _depends_on(node: fx.Node, other: fx.Node) -> bool:
    pending, seen = [node], set()
    while pending:
        for dependency in pending.pop().all_input_nodes:
            if dependency is other:
                return True
            if dependency not in seen:
                seen.add(dependency)
                pending.append(dependency)
    return False


def test_a_dropout_mask_is_drawn_once():
    """The dropout's multiplication reads the mask's stored codes. Computed again in its own
    kernel, the mask's random values were realized as a float buffer read by both."""
    model = frozen_conv_after(nn.Dropout(0.3), nn.Dropout(0.3))
    graph = graphs_for_inductor(model, [torch.randn(1, 3, 11, 11, requires_grad=True)]).forward.graph
    masks = graph.find_nodes(op="call_function", target=torch.ops.aten.gt.Scalar)
    assert len(masks) == 2
    for mask in masks:
        (as_float,) = mask.users  # on its way to bytes, and nothing else
        (as_bytes,) = as_float.users
        assert [user.target for user in as_bytes.users] == [STORE_CODES]
