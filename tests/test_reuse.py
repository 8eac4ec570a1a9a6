"""Image KV reuse (EPIC): exactness with full recompute, key re-rotation, cache contents, the store."""

import threading

import pytest
import torch
from transformers import DynamicCache

import vlcache
from vlcache import testing
from vlcache.hf.compat import cache_kwargs, from_pretrained
from vlcache.hf.model_parts import decoder
from vlcache.hf.reuse import ImageReuse
from vlcache.policies import SnapKV
from vlcache.reuse import Chunk, CorruptChunkError, ImageKVStore, chunk_key, rerotate

FAMILIES = ["llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl"]
PROMPT = ["ab", testing.IMAGE, "cd", testing.IMAGE, "what is it?"]


def _reuser(model, **kw):
    return ImageReuse(model, ImageKVStore(), **kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_recomputing_everything_equals_a_cold_prefill(tiny_model, family):
    model = tiny_model(family)
    inputs = testing.make_inputs(model, PROMPT).inputs
    with torch.no_grad():
        cold = model(**inputs, **cache_kwargs(DynamicCache(config=model.config))).logits[:, -1]
    r = _reuser(model, k=10**6)
    r.link(dict(inputs))  # first sight: compiles and stores both images
    with torch.no_grad():
        _, linked = r.link(dict(inputs))  # every token recomputed against the spliced cache
    assert r.last["reused"] == 2 and r.last["recomputed"] == r.last["tokens"]
    torch.testing.assert_close(linked, cold, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_rerotated_keys_equal_keys_computed_at_the_new_position(tiny_model, family):
    """Compute an image's chunk at position 0 and at position delta: every layer's keys differ exactly by R(delta)."""
    model = tiny_model(family)
    inputs = testing.make_inputs(model, ["", testing.IMAGE]).inputs  # bos, then the image's tokens
    r = _reuser(model)
    ids = inputs["input_ids"][:, 1:]
    image = r._image_inputs(inputs, 0)
    extra = {"mm_token_type_ids": (ids == testing.models.IMG).int()} if family.startswith("qwen") else {}
    delta = 37
    caches = []
    for offset in (0, delta):
        if family.startswith("qwen"):
            pos, _ = model.model.get_rope_index(
                ids, mm_token_type_ids=extra["mm_token_type_ids"], image_grid_thw=image["image_grid_thw"]
            )
            pos = pos + offset  # t, h and w all move
        else:
            pos = torch.arange(offset, offset + ids.shape[1])[None]
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=ids, position_ids=pos, **cache_kwargs(cache), **image, **extra)
        caches.append(cache)
    inv_freq = decoder(model).rotary_emb.inv_freq
    for at0, atd in zip(caches[0].layers, caches[1].layers):
        torch.testing.assert_close(rerotate(at0.keys, delta, inv_freq), atd.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(at0.values, atd.values, atol=1e-5, rtol=1e-5)  # values do not depend on position


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_moved_and_swapped_images_splice_the_stored_kv(tiny_model, family):
    model = tiny_model(family)
    r = _reuser(model, k=0)
    first = testing.make_inputs(model, ["x", testing.IMAGE, "y", testing.IMAGE, "?"], seed=0).inputs
    r.link(dict(first))
    assert len(r.store) == 2 and r.last["compiled"] == 2
    # the same two images, swapped, after a longer text: both hit, each lands at its new position
    a = r._image_inputs(first, 0)
    b = r._image_inputs(first, 1)
    second = testing.make_inputs(
        model, ["a much longer preamble", testing.IMAGE, "and", testing.IMAGE, "?"], seed=0
    ).inputs
    pv = torch.cat([b["pixel_values"], a["pixel_values"]])
    second["pixel_values"] = pv
    if family.startswith("qwen"):
        second["image_grid_thw"] = torch.cat([b["image_grid_thw"], a["image_grid_thw"]])
    cache, _ = r.link(dict(second))
    assert r.last["reused"] == 2 and r.last["compiled"] == 0
    layout = vlcache.modality.layout_from_inputs(model.config, second)
    _, text_pos = r._positions(second)
    chunks = r._chunks(second, layout)
    for start, end, chunk, new in chunks:
        assert not new
        delta = int(text_pos[start])
        for li, layer in enumerate(cache.layers):
            # k=0: nothing of the image was recomputed, so its slots hold exactly the stored, moved KV
            torch.testing.assert_close(layer.keys[0, :, start:end], rerotate(chunk.keys[li], delta, r.inv_freq))
            torch.testing.assert_close(layer.values[0, :, start:end], chunk.values[li])


def test_different_pixels_never_hit(tiny_model):
    model = tiny_model("llava")
    r = _reuser(model)
    inputs = testing.make_inputs(model, ["x", testing.IMAGE, "?"], seed=1).inputs
    r.link(dict(inputs))
    changed = dict(inputs)
    changed["pixel_values"] = inputs["pixel_values"].clone()
    changed["pixel_values"][0, 0, 0, 0] += 1e-3  # one value, slightly
    r.link(changed)
    assert r.last["reused"] == 0 and len(r.store) == 2
    other = ImageReuse(model, r.store, processor=testing.processor("llava"))  # other processor settings: other keys
    other.link(dict(inputs))
    assert other.last["reused"] == 0


def _chunk(key_char: str, size: int) -> Chunk:
    key = (key_char * 64)[:64]
    return Chunk(key, [torch.ones(2, size, 4)], [torch.ones(2, size, 4)], torch.ones(size, 8))


def test_store_evicts_the_least_recently_used_over_its_byte_limit():
    one = _chunk("a", 10).nbytes
    store = ImageKVStore(max_bytes=2 * one)
    store.put(_chunk("a", 10))
    store.put(_chunk("b", 10))
    assert store.get("a" * 64) is not None  # a is now the most recent
    store.put(_chunk("c", 10))
    assert store.keys() == ["a" * 64, "c" * 64] and store.nbytes <= 2 * one
    assert store.get("b" * 64) is None


def test_store_is_thread_safe():
    """Eight threads putting and getting at once, switching every microsecond (at Python's default 5 ms each thread
    would mostly run alone): no error in any thread, and the byte count agrees with what is held. Without the
    store's lock this raised "OrderedDict mutated during iteration" or a KeyError in most runs."""
    import sys

    store = ImageKVStore(max_bytes=10 * _chunk("a", 4).nbytes)  # smaller than the 16 keys: evictions race too
    errors = []

    def work(i):
        try:
            for j in range(400):
                store.put(_chunk("0123456789abcdef"[(i + j) % 16], 4))
                store.get("0123456789abcdef"[j % 16] * 64)
                assert store.nbytes >= 0  # sums the held chunks while others change them
        except Exception as e:  # a thread's exception would otherwise only be printed
            errors.append(repr(e))

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(switch)
    assert not errors, errors[:3]
    assert len(store) == 10 and store.nbytes == 10 * _chunk("a", 4).nbytes


def test_disk_tier_survives_a_restart_and_rejects_corruption(tmp_path):
    key = chunk_key(torch.arange(12.0), "model", "fp32")
    assert len(key) == 64  # the full digest
    chunk = Chunk(key, [torch.randn(2, 5, 4)], [torch.randn(2, 5, 4)], torch.randn(5, 8), base=0)
    ImageKVStore(disk_dir=tmp_path).put(chunk)
    again = ImageKVStore(disk_dir=tmp_path).get(key)  # a new process: memory empty, disk has it
    assert torch.equal(again.keys[0], chunk.keys[0]) and torch.equal(again.embeds, chunk.embeds)
    path = tmp_path / f"{key}.safetensors"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # flip bits in the tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptChunkError, match="corrupted"):
        ImageKVStore(disk_dir=tmp_path).load(key)
    with pytest.raises(ValueError, match="not a chunk key"):
        ImageKVStore(disk_dir=tmp_path).get("../../etc/passwd")


def test_a_corrupt_chunk_is_dropped_and_rewritten(tiny_model, tmp_path):
    """A corrupt file is a miss with a warning, not an error on every later request: the image is compiled
    again and `put` writes a good file in its place."""
    model = tiny_model("llava")
    inputs = testing.make_inputs(model, PROMPT).inputs
    with vlcache.reuse(model, ImageKVStore(disk_dir=tmp_path)):
        want = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    files = sorted(tmp_path.glob("*.safetensors"))
    files[0].write_bytes(files[0].read_bytes()[:-7])  # cut short, as a crash or a full disk would
    store = ImageKVStore(disk_dir=tmp_path)
    with pytest.warns(RuntimeWarning, match="dropped it"), vlcache.reuse(model, store, recompute="full") as r:
        got = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want) and r.last["compiled"] == 1 and r.last["reused"] == 1
    fresh = ImageKVStore(disk_dir=tmp_path)
    assert all(fresh.load(f.stem) is not None for f in files)  # rewritten whole


def test_a_full_disk_falls_back_to_memory(tiny_model, tmp_path, monkeypatch):
    import errno

    import safetensors.torch

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    model = tiny_model("llava")
    inputs = testing.make_inputs(model, PROMPT).inputs
    store = ImageKVStore(disk_dir=tmp_path)
    with pytest.warns(RuntimeWarning, match="No space left on device.*memory"), vlcache.reuse(model, store) as r:
        model.generate(**inputs, max_new_tokens=4, do_sample=False)
        model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert r.last["reused"] == 2 and len(store) == 2  # served from memory
    assert not list(tmp_path.iterdir())  # no half-written temporary left


def _race_chunk(i):
    key = chunk_key(torch.tensor([float(i)]), "race")
    return Chunk(key, [torch.full((2, 3, 4), float(i))], [torch.ones(2, 3, 4)], torch.ones(3, 8))


def _put_many(disk_dir, count):
    import warnings

    # the store only warns when a write fails (a full disk must not stop generation): here that fails the process
    warnings.simplefilter("error", RuntimeWarning)
    store = ImageKVStore(max_bytes=0, disk_dir=disk_dir)
    for i in range(count):
        chunk = _race_chunk(i)
        store.put(chunk)
        store._path(chunk.key).unlink(missing_ok=True)  # so that the next round writes it again, racing the other
    for i in range(20):  # a last round left on disk, for the parent to read back
        store.put(_race_chunk(i))


@pytest.mark.slow
def test_two_processes_share_one_disk_dir(tmp_path):
    """Both write the same chunks at the same time: unique temporary names, atomic renames, no error."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_put_many, args=(tmp_path, 1500)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]  # no write failed in either
    assert not list(tmp_path.glob("*.tmp"))
    fresh = ImageKVStore(disk_dir=tmp_path)  # every chunk both wrote reads back whole in a third store
    for i in range(20):
        got = fresh.get(_race_chunk(i).key)
        assert got is not None and torch.equal(got.keys[0], torch.full((2, 3, 4), float(i))), i


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_recompute_choices_in_generate(tiny_model, family):
    model = tiny_model(family)
    inputs = testing.make_inputs(model, PROMPT).inputs
    plain = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    store = ImageKVStore()
    outs = {}
    for mode, kw in (("full", {}), ("first_k", {"k": 4}), ("cacheblend", {"ratio": 0.25})):
        with vlcache.reuse(model, store, recompute=mode, **kw) as r:
            outs[mode] = model.generate(**inputs, max_new_tokens=12, do_sample=False)
        assert outs[mode].shape == plain.shape
        if mode == "first_k":  # every text token and the first 4 of each reused image, nothing else
            last = r.last
            assert last["reused"] == 2 and last["recomputed"] == last["tokens"] - last["reused_tokens"] + 4 * 2
    assert torch.equal(outs["full"], plain)  # the exact baseline
    reused = r.last["reused_tokens"]  # both images, their markers included
    assert reused >= int((inputs["input_ids"] == testing.models.IMG).sum())
    assert r.last["recomputed"] == r.last["tokens"] - reused + int(0.25 * reused)


def test_compression_applies_after_linking(tiny_model):
    model = tiny_model("qwen2_vl")
    inputs = testing.make_inputs(model, PROMPT).inputs
    n = inputs["input_ids"].shape[1]
    store = ImageKVStore()
    with vlcache.compress(model, SnapKV(budget=0.5, window=4)) as s, vlcache.reuse(model, store, k=4):
        model.generate(**inputs, max_new_tokens=4, do_sample=False)  # compiles
        out = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)  # links, then compresses
    assert out.shape[1] == n + 6
    assert s.prefill_stats.layers[0].slots == n // 2
    assert "generate" not in model.__dict__  # both wrappers undone


def test_nesting_order_does_not_matter(tiny_model):
    model = tiny_model("llava")
    inputs = testing.make_inputs(model, PROMPT).inputs
    store = ImageKVStore()
    with vlcache.reuse(model, store, recompute="full"), vlcache.compress(model, SnapKV(budget=0.5, window=4)) as s:
        model.generate(**inputs, max_new_tokens=2, do_sample=False)  # compiles the images
        out = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    with vlcache.compress(model, SnapKV(budget=0.5, window=4)):
        want = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert torch.equal(out, want)  # full recompute + the same policy = the same tokens
    assert s.prefill_stats.layers[0].slots == inputs["input_ids"].shape[1] // 2
    assert "generate" not in model.__dict__


def test_reuse_errors(tiny_model):
    with pytest.raises(vlcache.UnsupportedModelError, match="image reuse supports"):
        _reuser(tiny_model("idefics3"))
    with pytest.raises(ValueError, match="recompute"):
        _reuser(tiny_model("llava"), recompute="some")
    model = tiny_model("llava")
    batch = testing.make_inputs(model, [["a", testing.IMAGE, "?"], ["bb", testing.IMAGE, "?"]]).inputs
    with vlcache.reuse(model, ImageKVStore()):
        with pytest.raises(ValueError, match="batch size 1"):
            model.generate(**batch, max_new_tokens=2)
    with pytest.raises(ValueError, match="no images to link"):
        _reuser(model).link(dict(testing.make_inputs(model, ["only text"]).inputs))


def test_a_model_retrained_and_saved_over_the_old_checkpoint_gets_its_own_kv(tmp_path):
    """The store key names the weights, not the path: B saved to A's directory, with A's config, must not be
    handed A's stored images (it was, even with recompute="full", and answered differently from its cold run)."""
    ckpt, disk = tmp_path / "ckpt", tmp_path / "kv"
    testing.build("llava", seed=0).save_pretrained(ckpt)
    model_a = from_pretrained(type(testing.build("llava")), ckpt).eval()
    inputs = testing.make_inputs(model_a, PROMPT).inputs
    with vlcache.reuse(model_a, ImageKVStore(disk_dir=disk), recompute="full"):
        model_a.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert len(list(disk.glob("*.safetensors"))) == 2

    testing.build("llava", seed=1).save_pretrained(ckpt)  # retrained: same path, same config
    model_b = from_pretrained(type(model_a), ckpt).eval()
    assert model_b.name_or_path == model_a.name_or_path and model_b.config == model_a.config
    cold = model_b.generate(**inputs, max_new_tokens=8, do_sample=False)
    with vlcache.reuse(model_b, ImageKVStore(disk_dir=disk), recompute="full") as r:
        warm = model_b.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert r.last["reused"] == 0 and r.last["compiled"] == 2
    assert torch.equal(warm, cold)


def test_weights_digest_notices_training_in_place(tiny_model):
    from vlcache.fingerprint import weights_digest

    model = testing.build("llava")
    before = weights_digest(model)
    assert weights_digest(model) == before  # cached
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    assert weights_digest(model) != before


def test_linked_generate_honours_the_length_and_end_options(tiny_model):
    """Linking picks the first token itself: generate's own stop and length rules applied only after it. Now an
    end token first stops at once, min_new_tokens holds it back, and max_length / a GenerationConfig's
    max_new_tokens set the length, as in plain generate (recompute="full" is exact)."""
    from transformers import GenerationConfig

    model = tiny_model("llava")
    inputs = testing.make_inputs(model, PROMPT).inputs
    n = inputs["input_ids"].shape[1]
    plain = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    first, second = int(plain[0, n]), int(plain[0, n + 1])
    cases = [
        dict(max_new_tokens=8, eos_token_id=first, pad_token_id=0),  # ends at the first token
        dict(max_new_tokens=8, min_new_tokens=3, eos_token_id=first, pad_token_id=0),  # not before 3
        dict(max_new_tokens=8, eos_token_id=second, pad_token_id=0),
        dict(max_length=n + 3),
        dict(generation_config=GenerationConfig(max_new_tokens=3, do_sample=False)),
    ]
    store = ImageKVStore()
    with vlcache.reuse(model, store, recompute="full") as r:
        model.generate(**inputs, max_new_tokens=1, do_sample=False)  # stores the images
        linked = [model.generate(**inputs, do_sample=False, **kw) for kw in cases]
        assert r.last["reused"] == 2
    for kw, got in zip(cases, linked):
        want = model.generate(**inputs, do_sample=False, **kw)
        assert torch.equal(got, want), kw
    assert linked[0].shape[1] == n + 1 and linked[3].shape[1] == n + 3


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(do_sample=True), "do_sample=True"),
        (dict(num_return_sequences=2, num_beams=2), "num_beams=2"),
        (dict(output_scores=True, return_dict_in_generate=True), "output_scores"),
    ],
)
def test_options_on_the_first_token_are_refused_when_linking(tiny_model, kw, message):
    model = tiny_model("llava")
    inputs = testing.make_inputs(model, PROMPT).inputs
    with vlcache.reuse(model, ImageKVStore()):
        with pytest.raises(ValueError, match=f"image reuse picks the first token.*{message}"):
            model.generate(**inputs, max_new_tokens=3, **kw)


