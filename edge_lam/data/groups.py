"""Groups that a non-IID split draws over, for data without labels (`task='causal-lm'`).

A Dirichlet or pathological split needs a group per row. Labelled data has its label; an
instruction set (GSM8K, Code Alpaca) has none, so the rows are grouped by a column the user
names (`data.group-column`, e.g. a domain or source column), or clustered by what they talk
about: k-means (k = `data.clusters`) over L2-normalised TF-IDF vectors of the prompt's words,
hashed into a fixed number of dimensions. Every step is seeded and uses a stable hash (CRC-32,
not Python's salted `hash`), so every device computes the same groups from the same data.
"""

from __future__ import annotations

import re
import zlib

import numpy as np

from edge_lam.config.run_config import ConfigError

DIMENSIONS = 1024  # hashed vocabulary: enough to tell topics apart, 4 KiB a row
ITERATIONS = 30
WORD = re.compile(r"[a-z][a-z0-9_]+")
# words too common in instructions to say anything about the topic
STOP = frozenset("""the a an and or of to in is are was were be been for on with as at by
from that this it its into than then there their they them he she his her we you your our
if not no but so do does did has have had can could will would should what which who how
many much each per one two three write code function given following create program""".split())


def word_counts(text: str) -> dict[int, int]:
    counts: dict[int, int] = {}
    for word in WORD.findall(text.lower()):
        if word not in STOP:
            slot = zlib.crc32(word.encode()) % DIMENSIONS
            counts[slot] = counts.get(slot, 0) + 1
    return counts


def tfidf(texts: list[str]) -> np.ndarray:
    """Rows of L2-normalised TF-IDF over hashed words (float32, len(texts) x DIMENSIONS)."""
    x = np.zeros((len(texts), DIMENSIONS), np.float32)
    for i, text in enumerate(texts):
        for slot, n in word_counts(text).items():
            x[i, slot] = 1.0 + np.log(n)
    df = (x > 0).sum(axis=0)
    x *= np.log((1 + len(texts)) / (1 + df)).astype(np.float32) + 1.0
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def kmeans(x: np.ndarray, k: int, seed: int, iterations: int = ITERATIONS) -> np.ndarray:
    """Cluster ids (0..k-1) of the rows of `x` by spherical k-means, k-means++ seeded; ids are
    renumbered by cluster size (largest first), so they do not depend on the initial draw's
    order."""
    rng = np.random.default_rng(seed)
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, k):  # k-means++: far rows are likelier next centres
        dist = np.maximum(1.0 - np.max(x @ np.stack(centres).T, axis=1), 0.0)
        total = dist.sum()
        pick = rng.integers(len(x)) if total <= 0 else rng.choice(len(x), p=dist / total)
        centres.append(x[pick])
    c = np.stack(centres)
    assign = np.full(len(x), -1)
    for _ in range(iterations):
        new = np.argmax(x @ c.T, axis=1)
        if np.array_equal(new, assign):
            break
        assign = new
        for j in range(k):
            members = x[assign == j]
            if len(members):
                centre = members.sum(axis=0)
                c[j] = centre / max(np.linalg.norm(centre), 1e-12)
    order = np.argsort(-np.bincount(assign, minlength=k), kind="stable")
    return np.argsort(order)[assign]


def text_clusters(texts: list[str], k: int, seed: int) -> list[int]:
    """`k` topical clusters of `texts` (see the module's docstring)."""
    if k < 2:
        raise ConfigError(f"data.clusters={k}: a non-IID split needs at least 2 groups")
    if len(texts) < k:
        raise ConfigError(f"data.clusters={k} is more than the {len(texts)} training rows: "
                          "lower data.clusters")
    return kmeans(tfidf(texts), k, seed).tolist()


def column_groups(values: list[str]) -> list[int]:
    """Group ids of a column's values (sorted names, so every device numbers them alike)."""
    names = sorted(set(values))
    index = {v: i for i, v in enumerate(names)}
    return [index[v] for v in values]
