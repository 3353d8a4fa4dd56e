"""Which calls the eager rewrite replaces, and with what.

Each replacement takes the arguments of the call it replaces, so a `call_function` or
`call_method` node only changes its target. A module's replacement takes the module first: it
reads the module's parameters, buffers and `training` flag at every call, as the module would.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import activations, batch_norm, convolution, dropout, max_pool

FUNCTIONS: dict[Callable[..., object], Callable[..., object]] = {
    F.conv1d: convolution.conv,
    F.conv2d: convolution.conv,
    F.conv3d: convolution.conv,
    F.conv_transpose1d: convolution.conv_transpose,
    F.conv_transpose2d: convolution.conv_transpose,
    F.conv_transpose3d: convolution.conv_transpose,
    F.batch_norm: batch_norm.batch_norm,
    F.relu: activations.relu,
    torch.relu: activations.relu,
    torch.relu_: activations.relu_,
    F.relu6: activations.relu6,
    F.leaky_relu: activations.leaky_relu,
    F.hardtanh: activations.hardtanh,
    F.threshold: activations.threshold,
    torch.threshold: activations.threshold,
    F.max_pool1d: max_pool.max_pool1d,
    F.max_pool2d: max_pool.max_pool2d,
    F.max_pool3d: max_pool.max_pool3d,
    F.max_pool1d_with_indices: max_pool.max_pool1d,
    F.max_pool2d_with_indices: max_pool.max_pool2d,
    F.max_pool3d_with_indices: max_pool.max_pool3d,
    torch.max_pool1d: max_pool.max_pool1d,
    torch.max_pool2d: max_pool.max_pool2d,
    torch.max_pool3d: max_pool.max_pool3d,
    F.dropout: dropout.dropout,
}

METHODS: dict[str, Callable[..., object]] = {
    "relu": activations.relu,
    "relu_": activations.relu_,
}

# By the torch class whose `forward` the module must still use: a subclass that overrides it
# computes something else, and is left alone.
MODULES: dict[type[nn.Module], Callable[..., object]] = {
    nn.Conv1d: convolution.call_conv_module,
    nn.Conv2d: convolution.call_conv_module,
    nn.Conv3d: convolution.call_conv_module,
    nn.ConvTranspose1d: convolution.call_conv_transpose_module,
    nn.ConvTranspose2d: convolution.call_conv_transpose_module,
    nn.ConvTranspose3d: convolution.call_conv_transpose_module,
    nn.BatchNorm1d: batch_norm.call_batch_norm_module,
    nn.BatchNorm2d: batch_norm.call_batch_norm_module,
    nn.BatchNorm3d: batch_norm.call_batch_norm_module,
    nn.ReLU: activations.call_relu_module,
    nn.LeakyReLU: activations.call_leaky_relu_module,
    nn.Hardtanh: activations.call_hardtanh_module,  # and nn.ReLU6, which inherits its forward
    nn.Threshold: activations.call_threshold_module,
    nn.MaxPool1d: max_pool.call_max_pool_module,
    nn.MaxPool2d: max_pool.call_max_pool_module,
    nn.MaxPool3d: max_pool.call_max_pool_module,
    nn.Dropout: dropout.call_dropout_module,
}
