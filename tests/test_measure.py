"""`saved_activation_bytes` counts what autograd keeps for backward, parameters left out."""

import torch
from torch import nn

from memsave_fx import saved_activation_bytes


class GathersItsWeight(nn.Module):
    """Swaps a new weight in for the call, as FSDP2 swaps in gathered parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sharded = self.weight
        self.weight = nn.Parameter(sharded.detach().clone())
        try:
            return torch.tanh(x @ self.weight)  # saves x, the weight and tanh's output
        finally:
            self.weight = sharded


def test_each_storage_counts_once_and_parameters_do_not():
    model = nn.Linear(4, 4)
    x = torch.randn(8, 4, requires_grad=True)
    _, saved = saved_activation_bytes(lambda t: torch.sigmoid(model(t)) * t[0], x)
    # Without `exclude`, a function's parameters count: x, the weight (as its transpose), the
    # sigmoid's output and its product's operands.
    _, saved_without_weights = saved_activation_bytes(lambda t: torch.sigmoid(model(t)) * t[0], x, exclude=[*model.parameters()])
    assert saved - saved_without_weights == model.weight.nbytes
    _, module_saved = saved_activation_bytes(model, x)
    assert module_saved == x.nbytes  # only the input: the weight is the module's own


def test_parameters_swapped_in_during_the_call_do_not_count():
    model = GathersItsWeight()
    x = torch.randn(8, 4, requires_grad=True)
    _, saved = saved_activation_bytes(model, x)
    assert saved == 2 * x.nbytes  # x and tanh's output
