"""The tensor-drawn tasks used for GPU training match the PIL/processor path: the same inputs from the same pixels
and text (for both embedded models: the Llava's flat patches and the Qwen2-VL's merged ones), and answers that follow
from what the frames show under the rules of `tasks.make_example`."""

import numpy as np
import pytest
import torch

from vlcache.apps.evaluation.embedded_model import FAMILIES, batch_inputs, image_prompt
from vlcache.apps.evaluation.tasks import COLOR_KEYS, COLORS, GRID, PATCH, TASKS, make_example, prompt_text
from vlcache.apps.evaluation.tensor_tasks import draw_batch, encode, processor, qwen_patches


def encode_examples(examples, with_answer, family="llava"):
    pixels = torch.from_numpy(np.stack([np.stack([np.asarray(im) for im in e.frames]) for e in examples]))
    texts = [prompt_text(len(e.frames), e.question, image_prompt(processor(family))) for e in examples]
    return encode(pixels, texts, [e.answer for e in examples] if with_answer else None, family)


def decode(ids):
    return processor().tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("task", TASKS)
def test_encode_matches_processor(task, family):
    rng = np.random.default_rng(5)
    examples = [make_example(task, 4, rng) for _ in range(3)]
    for with_answer in (False, True):
        ref = batch_inputs(processor(family), examples, with_answer=with_answer)
        got = encode_examples(examples, with_answer=with_answer, family=family)
        assert set(got) == set(ref)
        for key in ref:
            if key == "pixel_values":
                torch.testing.assert_close(got[key], ref[key], atol=1e-5, rtol=0)
            else:
                assert torch.equal(got[key], ref[key]), key


def _objects(pixel_values, frames):
    """frame -> colour key of the object each frame shows, read back from normalised pixels."""
    images = processor().image_processor
    mean, std = torch.tensor(images.image_mean).view(3, 1, 1), torch.tensor(images.image_std).view(3, 1, 1)
    pix = ((pixel_values * std + mean) * 255).round().view(-1, frames, 3, GRID, PATCH, GRID, PATCH)
    patch_rgb = pix.mean((4, 6)).permute(0, 1, 3, 4, 2).reshape(pix.shape[0], frames, GRID * GRID, 3)
    palette = torch.tensor(list(COLORS.values()), dtype=torch.float)
    found = []
    for video in patch_rgb:
        objs = {}
        for f in range(frames):
            bright = (video[f].amax(-1) > 150).nonzero().flatten().tolist()  # noise stays below 70
            assert len(bright) <= 1
            if bright:
                objs[f] = COLOR_KEYS[int((palette - video[f, bright[0]]).abs().sum(-1).argmin())]
        found.append(objs)
    return found


@pytest.mark.parametrize("task", TASKS)
def test_draw_batch_answers_follow_frames(task):
    frames = 6
    g = torch.Generator().manual_seed(1)
    inputs, answers = draw_batch(task, frames, 64, g)
    assert inputs["input_ids"].shape[0] == 64 and inputs["pixel_values"].shape == (64 * frames, 3, 16, 16)
    scored = inputs["labels"] != -100
    assert all(decode(row[m]) == "=" + a for row, m, a in zip(inputs["input_ids"], scored, answers))
    counts = []
    for b, objs in enumerate(_objects(inputs["pixel_values"], frames)):
        text = decode(inputs["input_ids"][b])
        counts.append(len(objs))
        if task in ("needle", "where"):
            assert len(objs) == 1
            assert answers[b] == (next(iter(objs.values())) if task == "needle" else str(next(iter(objs))))
        elif task == "lookup":
            assert 2 <= len(objs) <= 4 and len(set(objs.values())) == len(objs)
            named = text.split("find ")[1][0]
            assert objs[int(answers[b])] == named
        elif task == "count":
            assert answers[b] == str(len(objs))
        else:
            assert len(objs) <= 4 and len(set(objs.values())) == len(objs)
            assert answers[b] == "".join(k if k in objs.values() else "." for k in COLOR_KEYS)
    if task in ("count", "describe"):  # the object count is drawn, not fixed
        assert len(set(counts)) >= 3


def test_draw_batch_rejects_bad_frames():
    with pytest.raises(ValueError, match="lookup"):
        draw_batch("lookup", 1, 2, torch.Generator())
    with pytest.raises(ValueError, match="unknown task"):
        draw_batch("nope", 4, 2, torch.Generator())


