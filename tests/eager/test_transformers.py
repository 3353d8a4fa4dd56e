"""Real models: transformers ResNet and ConvNeXt, which symbolic_trace cannot trace whole."""

import pytest

from benchmarks.workloads import convnext_bitfit, resnet_bitfit, resnet_stem

from .layers import check_exact

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:memsave_fx.convert could not trace")]


def test_resnet_with_only_the_stem_trainable_keeps_under_045_of_eager():
    model, inputs, _ = resnet_stem(batch=4, size=64)  # BN in eval mode throughout
    saved, eager_saved = check_exact(model, inputs, saves_less=True)
    assert saved <= 0.45 * eager_saved, f"{saved} vs eager {eager_saved}"


@pytest.mark.parametrize("workload", [resnet_bitfit, convnext_bitfit], ids=["resnet_bitfit", "convnext_bitfit"])
def test_bitfit_gradients_match_eager_exactly(workload):
    model, inputs, _ = workload(batch=2, size=64)
    check_exact(model, inputs, saves_less=True)
