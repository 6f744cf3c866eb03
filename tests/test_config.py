"""int_lm/config.py: the layering (built-in <- file <- command line), value coercion, the
TOML round trip a run directory's saved config depends on, and validation messages that
name the key. (--help and the one-line error at the entry points: tests/test_help.py and
tests/test_errors.py; random inputs: tests/test_fuzz.py.)"""
import dataclasses
import tomllib
from pathlib import Path

import pytest

from int_lm import config as C

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted((ROOT / "configs").glob("*.toml"))


def test_defaults_then_file_then_command_line(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('[model]\nwidth = 32\n[es]\npopulation = 64\noptimizer = "momentum"\n')
    cfg, rest = C.resolve(str(f), ["--es.population", "128", "--train.seed=7", "--config-like", "x"])
    assert (cfg.model.width, cfg.es.optimizer) == (32, "momentum")        # the file over the defaults
    assert (cfg.es.population, cfg.train.seed) == (128, 7)                # the command line over the file
    assert rest == ["--config-like", "x"]                                 # not a --section.key: left alone
    untouched = dataclasses.replace(C.Config(), model=dataclasses.replace(C.Config().model, width=32),
                                    es=dataclasses.replace(C.Config().es, population=128, optimizer="momentum"),
                                    train=dataclasses.replace(C.Config().train, seed=7))
    assert cfg == untouched
    assert C.explicit_values(str(f), C.parse_overrides(["--es.population", "128"])[0]) == {
        "model": {"width": 32}, "es": {"population": "128", "optimizer": "momentum"}}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_validates_and_round_trips_through_toml(path):
    cfg = C.validate(C.load_file(path))
    assert C.from_dict(tomllib.loads(C.to_toml(cfg))) == cfg
    assert C.find_file(path.stem) == path                                 # by name, as --config tiny


def test_strings_survive_the_round_trip():
    odd = 'C:\\data\\"quoted" \u00e9\u4e2d \t tab \x7f del'
    cfg = C.apply_values(C.Config(), {"data": {"source": odd}, "train": {"run_dir": "runs/a b"}}, "test")
    assert C.from_dict(tomllib.loads(C.to_toml(cfg))) == cfg


@pytest.mark.parametrize("key,value,want", [
    ("es.population", "0x10", 16), ("es.population", 64.0, 64), ("es.population", "2048", 2048),
    ("es.lr", "1e-3", 0.001), ("es.lr", 2, 2.0),
    ("model.tie_head", "yes", True), ("model.tie_head", "FALSE", False), ("model.tie_head", "0", False),
    ("data.source", 5, "5"),
])
def test_values_are_coerced_to_the_field_type(key, value, want):
    section, name = key.split(".")
    got = getattr(getattr(C.apply_values(C.Config(), {section: {name: value}}, "test"), section), name)
    assert got == want and type(got) is type(want)


@pytest.mark.parametrize("key,value,words", [
    ("es.population", "3.5", "es.population must be an integer"),
    ("es.population", True, "es.population must be an integer"),
    ("es.lr", "nan", "es.lr must be a finite number"),
    ("es.lr", "fast", "es.lr must be a number"),
    ("model.tie_head", "maybe", "model.tie_head must be true or false"),
    ("data.source", ["a"], "data.source must be a string"),
    ("es.popluation", "8", "did you mean es.population"),
    ("model.population", "8", "did you mean es.population"),
])
def test_bad_values_and_keys_name_the_key(key, value, words):
    section, name = key.split(".")
    with pytest.raises(C.ConfigError, match=words):
        C.apply_values(C.Config(), {section: {name: value}}, "test")


def test_parse_overrides_forms_and_missing_values():
    values, rest = C.parse_overrides(["--es.lr", "-0.5", "--model.width=48", "run", "--train.run_dir=--x",
                                      "--data.source", "--8"])
    assert values == {"es": {"lr": "-0.5"}, "model": {"width": "48"}, "train": {"run_dir": "--x"},
                      "data": {"source": "--8"}}
    assert rest == ["run"]
    for argv in (["--es.lr"], ["--es.lr", "--model.width", "8"], ["--es.lr", "--help"]):
        with pytest.raises(C.ConfigError, match="--es.lr needs a value"):
            C.parse_overrides(argv)


@pytest.mark.parametrize("key,value,words", [
    ("model.width", 30, "model.width must be a multiple of 4"),
    ("es.population", 7, "es.population must be even"),
    ("es.group_size", 3, "es.group_size"),
    ("es.rank", 99, "es.rank must be in"),
    ("es.sigma_shift", 13, "es.sigma_shift must be in"),
    ("es.fitness_levels", 16, "es.fitness_levels must be in"),
    ("es.optimizer", "momentun", "did you mean momentum"),
    ("es.chunk_size", 6, "es.chunk_size must be even"),
    ("data.split_mode", "contigous", "did you mean contiguous"),
    ("data.val_fraction", 0.99, "data.val_fraction"),
    ("train.seed", 2 ** 32, "train.seed must be in"),
    ("train.keep_checkpoints", 0, "train.keep_checkpoints must be >= 1"),
])
def test_validate_names_the_key_and_the_range(key, value, words):
    section, name = key.split(".")
    cfg = C.apply_values(C.load_file("tiny"), {section: {name: value}}, "test")
    with pytest.raises(C.ConfigError, match=words):
        C.validate(cfg)


def test_a_missing_file_names_the_shipped_configs(tmp_path):
    with pytest.raises(C.ConfigError, match=r"does not exist.*default, .*tiny"):
        C.find_file(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nwidth = 3")
    with pytest.raises(C.ConfigError, match="not valid TOML"):
        C.load_file(bad)
