"""memsave_fx without torch.compile: a converted model, and a joint graph you traced yourself.

    python examples/eager.py
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

import memsave_fx

# 1. convert(model): the same model, keeping less for backward in plain eager mode.
model = nn.Sequential(
    nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
    nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.Dropout(0.1),
    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
)  # fmt: skip
model.eval()  # batch norm on running statistics, as when fine-tuning
model[1:].requires_grad_(False)  # only the stem conv trains
model[-1].requires_grad_(True)  # ... and the head
optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)

converted = memsave_fx.convert(model)  # shares the model's parameters: the optimizer still works
x = torch.randn(16, 3, 64, 64)
_, eager_saved = memsave_fx.saved_activation_bytes(model, x)
out, saved = memsave_fx.saved_activation_bytes(converted, x)
F.cross_entropy(out, torch.randint(0, 10, (16,))).backward()
optimizer.step()
print(f"convert: {saved / 2**20:.2f} MiB kept for backward, eager PyTorch {eager_saved / 2**20:.2f} MiB")


# 2. rewrite(gm) on a joint forward/backward graph: the backend's passes, for a step you trace.
# The layout is AOTAutograd's: inputs (primals, tangents); outputs, then one gradient per primal.
conv = nn.Conv2d(3, 8, 3).requires_grad_(False)
bias = torch.zeros(8, requires_grad=True)


def train_step(primals, tangents):
    x, weight, bias = primals
    out = F.relu(F.conv2d(x, weight, bias))
    (grad_bias,) = torch.autograd.grad(out, [bias], tangents)
    return out, None, None, grad_bias


primals = [torch.randn(4, 3, 16, 16), conv.weight, bias]
tangents = [torch.randn(4, 8, 14, 14)]
joint = make_fx(train_step)(primals, tangents)
rewritten = memsave_fx.rewrite(joint)
for record in rewritten.meta["memsave_rewrites"]:
    print("rewrite:", record.reason)
torch.testing.assert_close(rewritten(primals, tangents)[3], joint(primals, tangents)[3])
