"""Typed run configuration: dataclasses, TOML files, ``--section.key value`` overrides.

A config is data: four frozen sections (model, es, data, train) plus ``dist`` for
multi-process runs. Files in ``configs/`` set any subset of keys; the command line
overrides single keys; :func:`validate` rejects bad values at the edge with one
message that names the key and the fix.
"""
from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from int_lm.errors import UserError


class ConfigError(UserError, ValueError):
    """A user-fixable problem with the configuration (message names key and fix)."""


@dataclass(frozen=True)
class ModelConfig:
    layers: int = 2
    width: int = 128
    # vocab_size and boundary_token come from the tokenizer; set here only to
    # build a model without data (tests, benchmarks).
    vocab_size: int = 256
    boundary_token: int = 0


@dataclass(frozen=True)
class ESConfig:
    population: int = 512          # N, even: N/2 antithetic pairs
    rank: int = 1                  # r of each matrix perturbation
    sigma_shift: int = 4           # sigma = 2^-sigma_shift
    alpha: float = 4.0             # alpha0: > 1 decays over alpha_horizon, <= 1 constant
    alpha_horizon: int = 1000      # T of the alpha schedule, in steps
    group_size: int = 2            # members that read the same sequence
    tokens_per_update: int = 100   # tokens each member reads per step
    chunk_size: int = 0            # members evaluated at once; 0 = whole population
    noise_reuse: int = 1           # steps that share one noise draw
    optimizer: str = "sign"        # update rule (int_lm/optim): "sign" = the paper's thresholded +-1 vote
    fitness_levels: int = 1        # 1: F = sign of each pair's difference (published); L > 1: signed ranks in [-L, L]
    momentum_shift: int = 2        # momentum rule: m <- m - m / 2^beta + vote (0: no momentum)
    master_bits: int = 8           # momentum rule: fraction bits of the int16 master weights below the int8 weight
    lr: float = 0.4                # momentum rule: int8 units per step for a momentum one std from zero
    lr_power: float = 0.5          # momentum rule: lr_t = lr * alpha_t ^ lr_power (decays with the alpha schedule)


@dataclass(frozen=True)
class DataConfig:
    source: str = "stdlib"         # "stdlib", a local path/dir/glob, or "hf:NAME"/hub name
    tokenizer: str = "bytes"       # "bytes" or a tiktoken encoding name
    bpe_merges: int = 0            # K: keep BPE ranks < K (0 = the whole encoding)
    encoding_file: str = ""        # explicit local .tiktoken file
    text_column: str = "text"      # column with the text in json/csv/parquet/hub data
    hub_config: str = ""           # the hub dataset's config name, if any
    separator: str = ""            # split plain-text files into documents on this string
    cache_dir: str = ""            # tokenised shards; "" = ~/.cache/int_lm
    val_fraction: float = 0.05     # share of documents in validation (no own splits)
    test_fraction: float = 0.05
    val_tokens: int = 8192         # validation slice length per evaluation
    trust_remote_code: bool = False
    split_mode: str = "auto"       # "hash" (by document), "contiguous" (byte fractions in order), "auto"
    max_docs: int = 0              # use only the first N documents (0 = all; tests, quick runs)
    data_files: str = ""           # files for a datasets loader source such as "hf:json": "GLOB" or "train=GLOB;validation=GLOB"
    hub_eval_bytes: int = 16_000_000  # cap on text materialised for validation/test of a streamed corpus


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 200
    seed: int = 0
    run_dir: str = "runs/default"
    eval_every: int = 10
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    resume_from: int = -1          # -1 = latest checkpoint in run_dir, if any
    progress: bool = True


@dataclass(frozen=True)
class DistConfig:
    coordinator_address: str = ""
    num_processes: int = 1
    process_id: int = 0


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    es: ESConfig = field(default_factory=ESConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)


SECTIONS = {f.name: f.type for f in fields(Config)}


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {name: hints[name] for name in SECTIONS}


