import pytest
import torch


@pytest.fixture(autouse=True)
def fresh_dynamo():
    # Every test compiles new modules; without a reset Dynamo's recompile limit would
    # silently send later tests to eager.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def traced_joint_graphs():
    # A graph served from AOTAutograd's cache skips the joint pass, and with it the record
    # of what the pass did, which tests inspect; inductor's own caches stay on.
    with torch._functorch.config.patch(enable_autograd_cache=False):
        yield