@pytest.mark.parametrize("task", ["needle", "lookup", "count", "describe"])
def test_draw_batch_colors_restrict_the_objects(task):
    """`colors` (training on confusable lookups) draws objects of those colours only, still distinct where the task
    needs it; naming every colour in order is the default draw, token for token."""
    frames = 6
    full = draw_batch(task, frames, 16, torch.Generator().manual_seed(2))
    same = draw_batch(task, frames, 16, torch.Generator().manual_seed(2), colors="".join(COLOR_KEYS))
    assert same[1] == full[1] and all(torch.equal(same[0][k], full[0][k]) for k in full[0])
    inputs, answers = draw_batch(task, frames, 48, torch.Generator().manual_seed(3), colors="bc")
    seen = set()
    for b, objs in enumerate(_objects(inputs["pixel_values"], frames)):
        seen |= set(objs.values())
        if task in ("lookup", "describe"):
            assert len(set(objs.values())) == len(objs) <= 2
        if task == "lookup":
            assert len(objs) == 2 and objs[int(answers[b])] == decode(inputs["input_ids"][b]).split("find ")[1][0]
    assert seen == {"b", "c"}
    for bad in ("bb", "bx", "b"):
        with pytest.raises(ValueError, match="colors"):
            draw_batch("lookup", frames, 2, torch.Generator(), colors=bad)


@pytest.mark.parametrize("task", TASKS)
def test_draw_batch_targets_point_at_the_answer_patch(task):
    """`targets=True` adds the position of the vision token that holds the answer (training supervises attention
    onto it): the same draw otherwise, an image token, and the patch there shows the object the answer is about."""
    frames, image_id = 5, processor().tokenizer.convert_tokens_to_ids("<image>")
    inputs, answers = draw_batch(task, frames, 32, torch.Generator().manual_seed(4))
    got, answers_t, targets = draw_batch(task, frames, 32, torch.Generator().manual_seed(4), targets=True)
    assert answers_t == answers and all(torch.equal(got[k], inputs[k]) for k in inputs)
    if task in ("count", "describe"):  # answers read from many tokens: no single target
        assert targets.tolist() == [-1] * 32
        return
    ids = inputs["input_ids"]
    vision = (ids[0] == image_id).nonzero()[:, 0].tolist()
    images = processor().image_processor
    mean, std = torch.tensor(images.image_mean).view(3, 1, 1), torch.tensor(images.image_std).view(3, 1, 1)
    for b, objs in enumerate(_objects(inputs["pixel_values"], frames)):
        assert ids[b, targets[b]] == image_id
        frame, patch = divmod(vision.index(int(targets[b])), GRID * GRID)
        assert frame in objs  # the target token lies in a frame that shows an object ...
        pix = (inputs["pixel_values"][b * frames + frame] * std + mean) * 255
        r, c = divmod(patch, GRID)
        assert pix[:, r * PATCH : (r + 1) * PATCH, c * PATCH : (c + 1) * PATCH].amax() > 150  # ... in its patch
        if task == "lookup":
            assert objs[frame] == decode(ids[b]).split("find ")[1][0] and answers[b] == str(frame)
        elif task == "needle":
            assert objs[frame] == answers[b]
        else:
            assert answers[b] == str(frame)


@pytest.mark.parametrize("task", TASKS)
def test_qwen_draw_is_the_llava_draw_in_merged_patches(task):
    """The Qwen2-VL batches show the same videos with the same answers: its pixel rows are the Llava frames cut into
    merged patches, every frame is one image of 4 x 4 merged tokens between the vision markers, `mm_token_type_ids`
    marks exactly the image tokens, and each target is the token of the same (frame, cell) as the Llava's."""
    frames = 5
    llava = draw_batch(task, frames, 12, torch.Generator().manual_seed(6), targets=True)
    qwen = draw_batch(task, frames, 12, torch.Generator().manual_seed(6), targets=True, family="qwen2_vl")
    assert qwen[1] == llava[1]
    inputs = qwen[0]
    torch.testing.assert_close(inputs["pixel_values"], qwen_patches(llava[0]["pixel_values"]), atol=0, rtol=0)
    assert inputs["pixel_values"].shape == (12 * frames * 64, 3 * 2 * 4 * 4)
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 8]] * (12 * frames)
    ids = inputs["input_ids"]
    tokenizer = processor("qwen2_vl").tokenizer
    image = ids == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert torch.equal(inputs["mm_token_type_ids"], image.long())
    start, end = (tokenizer.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>"))
    assert (ids == start).sum(1).tolist() == [frames] * 12 == (ids == end).sum(1).tolist()
    assert image.sum(1).tolist() == [16 * frames] * 12
    cell = {}  # sequence position of an image token -> (frame, cell), per model
    for name, batch in (("llava", llava), ("qwen", qwen)):
        positions = (batch[0]["input_ids"][0] == 250).nonzero()[:, 0].tolist()
        cell[name] = {p: divmod(i, 16) for i, p in enumerate(positions)}
    if task in ("count", "describe"):
        assert qwen[2].tolist() == [-1] * 12
    else:
        assert [cell["qwen"][int(t)] for t in qwen[2]] == [cell["llava"][int(t)] for t in llava[2]]
