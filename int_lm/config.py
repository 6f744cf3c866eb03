"""Typed run configuration: dataclasses, TOML files, ``--section.key value`` overrides.

A config is data: four frozen sections (model, es, data, train) plus ``dist`` for
multi-process runs. Files in ``configs/`` set any subset of keys; the command line
overrides single keys; :func:`validate` rejects bad values at the edge with one
message that names the key and the fix.

Each key's one-line meaning lives here and only here, in its field's metadata
(:func:`setting`), and each section's in its class docstring: ``--help``
(:func:`help_text`) is built from them, so help and code cannot drift apart.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import shutil
import textwrap
import tomllib
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from int_lm.errors import UserError


class ConfigError(UserError, ValueError):
    """A user-fixable problem with the configuration (message names key and fix)."""


def setting(default: Any, meaning: str) -> Any:
    """A config field with its default and its one-line meaning (shown by ``--help``)."""
    return field(default=default, metadata={"help": meaning})


@dataclass(frozen=True)
class ModelConfig:
    """The EGG network's shape (training takes vocab_size and boundary_token from the tokenizer)."""
    layers: int = setting(2, "stacked recurrent layers, each a minGRU-style cell and an MLP")
    width: int = setting(128, "hidden width d of embeddings and recurrent states, a multiple of 4 in [8, 1024]")
    vocab_size: int = setting(256, "vocabulary size V; set from the tokenizer when training (here only to build "
                                   "a model without data)")
    boundary_token: int = setting(0, "document-boundary token id, where the recurrent state resets; set from the "
                                     "tokenizer when training")
    tie_head: bool = setting(False, "true: the output head is the embedding table (one V x d matrix instead of two: "
                                    "fewer weights for the noise to cover; docs/training.md)")
    head_init_std: float = setting(16.0, "standard deviation of the untied head's initial weights, round(std N(0,1)) "
                                         "clipped, in [0, 64]; 16 is the spec's, like every matrix (4 learns faster "
                                         "under ES on 2 cores: docs/training.md)")
    embed_init_std: float = setting(16.0, "standard deviation of the embedding table's initial weights (the tied "
                                          "head's too), round(std N(0,1)) clipped, in [0, 64]; 16 is the spec's")


@dataclass(frozen=True)
class ESConfig:
    """EGGROLL, the evolution strategy: population, noise, fitness and the update rule (es.optimizer)."""
    population: int = setting(512, "members N per step, even: N/2 antithetic pairs (+noise, -noise)")
    rank: int = setting(1, "rank r of each matrix's low-rank perturbation A B^T")
    sigma_shift: int = setting(4, "noise scale sigma = 2^-sigma_shift, in [0, 12]")
    alpha: float = setting(4.0, "alpha schedule: > 1 decays from 1 to 2^-alpha over alpha_horizon steps, <= 1 "
                                "is constant; the sign rule moves about an alpha_t share of the weights")
    alpha_horizon: int = setting(1000, "steps T over which the alpha schedule decays")
    group_size: int = setting(2, "members that read the same text each step: 1 or even (2 = each pair)")
    tokens_per_update: int = setting(100, "tokens each member reads per step; its fitness is their "
                                          "log-likelihood")
    chunk_size: int = setting(0, "members evaluated at once (memory against speed; the vote is exact either "
                                 "way); 0 = the whole population")
    noise_reuse: int = setting(1, "steps that share one noise draw (1 = fresh noise every step)")
    optimizer: str = setting("sign", "update rule: \"sign\" = the paper's thresholded +-1 vote, no state; "
                                     "\"momentum\" = integer momentum moving int16 master weights")
    fitness_levels: int = setting(1, "pair fitness: 1 = sign of the members' score difference (published); "
                                     "L > 1 = its signed rank among all pairs, in [-L, L], so larger "
                                     "differences weigh more")
    momentum_shift: int = setting(2, "momentum rule: beta in m <- m - m/2^beta + vote, a memory of ~2^beta "
                                     "steps (0 = no momentum), in [0, 8]")
    master_bits: int = setting(8, "momentum rule: fraction bits F of the int16 master weights below the int8 "
                                  "weight (steps of 2^-F), in [0, 8]")
    lr: float = setting(0.4, "momentum rule: int8 units a weight moves per step when its momentum is one "
                             "null standard deviation from zero, in (0, 4]")
    lr_power: float = setting(1.0, "momentum rule: lr_t = lr * alpha_t^lr_power, decaying with the alpha "
                                   "schedule (0 = constant)")


