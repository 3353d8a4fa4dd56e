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


# The longest modules (minutes each on 2 cores with a cold compile cache), started first: test
# modules run whole on one worker each (--dist loadscope), and one started last would run alone.
LONGEST_FIRST = (
    "test_partition.py", "test_fuzz.py", "test_pooled_training.py", "test_resnet.py", "test_gpu_benchmark.py",
    "test_modes.py", "test_huggingface.py", "test_plan.py", "test_examples.py", "test_share_normalized_output.py",
)  # fmt: skip


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within each module stays