def _coerce(key: str, value: Any, kind: type) -> Any:
    """Convert a TOML or command-line value to the field's type, or raise ConfigError."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value, 0)
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if kind is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be a number, got {value!r}") from None
        if not math.isfinite(out):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return out
    if kind is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {kind}")


def apply_values(cfg: Config, values: dict[str, dict[str, Any]], origin: str) -> Config:
    """Return ``cfg`` with ``{section: {key: value}}`` applied; unknown keys are errors."""
    types = _section_types()
    updates = {}
    for section, entries in values.items():
        if section not in types:
            raise ConfigError(
                f"unknown config section [{section}] in {origin}; known sections: {', '.join(types)}"
            )
        if not isinstance(entries, dict):
            raise ConfigError(f"[{section}] in {origin} must be a table of key = value")
        sec_cls = types[section]
        sec_hints = typing.get_type_hints(sec_cls)
        current = getattr(cfg, section)
        changes = {}
        for key, value in entries.items():
            if key not in sec_hints:
                known = ", ".join(sec_hints)
                raise ConfigError(f"unknown config key {section}.{key} in {origin}; known keys: {known}")
            changes[key] = _coerce(f"{section}.{key}", value, sec_hints[key])
        updates[section] = replace(current, **changes)
    return replace(cfg, **updates)


REPO_ROOT = Path(__file__).resolve().parent.parent


def find_file(path: str | Path) -> Path:
    """The config file ``path`` names: as given, else the repository's ``configs/`` file of that name.

    A relative path that is not found from the working directory is looked up
    relative to the repository (``configs/default.toml`` works from anywhere),
    then as a name in ``configs/`` (``tiny``, ``tiny.toml``).
    """
    path = Path(path)
    if path.is_file():
        return path
    configs = REPO_ROOT / "configs"
    candidates = []
    if not path.is_absolute():
        candidates.append(REPO_ROOT / path)
    if path.parent == Path(".") or path.parent.name == "configs":
        candidates += [configs / path.name, configs / (path.name + ".toml")]
    for c in candidates:
        if c.is_file():
            return c
    if path.exists():
        raise ConfigError(f"config file {path} is not a file; pass a TOML file or a name from configs/")
    raise ConfigError(f"config file {path} does not exist; pass a path or a name from configs/ "
                      f"({', '.join(sorted(p.stem for p in configs.glob('*.toml')))})")


def load_file(path: str | Path, cfg: Config | None = None) -> Config:
    """Apply a TOML config file on top of ``cfg`` (default: built-in defaults)."""
    cfg = cfg or Config()
    path = find_file(path)
    try:
        values = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} is not valid TOML ({err}); fix the syntax") from None
    except OSError as err:
        raise ConfigError(f"cannot read config file {path} ({err.strerror}); fix its permissions") from None
    return apply_values(cfg, values, str(path))


def parse_overrides(argv: list[str]) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Split ``--section.key value`` (or ``--section.key=value``) pairs from other arguments."""
    values: dict[str, dict[str, str]] = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--") and "." in arg.split("=", 1)[0]:
            name, eq, val = arg[2:].partition("=")
            if not eq:
                if i + 1 >= len(argv):
                    raise ConfigError(f"--{name} needs a value")
                val = argv[i + 1]
                i += 1
            section, _, key = name.partition(".")
            values.setdefault(section, {})[key] = val
        else:
            rest.append(arg)
        i += 1
    return values, rest


def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(cfg)


def from_dict(values: dict[str, dict[str, Any]]) -> Config:
    return apply_values(Config(), values, "saved config")


def to_toml(cfg: Config) -> str:
    lines = []
    for section, entries in to_dict(cfg).items():
        lines.append(f"[{section}]")
        for key, value in entries.items():
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, str):   # a TOML basic string: JSON's escapes, plus DEL
                text = json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
            else:
                text = repr(value)
            lines.append(f"{key} = {text}")
        lines.append("")
    return "\n".join(lines)


MAX_VOCAB = 65536
MAX_WIDTH = 1024


