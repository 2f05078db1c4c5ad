"""Non-IID splits of instruction data (issue 27): `data.partitioner='dirichlet'` on
`task='causal-lm'` draws over topical clusters of the prompts, or over `data.group-column`,
never silently IID."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from edge_lam.config.run_config import ConfigError, RunConfig
from edge_lam.data.groups import column_groups, kmeans, text_clusters, tfidf
from edge_lam.data.partition import partition_indices, split_groups
from edge_lam.data.text import Examples

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"

TOPICS = {  # three topics, easy to tell apart by their words
    "money": "She earns {n} dollars an hour babysitting and saves the wages in the bank",
    "garden": "He plants {n} tomato seeds in the garden beds and waters the flowers daily",
    "train": "The train travels {n} miles per hour between the stations on the railway",
}


def _topical(per_topic: int = 30) -> tuple[Examples, list[str]]:
    texts, truth = [], []
    for topic, template in TOPICS.items():
        for n in range(per_topic):
            texts.append(template.format(n=n + 2))
            truth.append(topic)
    return Examples(texts, [], ["answer"] * len(texts)), truth


def _cfg(**extra) -> RunConfig:
    return RunConfig.from_run_config({"task": "causal-lm", "seed": 3, **extra})


def test_kmeans_recovers_topics_and_is_seeded():
    examples, truth = _topical()
    groups = text_clusters(examples.texts, 3, seed=0)
    # every topic lands in one cluster, and no two topics share one
    by_topic = {t: {g for g, tt in zip(groups, truth) if tt == t} for t in TOPICS}
    assert all(len(c) == 1 for c in by_topic.values())
    assert len(set().union(*by_topic.values())) == 3
    assert text_clusters(examples.texts, 3, seed=0) == groups  # every device alike
    # ids are numbered by size, largest first, whatever the initial draw
    sizes = Counter(kmeans(tfidf(examples.texts[:70]), 3, seed=5))
    assert [sizes[i] for i in range(3)] == sorted(sizes.values(), reverse=True)


def test_tfidf_rows_are_unit_length_and_ignore_stop_words():
    x = tfidf(["the money of the bank", "the the the", "garden"])
    assert np.linalg.norm(x[0]) == pytest.approx(1.0, abs=1e-6)
    assert not x[1].any()  # stop words only: no direction at all
    assert float(x[0] @ x[2]) == pytest.approx(0.0, abs=1e-6)


def test_dirichlet_on_instructions_is_not_iid():
    examples, truth = _topical(per_topic=40)
    cfg = _cfg(**{"data.partitioner": "dirichlet", "data.dirichlet-alpha": 0.1,
                  "data.clusters": 3})
    parts = [partition_indices(examples, cfg, p, 4) for p in range(4)]
    assert sorted(i for p in parts for i in p) == list(range(len(examples)))  # a partition
    groups = split_groups(examples, cfg)
    shares = np.array([[sum(groups[i] == g for i in p) / len(p) for g in range(3)]
                       for p in parts])
    # at alpha 0.1 some device is dominated by one topic (IID would give each about 1/3)
    assert shares.max() > 0.6
    iid = [partition_indices(examples, cfg.updated("data", partitioner="iid"), p, 4)
           for p in range(4)]
    assert parts != iid
    assert [partition_indices(examples, cfg, p, 4) for p in range(4)] == parts  # seeded


def test_group_column_splits_by_its_values(tmp_path):
    rows = [{"prompt": f"question {i}", "response": f"answer {i}",
             "domain": "maths" if i % 3 else "code"} for i in range(60)]
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _cfg(**{"data.path": str(tmp_path), "data.group-column": "domain",
                  "data.partitioner": "pathological", "data.classes-per-device": 1})
    from edge_lam.data.text import load_split_frames, resolve_columns, to_examples

    frames = load_split_frames(str(tmp_path), "", "utf-8")
    examples = to_examples(frames["train"], resolve_columns(frames["train"], cfg), ())
    assert split_groups(examples, cfg) == column_groups(examples.groups)
    assert column_groups(["b", "a", "b"]) == [1, 0, 1]  # sorted names: alike everywhere
    for pid in range(2):  # one domain per device
        rows_of = partition_indices(examples, cfg, pid, 2)
        assert len({examples.groups[i] for i in rows_of}) == 1
    with pytest.raises(ConfigError, match="data.group-column='topic' is not a column"):
        resolve_columns(frames["train"], cfg.updated("data", group_column="topic"))


def test_too_many_clusters_is_refused():
    examples, _ = _topical(per_topic=1)
    with pytest.raises(ConfigError, match="data.clusters=8 is more than the 3 training rows"):
        split_groups(examples, _cfg(**{"data.clusters": 8}))


@pytest.mark.skipif(not GSM8K.is_dir(), reason="../shared/data/gsm8k is not there")
def test_gsm8k_clusters_split_the_devices_by_topic():
    texts = [json.loads(line)["question"]
             for line in (GSM8K / "train.jsonl").read_text().split("\n") if line.strip()]
    examples = Examples(texts[:2000], [], ["a"] * 2000)
    cfg = _cfg(**{"data.partitioner": "dirichlet", "data.dirichlet-alpha": 0.5})
    groups = split_groups(examples, cfg)
    assert len(set(groups)) == 8
    mixes = []
    for pid in range(10):
        rows = partition_indices(examples, cfg, pid, 10)
        counts = np.bincount([groups[i] for i in rows], minlength=8)
        mixes.append(counts / counts.sum())
    overall = np.bincount(groups, minlength=8) / len(groups)
    # total variation from the overall mix: IID would stay near 0
    assert np.mean([0.5 * np.abs(m - overall).sum() for m in mixes]) > 0.25
