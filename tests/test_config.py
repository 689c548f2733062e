"""Config loading: every user mistake gets one ConfigError naming the key."""

import json
import typing
from pathlib import Path

import pytest
import yaml

from grape_ds import config
from grape_ds.config import ConfigError, config_to_dict, load_config

DEMO = "yaml_configs/demo.yaml"


def _load(*overrides, world_size=2, path=DEMO):
    return load_config(path, list(overrides), world_size=world_size)


def test_demo_config_loads_and_resolves_batch_keys():
    cfg = _load()
    assert cfg.ds_config["train_batch_size"] == 8 * 2 * 2
    assert cfg.ds_config["train_micro_batch_size_per_gpu"] == 8
    assert cfg.ds_config["gradient_accumulation_steps"] == 2
    assert cfg.domain_names == [f"domain_{k}" for k in range(6)]
    # the resolved config round-trips through YAML into an equal config
    again = yaml.safe_load(yaml.safe_dump(config_to_dict(cfg)))
    assert again["train"]["max_steps"] == cfg.train.max_steps


def test_overrides_are_parsed_as_yaml():
    cfg = _load("train.max_steps=7", "train.warmup_steps=2", "mixture.weights=[1, 0, 0, 0, 0, 1]", "logging.progress=false")
    assert cfg.train.max_steps == 7
    assert cfg.mixture.weights == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert cfg.logging.progress is False


@pytest.mark.parametrize("override, fragment", [
    ("train.lrr=0.1", "unknown key train.lrr"),
    ("modle.n_layer=2", "unknown key modle"),
    ("train.max_steps=ten", "train.max_steps: expected an integer"),
    ("logging.progress=3", "logging.progress: expected true/false"),
    ("mixture.weights=[1, 1]", "mixture.weights: 2 weights for 6 domains"),
    ("mixture.weights=[1, 1, -1, 1, 1, 1]", "mixture.weights: weight of domain_2 is negative"),
    ("mixture.weights=[0, 0, 0, 0, 0, 0]", "mixture.weights: all weights are zero"),
    ("train.schedule=cosine", "train.schedule: unknown value 'cosine'; choose from ['linear_warmup_cosine'"),
    ("mixture.method=doremi", "mixture.method: unknown value 'doremi'; choose from ['static', 'grape'"),
    ("model.n_head=5", "model.n_head: 5 does not divide model.n_embd=128"),
    ("data.seq_len=512", "data.seq_len: 512 exceeds model.n_positions=128"),
    ("mixture.floor=0.2", "mixture.floor"),
    ("model.attn_implementation=flash", "model.attn_implementation: unknown value 'flash'; choose from ['sdpa', 'eager']"),
    ("model.vocab_size=0", "model.vocab_size: must be > 0"),
])
def test_config_errors_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as err:
        _load(override)
    assert fragment in str(err.value)


def test_unknown_key_in_yaml_file(tmp_path):
    raw = yaml.safe_load(open(DEMO))
    raw["train"]["warmpu_steps"] = 3
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"unknown key train.warmpu_steps.*did you mean 'warmup_steps'"):
        load_config(path, world_size=2)


def test_missing_data_path_is_named(tmp_path):
    raw = yaml.safe_load(open(DEMO))
    raw["data"].pop("planted")
    raw["data"]["domains"] = [{"name": "web", "source": {"type": "jsonl", "path": str(tmp_path / "nope.jsonl")}}]
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"data.domains\[0\].source.path: path does not exist: .*nope.jsonl"):
        load_config(path, world_size=2)


def test_batch_arithmetic_must_match_deepspeed_json(tmp_path):
    ds = json.load(open("ds_configs/zero2_fp32.json"))
    ds["train_batch_size"] = 32
    ds_path = tmp_path / "ds.json"
    ds_path.write_text(json.dumps(ds))
    ok = _load(f"deepspeed.config={ds_path}", world_size=2)  # 8 x 2 x 2 = 32
    assert ok.ds_config["train_batch_size"] == 32
    with pytest.raises(ConfigError) as err:
        _load(f"deepspeed.config={ds_path}", world_size=4)
    msg = str(err.value)
    assert "train_batch_size=32" in msg and "world size (4)" in msg and "train_batch_size=64" in msg