def validate(cfg: Config) -> Config:
    """Raise ConfigError naming the key and the fix for any invalid value."""
    m, es, d, t = cfg.model, cfg.es, cfg.data, cfg.train

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    need(m.layers >= 1, f"model.layers must be >= 1, got {m.layers}")
    need(8 <= m.width <= MAX_WIDTH and m.width % 4 == 0,
         f"model.width must be a multiple of 4 in [8, {MAX_WIDTH}], got {m.width}")
    if m.vocab_size > MAX_VOCAB and d.tokenizer.strip() not in ("bytes", "byte"):
        raise ConfigError(f"data.tokenizer {d.tokenizer} with data.bpe_merges={d.bpe_merges} gives a vocabulary of "
                          f"{m.vocab_size} tokens, more than the model supports ({MAX_VOCAB}); set "
                          f"data.bpe_merges to a K in [256, {MAX_VOCAB - 1}]")
    need(2 <= m.vocab_size <= MAX_VOCAB, f"model.vocab_size must be in [2, {MAX_VOCAB}], got {m.vocab_size}")
    need(0 <= m.boundary_token < m.vocab_size,
         f"model.boundary_token must be in [0, vocab_size), got {m.boundary_token}")
    need(es.population >= 2 and es.population % 2 == 0,
         f"es.population must be even and >= 2 (antithetic pairs), got {es.population}")
    need(es.group_size >= 1 and es.population % es.group_size == 0,
         f"es.group_size must divide es.population ({es.population}), got {es.group_size}")
    need(es.group_size % 2 == 0 or es.group_size == 1,
         f"es.group_size must be 1 or even (pairs read the same text), got {es.group_size}")
    need(1 <= es.rank <= m.width, f"es.rank must be in [1, model.width={m.width}], got {es.rank}")
    need(0 <= es.sigma_shift <= 12, f"es.sigma_shift must be in [0, 12], got {es.sigma_shift}")
    need(es.alpha > 0, f"es.alpha must be > 0, got {es.alpha}")
    need(es.alpha_horizon >= 1, f"es.alpha_horizon must be >= 1, got {es.alpha_horizon}")
    need(es.tokens_per_update >= 1, f"es.tokens_per_update must be >= 1, got {es.tokens_per_update}")
    need(es.chunk_size >= 0, f"es.chunk_size must be >= 0 (0 = whole population), got {es.chunk_size}")
    if es.chunk_size:
        need(es.chunk_size % es.group_size == 0 and es.population % es.chunk_size == 0
             and es.chunk_size % 2 == 0,
             f"es.chunk_size must be even, a multiple of es.group_size and divide es.population, "
             f"got {es.chunk_size}")
    need(es.noise_reuse >= 1, f"es.noise_reuse must be >= 1, got {es.noise_reuse}")
    need(1 <= es.fitness_levels <= 15, f"es.fitness_levels must be in [1, 15] (1 = sign shaping), got {es.fitness_levels}")
    from int_lm import optim  # here, not at the top: optim imports the model, which needs no config
    need(es.optimizer in optim.RULES, f"es.optimizer must be one of {', '.join(optim.RULES)}, got {es.optimizer!r}")
    try:
        optim.check_limits(es)
    except UserError as err:
        raise ConfigError(str(err)) from None
    need(d.bpe_merges >= 0, f"data.bpe_merges must be >= 0, got {d.bpe_merges}")
    need(0 <= d.val_fraction < 1 and 0 <= d.test_fraction < 1 and d.val_fraction + d.test_fraction < 1,
         "data.val_fraction and data.test_fraction must be in [0, 1) and sum below 1")
    need(d.val_tokens >= 1, f"data.val_tokens must be >= 1, got {d.val_tokens}")
    need(d.split_mode in ("auto", "hash", "contiguous"),
         f"data.split_mode must be auto, hash or contiguous, got {d.split_mode!r}")
    need(d.max_docs >= 0, f"data.max_docs must be >= 0 (0 = all documents), got {d.max_docs}")
    need(d.hub_eval_bytes >= 1, f"data.hub_eval_bytes must be >= 1, got {d.hub_eval_bytes}")
    need(d.source.strip() != "", "data.source must not be empty; use stdlib, a local path, or a hub name")
    need(d.tokenizer.strip() != "", "data.tokenizer must not be empty; use bytes or a tiktoken encoding name")
    need(t.steps >= 0, f"train.steps must be >= 0, got {t.steps}")
    need(0 <= t.seed < 2**32, f"train.seed must be in [0, 2^32), got {t.seed}")
    need(t.eval_every >= 0, f"train.eval_every must be >= 0 (0 = never), got {t.eval_every}")
    need(t.checkpoint_every >= 0, f"train.checkpoint_every must be >= 0 (0 = only at the end), got {t.checkpoint_every}")
    need(t.keep_checkpoints >= 1, f"train.keep_checkpoints must be >= 1, got {t.keep_checkpoints}")
    need(t.run_dir != "", "train.run_dir must not be empty")
    need(cfg.dist.num_processes >= 1 and 0 <= cfg.dist.process_id < cfg.dist.num_processes,
         "dist.process_id must be in [0, dist.num_processes)")
    return cfg


def resolve(config_file: str | None, argv: list[str]) -> tuple[Config, list[str]]:
    """Defaults <- config file <- command-line overrides; returns (config, other args)."""
    values, rest = parse_overrides(argv)
    cfg = load_file(config_file) if config_file else Config()
    cfg = apply_values(cfg, values, "the command line")
    return cfg, rest


def explicit_values(config_file: str | None, overrides: dict | None) -> dict[str, dict[str, Any]]:
    """The keys the user set explicitly: an explicitly given config file, then the command line."""
    out: dict[str, dict[str, Any]] = {}
    if config_file:
        load_file(config_file)  # raises the usual errors
        values = tomllib.loads(find_file(config_file).read_text())
        for section, entries in values.items():
            if isinstance(entries, dict):
                out.setdefault(section, {}).update(entries)
    for section, entries in (overrides or {}).items():
        out.setdefault(section, {}).update(entries)
    return out
