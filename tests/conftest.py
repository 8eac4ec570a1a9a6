import os

import torch

# Without a GPU, Triton kernels run under its interpreter. Triton reads this when its kernels are decorated, so it
# must be set before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_model():
    """tiny_model(family) -> a cached tiny model (built once per test session; tests must not modify weights)."""
    from vlcache import testing

    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = testing.build(family)
        m = cache[family]
        m.set_attn_implementation("sdpa")
        return m

    return get