def test_deepspeed_json_must_not_bring_its_own_optimizer(tmp_path):
    ds = json.load(open("ds_configs/zero2_fp32.json"))
    ds["optimizer"] = {"type": "Adam", "params": {"lr": 1e-3}}
    ds_path = tmp_path / "ds.json"
    ds_path.write_text(json.dumps(ds))
    with pytest.raises(ConfigError, match="'optimizer' section"):
        _load(f"deepspeed.config={ds_path}")


def test_missing_deepspeed_json():
    with pytest.raises(ConfigError, match="deepspeed.config: DeepSpeed JSON not found"):
        _load("deepspeed.config=ds_configs/none.json")


@pytest.mark.parametrize("path", ["ds_configs/zero2_fp32.json", "ds_configs/zero2_bf16.json",
                                  "ds_configs/zero2_offload.json"])
def test_shipped_deepspeed_configs_validate(path):
    cfg = _load(f"deepspeed.config={path}")
    assert cfg.ds_config["zero_optimization"]["stage"] == 2


def test_config_methods_match_the_controller():
    from grape_ds.config import METHODS
    from grape_ds.controller import METHOD_FNS
    assert tuple(METHOD_FNS) == METHODS


@pytest.mark.parametrize("override, fragment", [
    ("probe.estimator=dense", r"probe.estimator: unknown value 'dense'; choose from \['sketch', 'exact'\]"),
    ("mixture.form=paper", r"mixture.form: unknown value 'paper'; choose from \['research', 'alignment'\]"),
])
def test_probe_and_form_errors(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        _load(override)


def test_inband_probe_needs_domain_pure_batches():
    with pytest.raises(ConfigError, match="probe.domains: inband domain gradients need mixture.batch=domain_pure"):
        _load("mixture.method=grape", "mixture.every=10", "mixture.batch=mixed")
    assert _load("mixture.method=grape", "mixture.every=10", "mixture.batch=mixed", "probe.domains=probe")


def test_string_overrides_keep_their_text():
    cfg = _load("logging.run_name=off", "data.tokenizer.name=null")
    assert cfg.logging.run_name == "off" and cfg.data.tokenizer.name is None
    assert _load("logging.run_name='123'").logging.run_name == "123"


@pytest.mark.parametrize("ds_json", sorted(p.name for p in Path("ds_configs").glob("*.json")))
def test_every_shipped_deepspeed_json_is_valid(ds_json):
    cfg = _load(f"deepspeed.config=ds_configs/{ds_json}")
    assert cfg.ds_config["zero_optimization"]["stage"] == 2


@pytest.mark.parametrize("sections, fragment", [
    ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, "enables both fp16 and bf16"),
    ({"torch_autocast": {"enabled": True, "dtype": "bfloat16"}, "bf16": {"enabled": True}},
     "enables torch_autocast together with fp16/bf16"),
])
def test_conflicting_precisions_are_refused(tmp_path, sections, fragment):
    ds = json.load(open("ds_configs/zero2_fp32.json"))
    ds.update(sections)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    with pytest.raises(ConfigError, match=fragment):
        _load(f"deepspeed.config={path}")


@pytest.mark.parametrize("override, choices", [
    ("mixture.batch=pure", "['domain_pure', 'mixed']"),
    ("probe.domains=band", "['inband', 'probe']"),
    ("model.attn_implementation=null", "['sdpa', 'eager']"),
])
def test_a_choice_field_lists_its_choices(override, choices):
    key, value = override.split("=")
    with pytest.raises(ConfigError) as err:
        _load(override)
    assert str(err.value).startswith(f"{key}: ") and f"choose from {choices}" in str(err.value)


def test_a_close_miss_gets_a_did_you_mean():
    with pytest.raises(ConfigError, match=r"mixture.method: unknown value 'Grape'; .* \(did you mean 'grape'\?\)"):
        _load("mixture.method=Grape")


def test_a_source_type_and_benchmark_are_choices(tmp_path):
    raw = yaml.safe_load(open(DEMO))
    raw["data"].pop("planted")
    raw["data"]["domains"] = [{"name": "web", "source": {"type": "jsnol", "path": "x.jsonl"}}]
    (path := tmp_path / "exp.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"data.domains\[0\].source.type: unknown value 'jsnol'; choose from "
                       r"\['jsonl', .*'benchmark'\] \(did you mean 'jsonl'\?\)"):
        load_config(path, world_size=2)
    raw["data"]["domains"][0]["source"] = {"type": "benchmark"}
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"data.domains\[0\].source.benchmark: a benchmark source needs a "
                       r"benchmark; choose from \['logiqa'"):
        load_config(path, world_size=2)


