"""One device's share of a split: flwr-datasets' partitioners, seeded alike on every device
(`data.partitioner`: iid, dirichlet with at least a few rows per part, or pathological).

The non-IID partitioners draw over groups: the label for labelled data; for instruction data
(`task='causal-lm'`, no label) the values of `data.group-column` when set, else `data.clusters`
topical clusters of the prompts (`edge_lam.data.groups`)."""

from __future__ import annotations

import functools
import warnings

import numpy as np

from edge_lam.config.run_config import ConfigError, RunConfig
from edge_lam.data.groups import column_groups, text_clusters
from edge_lam.data.text import Examples
from edge_lam.logs import get_logger
from edge_lam.models.families import family

log = get_logger()


def partition_indices(examples: Examples, cfg: RunConfig, partition_id: int,
                      num_partitions: int) -> list[int]:
    """Row indices of one device's partition (flwr-datasets partitioners, seeded)."""
    from datasets import Dataset
    from flwr_datasets.partitioner import IidPartitioner, PathologicalPartitioner

    if not 0 <= partition_id < num_partitions:
        raise ConfigError(f"partition-id={partition_id} is outside [0, {num_partitions})")
    if cfg.data.partitioner == "iid":
        ds = Dataset.from_dict({"row": list(range(len(examples)))})
        part = IidPartitioner(num_partitions)
        part.dataset = ds
        return list(part.load_partition(partition_id)["row"])
    ds = Dataset.from_dict({"row": list(range(len(examples))), "label": split_groups(examples,
                                                                                       cfg)})
    if cfg.data.partitioner == "dirichlet":
        return _dirichlet_rows(ds, cfg, partition_id, num_partitions)
    part = PathologicalPartitioner(num_partitions, "label", cfg.data.classes_per_device,
                                   class_assignment_mode="deterministic", seed=cfg.seed)
    part.dataset = ds
    return list(part.load_partition(partition_id)["row"])


def split_groups(examples: Examples, cfg: RunConfig) -> list[int]:
    """The group of each row that a non-IID split draws over (see the module's docstring)."""
    if examples.groups:
        return column_groups(examples.groups)
    if family(cfg).labelled and examples.labels:
        return list(examples.labels)
    return _clusters(tuple(examples.texts), cfg.data.clusters, cfg.seed)


@functools.lru_cache(maxsize=4)
def _clusters(texts: tuple[str, ...], k: int, seed: int) -> list[int]:
    groups = text_clusters(list(texts), k, seed)
    sizes = np.bincount(groups, minlength=k)
    log.info("data.partitioner over %d topical clusters of the prompts (data.clusters; "
             "sizes %s); set data.group-column to split by a column instead", k,
             "/".join(str(int(n)) for n in sizes))
    return groups


def _dirichlet_rows(ds, cfg: RunConfig, partition_id: int, num_partitions: int) -> list[int]:
    """A Dirichlet(alpha) partition whose every part has at least `m` rows, m = 10 where the
    data allows. Many partitions at a small alpha often leave some part below 10 rows, and
    flwr-datasets gives up after 10 draws: then m is halved (down to 1), on every device
    alike (the draws are seeded), before the run is refused with what to change."""
    from flwr_datasets.partitioner import DirichletPartitioner

    size = min(10, len(ds) // num_partitions)
    while True:
        part = DirichletPartitioner(num_partitions, "label", cfg.data.dirichlet_alpha,
                                    min_partition_size=size, seed=cfg.seed)
        part.dataset = ds
        try:
            with warnings.catch_warnings():  # its per-draw warnings: we handle the outcome
                warnings.simplefilter("ignore", UserWarning)
                return list(part.load_partition(partition_id)["row"])
        except ValueError as err:
            if size <= 1:
                raise ConfigError(
                    f"data.partitioner='dirichlet' could not give each of {num_partitions} "
                    f"devices a row at data.dirichlet-alpha={cfg.data.dirichlet_alpha:g} "
                    f"({len(ds)} rows): raise data.dirichlet-alpha, use fewer devices, or "
                    "data.partitioner='iid'") from err
            size = max(1, size // 2)
