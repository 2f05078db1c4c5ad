"""Bad configuration fails before any training, naming the key and the fix."""

import pytest

from edge_lam.training.evaluation import ServerModel
from edge_lam.config.run_config import ConfigError, RunConfig


def test_defaults_match_pyproject():
    import tomllib
    from pathlib import Path

    from flwr.common.config import flatten_dict

    raw = flatten_dict(tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
                       ["tool"]["flwr"]["app"]["config"])
    assert RunConfig.from_run_config(raw) == RunConfig()


def test_ranks_per_profile_and_overrides():
    cfg = RunConfig.from_run_config({"devices.rank.rpi4": 3, "devices.rank.phone": 6,
                                     "devices.mix": "rpi4,phone"})
    assert cfg.rank_for("rpi4") == 3 and cfg.rank_for("phone") == 6
    assert cfg.r_max == 16  # laptop keeps its default
    assert cfg.device_for(1) == "phone" and cfg.device_for(2) == "rpi4"
    assert cfg.rank_for("rpi4", explicit_rank=5) == 5
    assert cfg.lora_scaling == pytest.approx(16 / 16)
    fed = RunConfig.from_run_config({"strategy": "fedavg", "lora.fedavg-rank": 2})
    assert fed.rank_for("laptop") == 2 and fed.r_max == 2


