import pytest
import torch
import torch.nn.functional as F
from torch import nn

from .layers import DTYPES, Scale, check_exact, converted, random_input, requires_grad_combinations

NORMS = {
    "batch_norm1d_flat": (nn.BatchNorm1d, (4, 6)),
    "batch_norm1d": (nn.BatchNorm1d, (4, 6, 5)),
    "batch_norm2d": (nn.BatchNorm2d, (4, 6, 5, 5)),
    "batch_norm3d": (nn.BatchNorm3d, (2, 6, 3, 4, 4)),
}


def eval_norm(norm_class, dtype, weight_grad, bias_grad, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    norm = norm_class(6, **kwargs)
    if norm.running_mean is not None:
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2.0)
    if norm.affine:
        norm.weight.data.normal_()
        norm.bias.data.normal_()
        norm.weight.requires_grad_(weight_grad)
        norm.bias.requires_grad_(bias_grad)
    return nn.Sequential(norm).to(dtype).eval()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("input_grad,weight_grad,bias_grad", requires_grad_combinations(3))
@pytest.mark.parametrize("name", NORMS)
def test_eval_batch_norm_keeps_input_only_for_weight_gradient(name, input_grad, weight_grad, bias_grad, dtype):
    norm_class, shape = NORMS[name]
    model = eval_norm(norm_class, dtype, weight_grad, bias_grad)
    x = random_input(*shape, dtype=dtype, requires_grad=input_grad)
    check_exact(model, [x], saves_less=not weight_grad)


@pytest.mark.parametrize("input_grad,weight_grad,bias_grad", requires_grad_combinations(3))
def test_eval_batch_norm_channels_last(input_grad, weight_grad, bias_grad):
    model = eval_norm(nn.BatchNorm2d, torch.float32, weight_grad, bias_grad)
    x = random_input(4, 6, 5, 5, dtype=torch.float32, requires_grad=False).to(memory_format=torch.channels_last)
    check_exact(model, [x.requires_grad_(input_grad)], saves_less=not weight_grad)


def test_eval_batch_norm_without_affine():
    model = nn.Sequential(Scale(6, 2), *eval_norm(nn.BatchNorm2d, torch.float32, False, False, affine=False))
    check_exact(model, [random_input(4, 6, 5, 5, dtype=torch.float32, requires_grad=False)], saves_less=True)


@pytest.mark.parametrize("track_running_stats", [True, False])
def test_train_mode_and_batch_statistics_are_pytorchs_own(track_running_stats):
    # Batch statistics need the input for every gradient; running statistics still update.
    model = eval_norm(nn.BatchNorm2d, torch.float32, True, False, track_running_stats=track_running_stats).train()
    x = random_input(4, 6, 5, 5, dtype=torch.float32, requires_grad=True)
    check_exact(model, [x], saves_less=False)
    if not track_running_stats:
        check_exact(model.eval(), [x], saves_less=False)


def test_running_statistics_update_like_pytorch():
    model = eval_norm(nn.BatchNorm2d, torch.float32, True, True).train()
    model[0].momentum = None  # the cumulative average, which reads num_batches_tracked
    reference, ours = eval_norm(nn.BatchNorm2d, torch.float32, True, True).train(), converted(model)
    reference[0].momentum = None
    for seed in range(3):
        x = random_input(4, 6, 5, 5, dtype=torch.float32, requires_grad=False, seed=seed)
        reference(x), ours(x)
    assert torch.equal(reference[0].running_mean, model[0].running_mean)
    assert torch.equal(reference[0].num_batches_tracked, model[0].num_batches_tracked)


class FunctionalBatchNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6))
        self.bias = nn.Parameter(torch.randn(6))
        self.register_buffer("mean", torch.randn(6))
        self.register_buffer("var", torch.rand(6) + 0.5)

    def forward(self, x):
        return F.batch_norm(x, self.mean, self.var, self.weight, self.bias, False, 0.1, 1e-3)


@pytest.mark.parametrize("weight_grad", [True, False])
def test_batch_norm_function(weight_grad):
    model = FunctionalBatchNorm()
    model.weight.requires_grad_(weight_grad)
    check_exact(model, [random_input(4, 6, 5, 5, dtype=torch.float32, requires_grad=True)], saves_less=not weight_grad)