def test_what_reuse_cannot_link_is_one_clear_error(tiny_model):
    qwen = tiny_model("qwen2_vl")
    mixed = testing.make_inputs(qwen, ["ab", testing.IMAGE, "cd", testing.Video(4), "what?"]).inputs
    with vlcache.reuse(qwen, ImageKVStore()):
        with pytest.raises(ValueError, match="image reuse links images only; this prompt has a video"):
            qwen.generate(**mixed, max_new_tokens=2, do_sample=False)
    model = tiny_model("llava")
    inputs = testing.make_inputs(model, PROMPT).inputs
    with (
        vlcache.compress(model, "snapkv", budget=0.3, lookahead=1, lookahead_draft=True),
        vlcache.reuse(model, ImageKVStore()),
    ):
        with pytest.raises(ValueError, match="lookahead_draft drafts from the prompt's own forward"):
            model.generate(**inputs, max_new_tokens=2, do_sample=False)


def test_vl_cache_scores_a_linked_prompt(tiny_model):
    """VL-Cache counted each scoring row's visible keys over the whole prompt, while a linked prompt recomputes
    only some rows: it raised on the second, linked, generate. Now it cuts to its budget as it does cold."""
    model = tiny_model("llava")
    inputs = testing.make_inputs(model, PROMPT).inputs
    with vlcache.compress(model, "vlcache", vision_budget=0.2) as s, vlcache.reuse(model, ImageKVStore(), k=4) as r:
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
        cold = s.prefill_stats.kept("image")
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert r.last["reused"] == 2
    assert s.prefill_stats.kept("image") == cold < s.prefill_stats.prompt["image"]


