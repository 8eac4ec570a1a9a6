"""The README's Python blocks run as written, so they cannot rot.

Every ```python block runs, in order and in one namespace, as a reader pastes them one after another, in an empty
working directory; a block whose first line is `# not run here` is only compiled. Where the README shows what a
block prints (a plain ``` block right after it, introduced by "prints"), the output must be exactly that.
"""

import contextlib
import io
import re
import shutil
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
NOT_RUN = "# not run here"
BLOCK = re.compile(r"```python\n(.*?)```\n(?:\n(prints[^\n]*(?:\n[^\n`]+)*)\n\n```\n(.*?)```)?", re.S)


def _blocks() -> list[tuple[str, str | None]]:
    """(code, the output the README shows for it or None) for every python block, in order."""
    return [(m.group(1), m.group(3)) for m in BLOCK.finditer(README)]


def test_the_readme_has_the_blocks_this_test_expects():
    blocks = _blocks()
    assert len(blocks) == README.count("```python")  # the pattern saw every block
    runnable = [code for code, _ in blocks if not code.startswith(NOT_RUN)]
    assert len(runnable) >= 3 and any(shown for _, shown in blocks)
    assert blocks[0][0].startswith("import vlcache\n")  # the quickstart opens the section and stands alone
    for code, _ in blocks:
        compile(code, "README.md", "exec")  # a not-run block must at least be Python


def test_the_readme_python_blocks_run_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for i, (code, shown) in enumerate(_blocks()):
        if code.startswith(NOT_RUN):
            continue
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, f"README.md python block {i + 1}", "exec"), namespace)
        if shown is not None:
            assert out.getvalue() == shown, f"block {i + 1} printed:\n{out.getvalue()}"
    assert namespace["r"].last["reused"] == namespace["r"].last["images"] == 8  # the reuse block's second call


def test_the_real_checkpoint_block_runs_on_a_local_checkpoint(tmp_path, monkeypatch, capsys):
    """The block for a hub checkpoint, with the hub id swapped for a local copy of the embedded checkpoint and the
    video for a sample: `load_model` then takes the `from_pretrained` path a downloaded model takes."""
    import vlcache
    from vlcache.apps.evaluation.embedded_model import EMBEDDED_DIR

    block = next(code for code, _ in _blocks() if code.startswith(NOT_RUN) and "load_model(" in code)
    hub_id = re.search(r'load_model\("([^"]+)"\)', block).group(1)
    video = re.search(r'read_frames\("([^"]+)"', block).group(1)
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(EMBEDDED_DIR, checkpoint)
    code = block.replace(hub_id, str(checkpoint)).replace(video, str(vlcache.sample_videos()[0]))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(code, "README.md real-checkpoint block", "exec"), namespace)
    assert type(namespace["model"]).__name__ == "LlavaForConditionalGeneration"
    assert namespace["model"].name_or_path == str(checkpoint)  # loaded from the copy, not the shipped model
    assert "vlcache(vision=0.1, prune_at=2): kept" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["load_model", "sample_videos", "read_frames", "frames_inputs"])
def test_the_quickstart_helpers_are_public_names(name):
    import vlcache

    assert name in vlcache.__all__ and callable(getattr(vlcache, name))