@dataclass(frozen=True)
class DataConfig:
    """The corpus, its tokenizer and its splits (docs/data.md)."""
    source: str = setting("stdlib", "\"stdlib\" (the Python standard library), a local file, directory or glob, "
                                    "or a hub dataset (\"hf:NAME\" or owner/name)")
    tokenizer: str = setting("bytes", "\"bytes\" (V = 256) or a tiktoken encoding name (cl100k_base, ...)")
    bpe_merges: int = setting(0, "K: keep the encoding's BPE ranks < K, V = K + 1 (K >= 256; 0 = the whole "
                                 "encoding)")
    encoding_file: str = setting("", "a local .tiktoken file for the encoding (encodings are never downloaded)")
    text_column: str = setting("text", "the column holding the text in json/jsonl/csv/parquet or hub data")
    hub_config: str = setting("", "the hub dataset's config name, if any")
    separator: str = setting("", "cut plain-text files into documents at this string (\\n-style escapes); \"\" "
                                 "= one document per file")
    cache_dir: str = setting("", "where tokenised splits are cached; \"\" = $INT_LM_CACHE_DIR or ~/.cache/int_lm")
    val_fraction: float = setting(0.05, "share of the documents for validation when the corpus has no "
                                        "validation split")
    test_fraction: float = setting(0.05, "share of the documents for test when the corpus has no test split")
    val_tokens: int = setting(8192, "validation tokens read at each evaluation (a fixed slice of the split)")
    trust_remote_code: bool = setting(False, "let a hub dataset run its own loading code (false: refused)")
    split_mode: str = setting("auto", "\"hash\" (each document by a hash of its text), \"contiguous\" (byte "
                                      "fractions in order) or \"auto\" (contiguous for one document)")
    max_docs: int = setting(0, "read only the first N documents (0 = all; quick runs, tests)")
    data_files: str = setting("", "files for a datasets loader source such as \"hf:json\": \"GLOB\" or "
                                  "\"train=GLOB;validation=GLOB\"")
    hub_eval_bytes: int = setting(16_000_000, "bytes of text kept for each of validation and test of a streamed "
                                              "corpus")


@dataclass(frozen=True)
class TrainConfig:
    """The run: its length, seed, evaluations, checkpoints and outputs."""
    steps: int = setting(200, "EGGROLL steps to train (a resumed run continues up to this total)")
    seed: int = setting(0, "seed of the initial weights, the noise and the data order, in [0, 2^32)")
    run_dir: str = setting("runs/default", "directory for checkpoints, history, samples and TensorBoard events; "
                                           "one with checkpoints resumes")
    eval_every: int = setting(10, "steps between evaluations (validation bits/byte, weight histograms, a text "
                                  "sample); 0 = never")
    checkpoint_every: int = setting(50, "steps between checkpoints (one is also saved at the end and when "
                                        "stopped); 0 = only then")
    keep_checkpoints: int = setting(3, "newest checkpoints kept; older ones go once a newer save commits")
    resume_from: int = setting(-1, "checkpoint step to resume from; -1 = the latest in run_dir, if any")
    progress: bool = setting(True, "show a progress bar (false: each evaluation's sample is logged as one line)")
    sample_tokens: int = setting(200, "tokens sampled at each evaluation from a fixed validation prompt "
                                      "(TensorBoard text, samples.jsonl); 0 = no samples")


@dataclass(frozen=True)
class DistConfig:
    """Several processes or hosts; JAX_* or SLURM variables can set these (docs/distributed.md)."""
    coordinator_address: str = setting("", "HOST:PORT of process 0 for jax.distributed; \"\" = one process, or "
                                           "from the environment")
    num_processes: int = setting(1, "processes in the run")
    process_id: int = setting(0, "this process's index, in [0, num_processes)")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    es: ESConfig = field(default_factory=ESConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)


SECTIONS = {f.name: f.type for f in fields(Config)}
SECTIONS_DOC = {"model": ModelConfig.__doc__, "es": ESConfig.__doc__, "data": DataConfig.__doc__,
                "train": TrainConfig.__doc__, "dist": DistConfig.__doc__}


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


