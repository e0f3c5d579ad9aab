"""Seeded draws per image_id: which images a sampled stage takes, and each image's own seed.

Both depend only on a seed and the image_id, never on the shard, batch, actor or attempt that
holds the image, so a resumed or retried run samples the same images and an image is perturbed
in the same random order by the audit and by ``lrpscale evaluate`` (docs/method.md §16).
"""
from __future__ import annotations

import hashlib


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def image_seed(seed: int, image_id: str) -> int:
    """An image's seed for its random patch order: below 2**63, so it fits torch's int64."""
    return _hash64(f"{seed}:{image_id}") >> 1


def in_sample(seed: int, image_id: str, share: float) -> bool:
    """Whether the image is in a seeded sample of ``share`` of all images (0: none, 1: all): a
    uniform draw in [0, 1) from the seed and the image_id (another hash than ``image_seed``'s)."""
    return _hash64(f"{seed}:sample:{image_id}") / 2.0 ** 64 < share
