"""Requests naming the same image (Request.image_key) run the vision tower once, in one prefill or
across prefills, and their answers are still the reference's."""
from __future__ import annotations

from dataclasses import replace

import torch

from model.engine import LLMEngine, SamplingParams
from model.engine.image_cache import ImageFeatureCache
from tests.model.test_engine import setup  # noqa: F401  (tiny checkpoints, the reference's answers)

torch.set_num_threads(1)


def test_the_cache_keeps_the_most_recent_features_within_its_bytes():
    four_kib = torch.zeros(1024)                       # float32: 4 KiB each
    cache = ImageFeatureCache(max_bytes=3 * 4096)
    for key in "abcd":
        cache.put(key, four_kib + ord(key))
    assert len(cache) == 3 and cache.bytes == 3 * 4096 and cache.get("a") is None
    assert cache.get("b")[0] == ord("b")               # b is now the most recent: c goes next
    cache.put("e", four_kib)
    assert cache.get("c") is None and cache.get("b") is not None and cache.hits == 2
    cache.put("huge", torch.zeros(4 * 1024))           # larger than the whole cache: not kept
    assert cache.get("huge") is None and len(cache) == 3
    assert ImageFeatureCache(max_bytes=0).features([], lambda p, m: []) == []


def test_features_are_encoded_once_per_key_in_one_call():
    from model.engine import Request

    pixels = {name: torch.full((1, 3, 2, 2), float(i + 1)) for i, name in enumerate("abc")}
    requests = [Request("1", [0], pixels["a"], image_key="a"), Request("2", [0]),
                Request("3", [0], pixels["b"], image_key="b"), Request("4", [0], pixels["a"], image_key="a"),
                Request("5", [0], pixels["c"]), Request("6", [0], pixels["c"])]
    calls = []

    def encode(pixel_values, masks):
        calls.append(len(pixel_values))
        return [p.sum().reshape(1) for p in pixel_values]

    cache = ImageFeatureCache(max_bytes=1 << 20)
    out = cache.features(requests, encode)
    assert [None if f is None else f.item() for f in out] == [12, None, 24, 12, 36, 36]
    assert calls == [4]                                    # a, b, and each unkeyed c on its own
    out = cache.features([requests[2], requests[4]], encode)
    assert [f.item() for f in out] == [24, 36] and calls == [4, 1] and cache.hits == 1


def test_rows_about_one_image_encode_it_once_and_answer_as_the_reference(setup):
    ours, requests, expected, _, _ = setup
    with_images = [r for r in requests if r.pixel_values is not None]
    keyed = [replace(r, image_key=f"image-of-{r.request_id}") for r in requests]
    # More questions about the first two images (here: the same prompt, answers cut shorter).
    again = [replace(r, request_id=r.request_id + "-again", image_key=f"image-of-{r.request_id}",
                     sampling=SamplingParams(max_new_tokens=2)) for r in with_images[:2]]
    engine = LLMEngine(ours, max_batch_size=4)
    results = engine.generate(keyed + again)
    got = {r.request_id: r.token_ids for r in results}
    assert {k: got[k] for k in expected} == expected
    assert all(got[r.request_id] == expected[r.request_id[:-len("-again")]][:2] for r in again)
    assert engine.stats["images_encoded"] == len(with_images)          # not len(with_images) + 2

    later = engine.generate([replace(r, request_id="later") for r in again[:1]])      # a later prefill
    assert later[0].token_ids == got[again[0].request_id]
    assert engine.stats["images_encoded"] == len(with_images)
    unkeyed = engine.generate([replace(r, image_key=None) for r in again])            # no key: encoded
    assert [r.token_ids for r in unkeyed] == [got[r.request_id] for r in again]
    assert engine.stats["images_encoded"] == len(with_images) + 2


def test_a_key_is_trusted_and_a_zero_byte_cache_keeps_nothing(setup):
    ours, requests, expected, _, _ = setup
    with_images = [r for r in requests if r.pixel_values is not None]
    first, second = next((a, b) for a in with_images for b in with_images
                         if a is not b and a.pixel_values.shape == b.pixel_values.shape)  # features that fit
    misnamed = replace(second, image_key="one")                 # claims the first's image
    # Prompt prefixes are shared by key too (test_prefix_cache): off, to see the feature cache alone.
    engine = LLMEngine(ours, max_batch_size=4, share_prefixes=False)
    engine.generate([replace(first, image_key="one")])
    engine.generate([misnamed])
    assert engine.stats["images_encoded"] == 1 and engine.image_cache.hits == 1     # it got the first's features
    uncached = LLMEngine(ours, max_batch_size=4, image_cache_bytes=0, share_prefixes=False)
    uncached.generate([replace(first, image_key="one")])
    assert uncached.generate([misnamed])[0].token_ids == expected[second.request_id]
    assert uncached.stats["images_encoded"] == 2 and len(uncached.image_cache) == 0


def test_images_of_one_key_and_other_tile_grids_are_each_their_own(setup):
    """A key given to other images (a file name reused): where their grids differ, the cached features
    did not fit the prompt and the whole batch failed ("Image features and image tokens do not match")."""
    ours, requests, expected, _, _ = setup
    with_images = [r for r in requests if r.pixel_values is not None]
    first, second = next((a, b) for a in with_images for b in with_images
                         if a.pixel_values.shape[0] != b.pixel_values.shape[0])
    engine = LLMEngine(ours, max_batch_size=4)
    results = engine.generate([replace(first, image_key="one"), replace(second, image_key="one")])
    assert [r.token_ids for r in results] == [expected[first.request_id], expected[second.request_id]]
    assert engine.generate([replace(second, image_key="one")])[0].token_ids == expected[second.request_id]
    assert engine.stats["images_encoded"] == 2


def test_a_requests_own_made_up_key_is_the_first_to_go():
    """Samples' and scorers' made-up names (ImageNames) are never met again once their request ends:
    after 1000 mixed submits they were ~500 of 775 entries, pushing real keys out of the LRU sooner."""
    from model.engine.image_cache import MADE_UP

    four_kib = torch.zeros(1024)
    cache = ImageFeatureCache(max_bytes=2 * 4096)
    cache.put("photo", four_kib)
    cache.put(f"{MADE_UP}0", four_kib)
    assert cache.get(f"{MADE_UP}0") is not None        # while its samples are prefilled it serves them
    cache.put("drawing", four_kib)
    assert cache.get("photo") is not None and cache.get(f"{MADE_UP}0") is None