def test_detaching_out_of_order_leaves_a_working_model(tiny_model):
    """Compression attached, then reuse, then compression detached first: reuse's wrapper stayed, calling the
    detached session, which then refused every generate. Now a detached wrapper passes its calls on, and once
    both are detached the model is its plain self."""
    model = tiny_model("llava")
    inputs = testing.make_inputs(model, PROMPT).inputs
    plain = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    session = vlcache.attach(model, "snapkv", budget=0.5)
    reuse = ImageReuse(model, ImageKVStore(), recompute="full").attach()
    session.detach()
    assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), plain)  # reuse alone, exact
    reuse.detach()
    assert "generate" not in model.__dict__
    assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), plain)


def test_linked_generates_from_several_threads_take_turns(tiny_model):
    """Linking hooks the shared language model and keeps per-request rope state: two threads at once swapped
    each other's embeddings and gave wrong tokens without an error. Now they take turns."""
    model = tiny_model("llava")
    prompts = [testing.make_inputs(model, PROMPT).inputs, testing.make_inputs(model, ["xy", testing.IMAGE, "?"]).inputs]
    want = [model.generate(**p, max_new_tokens=6, do_sample=False) for p in prompts]
    wrong, errors = [], []

    def ask(j):
        try:
            got = model.generate(**prompts[j % 2], max_new_tokens=6, do_sample=False)
            if not torch.equal(got, want[j % 2]):
                wrong.append(j)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    with vlcache.reuse(model, ImageKVStore(), recompute="full"):
        threads = [threading.Thread(target=ask, args=(j,)) for j in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert wrong == [] and errors == []