@pytest.mark.parametrize("section, key, constant", [
    (config.MixtureConfig, "method", "METHODS"), (config.MixtureConfig, "form", "FORMS"),
    (config.MixtureConfig, "batch", "BATCH_MODES"), (config.ProbeConfig, "estimator", "ESTIMATORS"),
    (config.ProbeConfig, "domains", "DOMAIN_SOURCES"), (config.TrainConfig, "schedule", "SCHEDULES"),
    (config.ModelConfig, "attn_implementation", "ATTENTION"), (config.SourceConfig, "type", "SOURCE_TYPES"),
    (config.SourceConfig, "benchmark", "BENCHMARKS"),
])
def test_choice_constants_are_the_fields_literal_types(section, key, constant):
    tp = typing.get_type_hints(section)[key]
    literal = next(a for a in (typing.get_args(tp) if typing.get_origin(tp) is not typing.Literal else (tp,))
                   if a is not type(None))
    assert getattr(config, constant) == typing.get_args(literal)
    assert getattr(section(), key) in getattr(config, constant) + (None,)  # the default is a choice
    assert set(config.CORPUS_TYPES) < set(config.SOURCE_TYPES)


def test_paths_are_resolved_apart_from_the_checks(tmp_path, monkeypatch):
    """The checks rewrite nothing; resolve_paths makes the local paths absolute (not globs, not hub ids), and
    a resolved config written out and read back is the same config (what an exact resume relies on)."""
    repo = Path.cwd()
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    monkeypatch.chdir(tmp_path)
    raw = yaml.safe_load(open(repo / DEMO))
    raw["data"].pop("planted")
    raw["data"]["domains"] = [{"name": "a", "source": {"type": "jsonl", "path": "a.jsonl"}},
                              {"name": "b", "source": {"type": "jsonl", "path": "*.jsonl"}},
                              {"name": "c", "source": {"type": "climblab", "subset": 3}}]
    raw["data"]["tasks"] = [{"name": "t", "source": {"type": "benchmark", "benchmark": "piqa"}}]
    raw["data"]["tokenizer"]["name"] = "gpt2"
    raw["deepspeed"]["config"] = str(repo / "ds_configs/zero2_fp32.json")
    (path := tmp_path / "exp.yaml").write_text(yaml.safe_dump(raw))
    cfg = config._build(config.Config, yaml.safe_load(path.read_text()), "")
    cfg.check()
    config.cross_check(cfg, 2)
    assert cfg.data.domains[0].source.path == "a.jsonl" and cfg.logging.output_dir == "runs"
    config.resolve_paths(cfg)
    src = [d.source for d in cfg.data.domains]
    assert src[0].path == str(tmp_path / "a.jsonl") and src[1].path == "*.jsonl" and src[2].subset == "3"
    assert cfg.data.tokenizer.name == "gpt2" and cfg.logging.output_dir == str(tmp_path / "runs")
    loaded = load_config(path, world_size=2)
    assert config_to_dict(loaded) == config_to_dict(cfg)
    (again := tmp_path / "config.yaml").write_text(yaml.safe_dump(config_to_dict(loaded), sort_keys=False))
    assert config_to_dict(load_config(again, world_size=2)) == config_to_dict(loaded)


@pytest.mark.parametrize("override, fragment", [
    ("nope=1", "--set nope: unknown key nope"),
    ("num_domainz=4", "--set num_domainz: unknown key num_domainz (did you mean 'num_domains'?)"),
    ("num_domains=four", "num_domains: expected an integer, got 'four'"),
    ("num_tasks=1", "num_tasks: must be >= 2"),
])
def test_ground_truth_set_errors_name_the_key(capsys, override, fragment):
    from grape_ds.cli import main
    assert main(["ground-truth", "--set", override]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and fragment in err


def test_ground_truth_set_reaches_the_generator(capsys):
    from grape_ds.cli import main
    assert main(["ground-truth", "--set", "num_domains=4", "--set", "num_tasks=2"]) == 0
    truth = json.loads(capsys.readouterr().out)
    assert truth["domains"] == [f"domain_{k}" for k in range(4)] and len(truth["tasks"]) == 2
