"""Every config key is discoverable from --help, and near misses get a "did you mean".

The help is built from the dataclasses' field metadata and docstrings (int_lm/config.py),
so this checks each field against what ``python train.py --help`` prints: its option,
type, default (after the config file) and one-line meaning.
"""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from int_lm import config as C

ROOT = Path(__file__).resolve().parent.parent


def help_of(script: str, *args: str) -> str:
    env = dict(os.environ, COLUMNS="100")
    p = subprocess.run([sys.executable, script, "--help", *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""
    return p.stdout


def flat(text: str) -> str:
    """Whitespace normalised: a wrapped meaning reads as one line again."""
    return " ".join(text.split())


def fields_of(section: str):
    cls = C._section_types()[section]
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def test_every_field_has_a_one_line_meaning():
    for section in C.SECTIONS:
        assert C.section_meaning(section), section
        for f, _ in fields_of(section):
            meaning = f.metadata.get("help", "")
            assert meaning and "\n" not in meaning and len(meaning) <= 200, f"{section}.{f.name}: {meaning!r}"


@pytest.mark.parametrize("config", [None, "tiny"])
def test_train_help_lists_every_key_with_type_default_and_meaning(config):
    out = flat(help_of("train.py", *(["--config", config] if config else [])))
    source = f"configs/{config}.toml" if config else "configs/default.toml"     # train.py's default --config
    cfg = C.load_file(source)
    assert f"Defaults are after {source}" in out
    for section in C.SECTIONS:
        assert flat(f"[{section}] {C.section_meaning(section)}") in out, section
        for f, kind in fields_of(section):
            value = getattr(getattr(cfg, section), f.name)
            entry = flat(f"--{section}.{f.name} {C.TYPE_NAMES[kind]} {C.format_value(value)} "
                         f"{f.metadata['help']}")
            assert entry in out, entry
            if value != f.default:                 # a key the file sets shows the built-in default too
                assert flat(f"{f.metadata['help']} [built-in: {C.format_value(f.default)}]") in out
    if config == "tiny":
        assert "--train.steps INT 20 " in out and "[built-in: 200]" in out


def test_eval_help_lists_the_data_keys_only():
    out = flat(help_of("eval.py"))
    assert "eval.py takes only the [data] keys" in out
    for f, kind in fields_of("data"):
        assert flat(f"--data.{f.name} {C.TYPE_NAMES[kind]} {f.metadata['help']}") in out, f.name
    for section in C.SECTIONS:
        if section != "data":
            assert not re.search(rf"--{section}\.\w", out), section


def run(script: str, *argv: str, capsys) -> tuple[int, str]:
    import importlib.util
    spec = importlib.util.spec_from_file_location(script.removesuffix(".py") + "_under_test", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    status = module.main(list(argv))
    err = capsys.readouterr().err
    return status, err


@pytest.mark.parametrize("argv, words", [
    (["--model.widht", "64"], ["unknown config key model.widht", "did you mean model.width?", "known keys of [model]",
                               "--help lists every key"]),
    (["--model.population", "64"], ["unknown config key model.population", "did you mean es.population?"]),
    (["--trian.steps", "3"], ["unknown config section [trian]", "did you mean [train]?", "known sections"]),
    (["--optimizer.rule", "x"], ["unknown config section [optimizer]", "did you mean es.optimizer"]),
    (["--steps", "3"], ["unknown option --steps", "did you mean --train.steps?", "train.py --help"]),
    (["--confg", "tiny"], ["unknown option --confg", "did you mean --config?"]),
    (["--es.optimizer", "momentom"], ["es.optimizer must be one of sign, momentum", "'momentom'",
                                      "did you mean momentum?"]),
    (["--data.split_mode", "contigous"], ["data.split_mode must be", "did you mean contiguous?"]),
    (["--model.width", "wide"], ["model.width must be an integer, got 'wide'"]),
    (["--train.progress", "--debug"], ["--train.progress needs a value"]),
])
def test_config_errors_are_one_line_with_did_you_mean(argv, words, capsys):
    status, err = run("train.py", *argv, capsys=capsys)
    lines = [l for l in err.splitlines() if l.strip()]
    assert status == 2, err
    assert lines[-1].startswith("error: "), err
    if "--debug" not in argv:
        assert len(lines) == 1, err
    for w in words:
        assert w in lines[-1], (w, lines[-1])


def test_eval_refuses_other_sections_and_suggests_data_keys(capsys):
    status, err = run("eval.py", "some_run", "--model.width", "64", capsys=capsys)
    assert status == 2 and "eval.py takes only --data.KEY overrides; remove --model.width" in err
    status, err = run("eval.py", "some_run", "--data.sourc", "x", capsys=capsys)
    assert status == 2 and "did you mean data.source?" in err
    status, err = run("eval.py", "--step", "x", "some_run", capsys=capsys)
    assert status == 2 and err.count("\n") == 1 and "argument --step: invalid int value: 'x'" in err
