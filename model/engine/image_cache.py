"""Image features shared by requests about the same image: the vision tower runs once per image.

Benchmarks and VQA datasets ask several questions about each image (VQAv2 about five, DocVQA about
four), and the rows of one image usually come together. A request that names its image
(`Request.image_key`: equal keys promise equal pixel values) reuses the features of an earlier
request with that key, or of another one in the same prefill, instead of encoding them again.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import replace
from typing import Callable

from torch import Tensor

from .types import Request

MADE_UP = "\x1fimage-"      # ImageNames' keys
Encoder = Callable[[list[Tensor | None], list[Tensor | None]], list[Tensor | None]]


class ImageFeatureCache:
    """The features of the most recently used keys, at most `max_bytes` of them (0: none kept).
    Every tensor-parallel rank sees the same requests and the same feature sizes, so every rank
    keeps and evicts the same keys and runs the vision tower (and its collectives) alike."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.bytes = max_bytes, 0
        self._entries: OrderedDict[str, Tensor] = OrderedDict()
        self.hits = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str | None) -> Tensor | None:
        features = None if key is None else self._entries.get(key)
        if features is not None:
            self._entries.move_to_end(key, last=not key.startswith(MADE_UP))
            self.hits += 1
        return features

    def put(self, key: str, features: Tensor) -> None:
        size = features.numel() * features.element_size()
        if key in self._entries or size > self.max_bytes:
            return
        self._entries[key] = features.clone()     # not a view that would keep its whole batch alive
        # a made-up key serves one request's samples or scorers only: the first to go, used or not
        self._entries.move_to_end(key, last=not key.startswith(MADE_UP))
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()

    def features(self, requests: list[Request], encode: Encoder) -> list[Tensor | None]:
        """Each request's image features (None without an image): cached, or encoded once per key
        (requests without a key are encoded each on their own), in one call of `encode`."""
        out = [self.get(r.image_key) if r.pixel_values is not None else None for r in requests]

        def owner(i: int) -> tuple:               # requests without a key own their pixels alone
            key = requests[i].image_key
            return ("row", i) if key is None else ("key", key)

        missing = [i for i, r in enumerate(requests) if r.pixel_values is not None and out[i] is None]
        owners: dict[tuple, int] = {}             # -> the request whose pixels are encoded
        for i in missing:
            owners.setdefault(owner(i), i)
        if not owners:
            return out
        encoded = dict(zip(owners, encode([requests[i].pixel_values for i in owners.values()],
                                          [requests[i].pixel_attention_mask for i in owners.values()])))
        for i in missing:
            out[i] = encoded[owner(i)]
        for (kind, key), features in encoded.items():
            if kind == "key":
                self.put(key, features)
        return out


def keyed_by_shape(request: Request) -> Request:
    """The request with its image's tile grid in its key: images of a key and another grid (a file
    name given to other images) were one image to the caches, whose features then did not fit the
    prompt, and the whole batch failed naming none of it."""
    if request.image_key is None or request.pixel_values is None:
        return request
    return replace(request, image_key=f"{request.image_key}\x1f{tuple(request.pixel_values.shape)}")


class ImageNames:
    """Names for the unnamed images of requests the engine derives sequences from (samples,
    scorers), so that those share the image's features and prompt K/V: made here, never met before
    (a name made of the request id would find an earlier image when the id comes again)."""

    def __init__(self) -> None:
        self._count = itertools.count()

    def named(self, request: Request) -> Request:
        if request.image_key is not None or request.pixel_values is None:
            return request
        return replace(request, image_key=f"{MADE_UP}{next(self._count)}")
