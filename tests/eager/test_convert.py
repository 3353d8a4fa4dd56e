import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import memsave_fx
from memsave_fx import saved_activation_bytes

from ..utils import assert_grads_match
from .layers import check_exact, converted, random_input


def frozen_backbone() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.Dropout(0.2),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 5),
    )  # fmt: skip
    model[1:8].requires_grad_(False)  # the stem conv and the head train
    return model


def test_frozen_backbone_saves_far_less_with_the_same_gradients():
    model = frozen_backbone().eval()
    model[7].train()  # dropout on, BN in eval
    saved, eager_saved = check_exact(model, [random_input(4, 3, 8, 8, dtype=torch.float32, requires_grad=False)], saves_less=True)
    assert saved <= 0.2 * eager_saved


def test_parameters_buffers_and_state_dict_stay_the_models():
    model = frozen_backbone()
    ours = memsave_fx.convert(model)
    assert list(ours.state_dict()) == list(model.state_dict())
    assert all(a is b for a, b in zip(ours.parameters(), model.parameters()))
    assert all(a is b for a, b in zip(ours.buffers(), model.buffers()))
    ours.load_state_dict(model.state_dict())


def test_an_existing_optimizer_keeps_working():
    model = frozen_backbone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ours = memsave_fx.convert(model)
    before = model[-1].weight.detach().clone()
    F.mse_loss(ours(torch.randn(2, 3, 8, 8)), torch.randn(2, 5)).backward()
    optimizer.step()
    assert not torch.equal(model[-1].weight, before)


def test_the_model_itself_is_not_modified():
    model = frozen_backbone()
    types = [type(m) for m in model.modules()]
    x = torch.randn(2, 3, 8, 8)
    _, eager_saved = saved_activation_bytes(model, x)
    memsave_fx.convert(model)
    assert [type(m) for m in model.modules()] == types
    assert saved_activation_bytes(model, x)[1] == eager_saved


def test_no_grad_and_train_eval_switches():
    model = frozen_backbone()
    ours = memsave_fx.convert(model)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.manual_seed(0)
        expected = model(x)
        torch.manual_seed(0)
        assert torch.equal(ours(x), expected)
    ours.eval()
    assert not ours.training and not any(m.training for m in model.children())  # shared layers
    assert torch.equal(ours(x), model(x))


class DataDependent(nn.Module):
    """symbolic_trace cannot follow `if x.sum() > 0`; its children are traceable."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3), nn.ReLU())
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = self.stem(x)
        if x.sum() > 0:
            x = self.body(x)
        return self.head(x.mean((2, 3)))


def test_untraceable_model_converts_its_traceable_parts_and_says_which_are_not():
    model = DataDependent()
    model.stem.requires_grad_(False)
    model.body[0].weight.requires_grad_(False)
    with pytest.warns(UserWarning, match=r"could not trace 1 module\(s\).*the model \(DataDependent: symbolically traced variables cannot be used as inputs to control flow\)"):
        ours = memsave_fx.convert(model)
    assert type(ours) is DataDependent and ours is not model
    assert isinstance(ours.stem, torch.fx.GraphModule) and isinstance(ours.body, torch.fx.GraphModule)
    assert type(model.stem) is nn.Sequential  # the caller's model keeps its children
    assert list(ours.state_dict()) == list(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        saved, eager_saved = check_exact(model, [random_input(2, 3, 10, 10, dtype=torch.float32, requires_grad=False)], saves_less=True)


class OptionalMask(nn.Module):
    """A forward with an optional argument, as transformers modules have many."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())

    def forward(self, x, mask=None):
        x = self.conv(x)
        return x if mask is None else x * mask


def test_optional_arguments_are_not_fixed_by_a_trace():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), OptionalMask())
    model[1].conv[0].requires_grad_(False)
    with pytest.warns(UserWarning, match=r"OptionalMask: its optional arguments \(mask\) may be None"):
        ours = memsave_fx.convert(model[1])
    assert isinstance(ours.conv, torch.fx.GraphModule)  # its own submodules still convert
    x, mask = torch.randn(2, 3, 6, 6), torch.rand(2, 4, 4, 4)
    torch.testing.assert_close(ours(x), model[1](x), rtol=0, atol=0)
    torch.testing.assert_close(ours(x, mask), model[1](x, mask), rtol=0, atol=0)


class ReadsDropoutRate(nn.Module):
    """Code that reads a layer's attributes, as transformers' attention reads `dropout.p`; the
    data-dependent branch keeps it from being traced, so its children convert one by one."""

    def __init__(self):
        super().__init__()
        self.dropout = nn.Dropout(0.25)
        self.relu = nn.ReLU()

    def forward(self, x):
        if x.sum() > 0:
            x = x * 2
        return self.relu(x) * (1 - self.dropout.p) + self.dropout(x)


def test_converted_layers_keep_their_class_and_attributes():
    model = ReadsDropoutRate()
    with pytest.warns(UserWarning, match="could not trace"):
        ours = memsave_fx.convert(model)
    assert type(ours.dropout) is nn.Dropout and ours.dropout.p == 0.25 and ours.dropout is not model.dropout
    assert type(ours.relu) is nn.ReLU and ours.relu is not model.relu
    ours.relu.register_forward_hook(lambda *args: None)
    assert not model.relu._forward_hooks  # the copy's hooks are its own
    x = torch.randn(4, 8)
    torch.manual_seed(0)
    want = model(x)
    torch.manual_seed(0)
    torch.testing.assert_close(ours(x), want, rtol=0, atol=0)
    assert saved_activation_bytes(ours, x.requires_grad_())[1] < saved_activation_bytes(model, x)[1]


def test_nothing_to_convert_returns_the_model():
    model = nn.Sequential(nn.Linear(3, 3), nn.GELU())
    assert memsave_fx.convert(model) is model


def test_rejects_what_is_not_a_module():
    with pytest.raises(TypeError, match="takes an nn.Module, got function"):
        memsave_fx.convert(lambda x: x)


def test_everything_kept_goes_through_save_for_backward():
    # saved_tensors_hooks see every saved tensor only if none is stashed on ctx.
    model = frozen_backbone().train()
    ours = converted(model)
    output = ours(torch.randn(2, 3, 8, 8))
    seen, stack = set(), [output.grad_fn]
    custom_nodes = 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__.endswith("Backward") and hasattr(node, "saved_tensors"):
            custom_nodes += 1
            assert not [k for k, v in vars(node).items() if isinstance(v, torch.Tensor)], type(node).__name__
        stack.extend(fn for fn, _ in node.next_functions)
    assert custom_nodes >= 5


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "memsave"])
def test_converted_model_compiles(backend):
    model = frozen_backbone()
    model[4].requires_grad_(True)
    x = random_input(2, 3, 8, 8, dtype=torch.float32, requires_grad=False)
    tolerance = 0.0 if backend == "eager" else None
    compiled_converted = lambda m: torch.compile(memsave_fx.convert(m), backend=backend, fullgraph=True)  # noqa: E731
    assert_grads_match(model, [x], None, prepare=compiled_converted, tolerance=tolerance)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda(dtype):
    model = frozen_backbone().cuda().to(dtype)
    model[7].train()
    x = random_input(4, 3, 8, 8, dtype=dtype, requires_grad=False).cuda()
    # cuDNN may choose other algorithms per call: equal up to rounding.
    saved, eager_saved = assert_grads_match(model, [x], None, prepare=converted)
    assert saved < eager_saved
