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


def _mend_triton_interpreter() -> None:
    """Triton's interpreter before 3.7 (torch 2.11 ships 3.6) turns a loop bound into an int with int() of a
    one-element array, which numpy 2.4 refuses, so every kernel with a `range(start, end)` over loaded values fails
    on the CPU (triton-lang/triton#9171, fixed upstream by squeezing first). The same fix here, for the tests only:
    natively compiled kernels never take this path."""
    import inspect

    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or len(inspect.signature(original).parameters) != 2:
        return  # a layout this mend was not written for: leave it alone
    try:
        if "data.squeeze()" in inspect.getsource(original):
            return  # already fixed
    except OSError:  # no source to read: leave it alone
        return

    def mended(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = mended


if os.environ.get("TRITON_INTERPRET") == "1":
    _mend_triton_interpreter()


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