@pytest.mark.parametrize("raw, key", [
    ({"strategy": "fedprox"}, "strategy"),
    ({"devices.rank.rpi4": 0}, "devices.rank.rpi4"),
    ({"lora.fedavg-rank": -2}, "lora.fedavg-rank"),
    ({"num-server-rounds": 0}, "num-server-rounds"),
    ({"fraction-train": 1.5}, "fraction-train"),
    ({"train.lr": "fast"}, "train.lr"),
    ({"data.partitioner": "zipf"}, "data.partitioner"),
    ({"task": "translation"}, "task"),
    ({"devices.mix": "rpi4,toaster"}, "devices.rank.toaster"),
    ({"lora.rnak": 4}, "lora.rnak"),
])
def test_bad_values_name_the_key(raw, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        RunConfig.from_run_config(raw)


def test_unknown_profile_and_explicit_rank_above_rmax():
    cfg = RunConfig()
    with pytest.raises(ConfigError, match="devices.rank.toaster"):
        cfg.rank_for("toaster")
    with pytest.raises(ConfigError, match="lora-rank=32"):
        cfg.rank_for("rpi4", explicit_rank=32)


def _cfg(model, data, **extra):
    raw = {"model": str(model), "data.path": str(data), "eval.max-examples": 50, **extra}
    return RunConfig.from_run_config(raw)


def test_unknown_target_module(tiny_bert, agnews):
    with pytest.raises(ConfigError, match="lora.target-modules: 'q_proj'.*choose among.*query"):
        ServerModel.prepare(_cfg(tiny_bert, agnews, **{"lora.target-modules": "q_proj"}))


def test_rank_above_layer_size(tiny_bert, agnews):
    # the tiny BERT's attention layers are 32 x 32
    with pytest.raises(ConfigError, match="rank 64 is above the size"):
        ServerModel.prepare(_cfg(tiny_bert, agnews, **{"devices.rank.laptop": 64}))


def test_missing_data_says_how_to_point_at_local_data(tiny_bert, tmp_path):
    # a data.path the user set is never replaced by the hub's data: it is named
    cfg = _cfg(tiny_bert, tmp_path / "nowhere", **{"data.hub-dataset": "no-such/dataset"})
    with pytest.raises(ConfigError, match="data.path='.*nowhere' does not exist"):
        ServerModel.prepare(cfg)
    # data.path='': the hub dataset, and when that fails too, how to point at local data
    cfg = _cfg(tiny_bert, "", **{"data.hub-dataset": "no-such/dataset"})
    with pytest.raises(ConfigError, match="Point data.path at a local folder"):
        ServerModel.prepare(cfg)


def test_folder_without_train_file(tiny_bert, tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ConfigError, match="no train.tsv"):
        ServerModel.prepare(_cfg(tiny_bert, tmp_path))


def test_unknown_columns(tiny_bert, agnews):
    with pytest.raises(ConfigError, match="data.label-column='topic'.*columns are text, label"):
        ServerModel.prepare(_cfg(tiny_bert, agnews, **{"data.label-column": "topic"}))
    with pytest.raises(ConfigError, match="data.text-column='body'"):
        ServerModel.prepare(_cfg(tiny_bert, agnews, **{"data.text-column": "body"}))


def test_missing_model_folder(agnews):
    with pytest.raises(ConfigError, match="not a folder"):
        ServerModel.prepare(_cfg("./no/such/model", agnews))


# ------------------------------------------------------------------ S4 unlearning and DP keys
def test_unlearning_rounds_and_private_steps():
    cfg = RunConfig.from_run_config({"strategy": "unlearn", "unlearn.clients": "3, 5",
                                     "num-server-rounds": 4, "unlearn.rounds": 2,
                                     "unlearn.recovery-rounds": 1, "train.local-steps": 10,
                                     "unlearn.grad-batches": 3})
    assert cfg.unlearn.clients == (3, 5) and cfg.aggregation == "hetlora"
    assert (cfg.training_rounds, cfg.total_rounds) == (4, 7)
    assert cfg.planned_private_steps == (4 + 1) * 10 + 2 * 3
    from_adapter = RunConfig.from_run_config({"strategy": "unlearn", "unlearn.clients": 3,
                                              "unlearn.from-adapter": "results/1/adapter"})
    assert from_adapter.training_rounds == 0 and from_adapter.unlearn.clients == (3,)
    fed = RunConfig.from_run_config({"strategy": "unlearn", "unlearn.clients": "1",
                                     "unlearn.aggregation": "fedavg", "lora.fedavg-rank": 4})
    assert fed.r_max == 4 and fed.rank_for("laptop") == 4


@pytest.mark.parametrize("raw, message", [
    ({"strategy": "unlearn"}, "needs unlearn.clients"),
    ({"unlearn.clients": "2"}, "unlearn.clients is set but strategy='hetlora'"),
    ({"strategy": "unlearn", "unlearn.clients": "a,b"}, r"unlearn\.clients='a,b'"),
    ({"strategy": "unlearn", "unlearn.clients": "1,1"}, "distinct"),
    ({"strategy": "unlearn", "unlearn.clients": "1", "unlearn.after-rounds": 0},
     "unlearn.from-adapter"),
    ({"strategy": "unlearn", "unlearn.clients": "1", "unlearn.loss": "kl"}, "unlearn.loss"),
    ({"dp.enabled": "yes"}, r"dp\.enabled must be true or false"),
    ({"dp.delta": 0.9}, r"dp\.delta"),
    ({"dp.max-grad-norm": 0}, r"dp\.max-grad-norm"),
])
def test_bad_unlearning_and_privacy_values(raw, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_run_config(raw)


# ------------------------------------------------------------------ one source for every key
def _pyproject_keys() -> dict:
    import tomllib
    from pathlib import Path

    from flwr.common.config import flatten_dict

    return flatten_dict(tomllib.loads((Path(__file__).parents[1] / "pyproject.toml")
                                      .read_text())["tool"]["flwr"]["app"]["config"])


def test_docs_pyproject_and_sections_declare_the_same_keys():
    """The docs' configuration reference holds what `edge-lam config --markdown` prints from
    the section dataclasses, and pyproject.toml has exactly the declared keys (Flower only
    overrides keys that exist there), each at the dataclass's default."""
    import importlib.util
    from pathlib import Path

    from edge_lam.cli.main import config_markdown, config_rows
    from edge_lam.config.options import format_default

    docs = Path(__file__).parents[1] / "docs"
    spec = importlib.util.spec_from_file_location("gen_pages", docs / "gen_pages.py")
    gen_pages = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen_pages)
    page = (docs / "reference" / "configuration.md").read_text()
    assert gen_pages.config_block(page) == config_markdown().strip(), \
        "docs/reference/configuration.md is stale: run `python docs/gen_pages.py`"
    declared = {k: d for _, rows in config_rows() for k, d, _ in rows if "<" not in k}
    dynamic = ("devices.rank.", "fedkd.task.")
    in_pyproject = {k: v for k, v in _pyproject_keys().items() if not k.startswith(dynamic)}
    assert set(in_pyproject) == set(declared)
    for key, value in in_pyproject.items():
        shown = format_default(tuple(value.split(",")) if "," in str(value) else value)
        assert shown.strip("`") == declared[key].strip("`") or \
            format_default(value) == declared[key], key


def test_results_files_of_earlier_releases_still_load():
    """config.json / edge_lam.json keep their flat field names; older files load back."""
    cfg = RunConfig.from_run_config({"strategy": "unlearn", "unlearn.clients": "3,5",
                                     "train.lr": 0.02, "devices.rank.phone": 6,
                                     "fedkd.lambda": 0.5})
    flat = cfg.to_dict()
    assert flat["unlearn_clients"] == [3, 5] and flat["lr"] == 0.02
    assert flat["fedkd_lambda"] == 0.5 and flat["profile_ranks"]["phone"] == 6
    assert flat["r_max"] == 16 and flat["fedkd_tasks"]["sst2"]["text_column"] == "sentence"
    assert RunConfig.from_dict(flat) == cfg


def test_a_renamed_key_keeps_working_with_a_deprecation_warning(monkeypatch):
    from edge_lam.config import run_config as config

    monkeypatch.setitem(config.RENAMED, "train.steps", "train.local-steps")
    with pytest.warns(FutureWarning, match="train.steps is deprecated: use train.local-steps"):
        cfg = RunConfig.from_run_config({"train.steps": 7})
    assert cfg.train.local_steps == 7