def _suggest(section: str, key: str | None = None) -> str:
    """"; did you mean X?" for a near miss of a section (``key`` None) or of ``section.key``, else ""."""
    types = _section_types()
    names_of = {name: [f.name for f in fields(cls)] for name, cls in types.items()}
    if key is None:
        if any(section in names for names in names_of.values()):       # a key given as a section: [optimizer]
            owner = next(name for name, names in names_of.items() if section in names)
            return f"; did you mean {owner}.{section} (a key of [{owner}])?"
        close = difflib.get_close_matches(section, list(names_of), n=1, cutoff=0.6)
        return f"; did you mean [{close[0]}]?" if close else ""
    if section in names_of:
        close = difflib.get_close_matches(key, names_of[section], n=1, cutoff=0.6)
        if close:
            return f"; did you mean {section}.{close[0]}?"
    owners = [name for name, names in names_of.items() if key in names]   # the right key in another section
    if owners:
        return f"; did you mean {owners[0]}.{key}?"
    dotted = [f"{name}.{k}" for name, names in names_of.items() for k in names]
    close = difflib.get_close_matches(key, [d.split(".", 1)[1] for d in dotted], n=1, cutoff=0.75) \
        or difflib.get_close_matches(f"{section}.{key}", dotted, n=1, cutoff=0.75)
    if close:
        return f"; did you mean {next(d for d in dotted if close[0] in (d, d.split('.', 1)[1]))}?"
    return ""


def apply_values(cfg: Config, values: dict[str, dict[str, Any]], origin: str) -> Config:
    """Return ``cfg`` with ``{section: {key: value}}`` applied; unknown keys are errors."""
    types = _section_types()
    updates = {}
    for section, entries in values.items():
        if section not in types:
            raise ConfigError(f"unknown config section [{section}] in {origin}{_suggest(section)} (known "
                              f"sections: {', '.join(types)}; --help lists every key)")
        if not isinstance(entries, dict):
            raise ConfigError(f"[{section}] in {origin} must be a table of key = value")
        sec_cls = types[section]
        sec_hints = typing.get_type_hints(sec_cls)
        current = getattr(cfg, section)
        changes = {}
        for key, value in entries.items():
            if key not in sec_hints:
                known = ", ".join(sec_hints)
                raise ConfigError(f"unknown config key {section}.{key} in {origin}{_suggest(section, key)} "
                                  f"(known keys of [{section}]: {known}; --help lists every key)")
            changes[key] = _coerce(f"{section}.{key}", value, sec_hints[key])
        updates[section] = replace(current, **changes)
    return replace(cfg, **updates)


# ---------------------------------------------------------------------------
# --help: every key with its type, default and meaning
# ---------------------------------------------------------------------------

TYPE_NAMES = {int: "INT", float: "FLOAT", str: "STR", bool: "BOOL"}


