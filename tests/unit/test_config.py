import pytest

from components.config import ConfigError, load_config, parse_cli


def test_defaults_yaml_and_overrides_in_order(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("preprocess:\n  kcore: 3\ndata:\n  seed: 7\n")
    cfg = load_config(["preprocess.kcore=10"], y)
    assert cfg.preprocess.kcore == 10  # command line beats YAML
    assert cfg.data.seed == 7  # YAML beats defaults
    assert cfg.preprocess.split == "loo"  # default


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="preprocess.kcoree"):
        load_config(["preprocess.kcoree=3"])


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match="kcore"):
        load_config(["preprocess.kcore=abc"])


def test_invalid_values_are_rejected():
    with pytest.raises(ConfigError, match="data.source"):
        load_config(["data.source=netflix"])
    with pytest.raises(ConfigError, match="data.path"):
        load_config(["data.source=movielens"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(["kcore"])
    with pytest.raises(ConfigError, match="train.placement_strategy must be PACK, SPREAD"):
        load_config(["train.placement_strategy=spread-out"])
    assert load_config(["train.placement_strategy=SPREAD"]).train.placement_strategy == "SPREAD"
    with pytest.raises(ConfigError, match="retriever.loss must be auto, softmax or sampled"):
        load_config(["retriever.loss=full"])
    assert load_config([]).retriever.loss == "auto"  # softmax or sampled by catalog size, when the model is built
    with pytest.raises(ConfigError, match="train.retriever_workers and train.cpus_per_worker must be >= 0"):
        load_config(["train.cpus_per_worker=-1"])
    with pytest.raises(ConfigError, match="train.collective_timeout_s must be >= 1 second"):
        load_config(["train.collective_timeout_s=0"])
    with pytest.raises(ConfigError, match="evaluate.max_users must be >= 1"):
        load_config(["evaluate.max_users=0"])
    assert load_config(["evaluate.max_users=1000"]).evaluate.max_users == 1000
    assert load_config([]).evaluate.max_users is None  # every user by default


def test_cli_config_flag_and_missing_file(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("preprocess:\n  split: temporal\n")
    assert parse_cli(["--config", str(y)]).preprocess.split == "temporal"
    with pytest.raises(ConfigError, match="not found"):
        parse_cli(["--config", str(tmp_path / "nope.yaml")])


def test_repo_yaml_configs_load():
    from pathlib import Path

    from omegaconf import OmegaConf

    def leaves(node, prefix=""):  # ("train.retriever.epochs", 40), ...: every setting the file makes
        for key, value in node.items():
            if isinstance(value, dict):
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    loaded = []
    for path in sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml")):
        if path.name.startswith("serve"):
            continue
        overrides = ["data.path=/x"] if "synthetic" not in path.name and "default" not in path.name else []
        cfg = load_config(overrides, path)
        settings = dict(leaves(OmegaConf.to_container(OmegaConf.load(path))))
        assert settings, f"{path.name} sets nothing"
        for key, value in settings.items():  # every key of the file took effect, unchanged (key=value aside)
            if key != "data.path" or not overrides:
                got = OmegaConf.select(cfg, key)
                got = OmegaConf.to_container(got) if OmegaConf.is_config(got) else got
                assert got == value, f"{path.name}: {key} = {got!r}, the file says {value!r}"
        loaded.append(path.stem)
    assert {"amazon", "movielens", "mind", "synthetic"} <= set(loaded)  # the data presets parse_cli applies


def test_unknown_lr_schedule_is_refused_at_load_time():
    with pytest.raises(ConfigError, match="train.retriever.schedule"):
        load_config(["train.retriever.schedule=linear"], None)
    assert load_config(["train.retriever.schedule=constant"], None).train.retriever.schedule == "constant"


def test_data_source_applies_its_preset_unless_a_config_is_given(tmp_path):
    cfg = parse_cli(["data.source=amazon", "data.path=/x", "preprocess.kcore=5"])
    assert cfg.retriever.max_len == 50 and cfg.train.retriever.patience == 30  # configs/amazon.yaml
    assert cfg.preprocess.kcore == 5 and cfg.data.path == "/x"  # key=value still wins
    y = tmp_path / "mine.yaml"
    y.write_text("retriever:\n  max_len: 77\n")
    assert parse_cli(["--config", str(y), "data.source=amazon", "data.path=/x"]).retriever.max_len == 77
    assert parse_cli(["data.source=files", "data.path=/x"]).retriever.max_len == 200  # no preset: defaults


def test_hardware_presets_merge_over_the_data_preset_and_under_key_values():
    from components.config import hardware_presets

    assert hardware_presets() == ["cpu", "gpu-1", "gpu-cluster", "tiny"]
    for name in hardware_presets():  # each loads over every data preset's keys
        parse_cli(["--preset", name, "data.source=movielens", "data.path=/x"])
    cfg = parse_cli(["data.source=movielens", "data.path=/x", "--preset", "gpu-1", "train.num_workers=3"])
    assert cfg.retriever.max_len == 200  # from configs/movielens.yaml
    assert cfg.train.use_gpu and cfg.train.precision == "bf16"  # from configs/hardware/gpu-1.yaml
    assert cfg.train.num_workers == 3  # key=value last
    assert parse_cli(["--preset", "gpu-cluster"]).retriever.loss == "sampled"  # an explicit loss stays
    cfg = parse_cli(["--preset=tiny", "--preset", "cpu"])  # in order: tiny, then cpu
    assert cfg.retriever.dim == 32 and cfg.train.precision == "fp32"
    with pytest.raises(ConfigError, match="unknown preset 'gpu-8'; choose from cpu, gpu-1, gpu-cluster, tiny"):
        parse_cli(["--preset", "gpu-8"])
    with pytest.raises(ConfigError, match="--preset needs a name"):
        parse_cli(["--preset"])


def test_unknown_keys_name_the_closest_valid_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key: retriever\.dimm; did you mean retriever\.dim\b"):
        load_config(["retriever.dimm=64"])
    with pytest.raises(ConfigError, match=r"retreiver\.dim; did you mean retriever\.dim\b"):  # a misspelt section
        load_config(["retreiver.dim=64"])
    with pytest.raises(ConfigError, match=r"unknown config key: dim; did you mean ranker\.dim, retriever\.dim\?"):
        load_config(["dim=64"])  # the section left out: matched by the setting's own name
    y = tmp_path / "c.yaml"
    y.write_text("train:\n  retreiver:\n    epochs: 3\n")
    with pytest.raises(ConfigError, match=r"train\.retreiver; did you mean train\.retriever\b"):
        load_config([], y)
    with pytest.raises(ConfigError, match="unknown config key: zzzz; --help lists the valid keys"):
        load_config(["zzzz=1"])