def format_value(value: Any) -> str:
    """A value as it is written in a TOML file (``true``, ``"stdlib"``, ``0.05``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):   # a TOML basic string: JSON's escapes, plus DEL
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    return repr(value)


@dataclass(frozen=True)
class KeyInfo:
    """One config key as ``--help`` shows it."""
    section: str
    name: str
    type: str          # INT, FLOAT, STR, BOOL
    default: Any       # after the config file, if one was given
    builtin: Any       # the dataclass default
    meaning: str

    @property
    def option(self) -> str:
        return f"--{self.section}.{self.name}"


def section_meaning(section: str) -> str:
    return (SECTIONS_DOC.get(section) or "").strip()


def keys(cfg: Config | None = None, sections: typing.Iterable[str] | None = None) -> list[KeyInfo]:
    """Every config key (of ``sections``, default all) with its type, default in ``cfg`` and meaning."""
    cfg = cfg or Config()
    builtin = Config()
    types = _section_types()
    out = []
    for section in sections or types:
        hints = typing.get_type_hints(types[section])
        for f in fields(types[section]):
            out.append(KeyInfo(section, f.name, TYPE_NAMES[hints[f.name]], getattr(getattr(cfg, section), f.name),
                               getattr(getattr(builtin, section), f.name), f.metadata.get("help", "")))
    return out


def help_text(cfg: Config | None = None, *, source: str | None = None, sections: typing.Iterable[str] | None = None,
              defaults: bool = True, note: str = "", width: int | None = None) -> str:
    """The config keys for ``--help``, grouped by section: option, type, default (in ``cfg``) and meaning.

    ``source``: the config file ``cfg`` came from (keys it changes show the built-in
    default too); ``defaults=False`` leaves the default column out (eval.py, whose
    defaults are the checkpoint's); ``note`` ends the first paragraph.
    """
    width = width or max(80, min(160, shutil.get_terminal_size((100, 24)).columns))
    infos = keys(cfg, sections)
    opt_w = max(len(f"{k.option} {k.type}") for k in infos) + 2
    shown = {id(k): format_value(k.default) if defaults else "" for k in infos}
    def_w = min(14, max(len(v) for v in shown.values())) + 2 if defaults else 0
    intro = ("config keys: --section.key VALUE (or --section.key=VALUE) on the command line, or key = VALUE "
             "under [section] in a --config TOML file; BOOL is true or false.")
    if defaults and source:
        intro += f" Defaults are after {source}; [built-in: X] marks the keys it sets."
    if note:
        intro += " " + note
    lines = textwrap.wrap(intro, width=width, break_long_words=False, break_on_hyphens=False)
    current = None
    for k in infos:
        if k.section != current:
            current = k.section
            lines += ["", f"[{k.section}] {section_meaning(k.section)}"]
        meaning = k.meaning
        if defaults and source and k.default != k.builtin:
            meaning += f" [built-in: {format_value(k.builtin)}]"
        head = f"  {k.option} {k.type}".ljust(opt_w + 2)
        value = shown[id(k)]
        if defaults and len(value) + 2 > def_w:            # a long default: the meaning on the next line
            lines.append(head + value)
            head = ""
        else:
            head += value.ljust(def_w)
        indent = " " * (opt_w + 2 + def_w)
        wrapped = textwrap.wrap(meaning, width=max(30, width - len(indent)), break_long_words=False,
                                break_on_hyphens=False) or [""]
        lines.append((head or indent) + wrapped[0])
        lines += [indent + w for w in wrapped[1:]]
    return "\n".join(lines)


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
                nxt = argv[i + 1] if i + 1 < len(argv) else None
                if nxt is None or (nxt.startswith("--") and nxt[2:3].isalpha()):   # the next option, not a value
                    raise ConfigError(f"--{name} needs a value (--{name} VALUE or --{name}=VALUE; --help lists "
                                      f"every key)")
                val = nxt
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
            lines.append(f"{key} = {format_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _did_you_mean(value: str, choices) -> str:
    close = difflib.get_close_matches(value, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


MAX_VOCAB = 65536
MAX_WIDTH = 1024


def validate(cfg: Config) -> Config:
    """Raise ConfigError naming the key and the fix for any invalid value."""
    m, es, d, t = cfg.model, cfg.es, cfg.data, cfg.train

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    need(m.layers >= 1, f"model.layers must be >= 1, got {m.layers}")
    need(0 <= m.head_init_std <= 64, f"model.head_init_std must be in [0, 64], got {m.head_init_std}")
    need(0 <= m.embed_init_std <= 64, f"model.embed_init_std must be in [0, 64], got {m.embed_init_std}")
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
    need(es.optimizer in optim.RULES, f"es.optimizer must be one of {', '.join(optim.RULES)}, got "
                                      f"{es.optimizer!r}{_did_you_mean(es.optimizer, optim.RULES)}")
    try:
        optim.check_limits(es)
    except UserError as err:
        raise ConfigError(str(err)) from None
    need(d.bpe_merges >= 0, f"data.bpe_merges must be >= 0, got {d.bpe_merges}")
    need(0 <= d.val_fraction < 1 and 0 <= d.test_fraction < 1 and d.val_fraction + d.test_fraction < 1,
         "data.val_fraction and data.test_fraction must be in [0, 1) and sum below 1")
    need(d.val_tokens >= 1, f"data.val_tokens must be >= 1, got {d.val_tokens}")
    modes = ("auto", "hash", "contiguous")
    need(d.split_mode in modes, f"data.split_mode must be auto, hash or contiguous, got {d.split_mode!r}"
                                f"{_did_you_mean(d.split_mode, modes)}")
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
