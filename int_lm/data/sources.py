"""Where documents come from: the stdlib corpus, local files, and ``datasets`` streams.

A *source* yields documents (str) in a fixed order, optionally grouped by the
corpus's own splits, and a content fingerprint. Splitting, tokenising and caching
happen in :mod:`int_lm.data.corpus`.
"""
from __future__ import annotations

import codecs
import glob as globmod
import hashlib
import json
import os
import re
import socket
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlparse

from int_lm.data.errors import DataError

SPLITS = ("train", "validation", "test")
DATASETS_EXTS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv",
                 ".jsonl.gz": "json", ".json.gz": "json", ".csv.gz": "csv"}
# directory names never part of the stdlib corpus (test suites, third-party code, caches)
STDLIB_EXCLUDE = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
_SPLIT_ALIASES = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
                  "val": "validation", "dev": "validation", "test": "test", "testing": "test"}


def split_alias(name: str) -> str | None:
    return _SPLIT_ALIASES.get(name.lower())


@dataclass
class Source:
    """Documents of a finite corpus (local) with a content fingerprint."""

    kind: str                      # stdlib | local | hub
    description: str
    fingerprint: str
    # split name -> callable yielding (document name, text); "all" when the corpus has no own splits
    groups: dict[str, Callable[[], Iterator[tuple[str, str]]]]
    total_bytes: int = 0           # approximate, for the progress bar
    files: list[str] = field(default_factory=list)

    @property
    def own_splits(self) -> bool:
        return "all" not in self.groups


# ---------------------------------------------------------------------------
# Fingerprints with a stat memo, so a second run does not re-read big files
# ---------------------------------------------------------------------------

def _file_sha256(path: Path, memo: dict[str, Any]) -> str:
    st = path.stat()
    key = str(path.resolve())
    ent = memo.get(key)
    if ent and ent[0] == st.st_size and ent[1] == st.st_mtime_ns:
        return ent[2]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    memo[key] = [st.st_size, st.st_mtime_ns, h.hexdigest()]
    memo["__dirty__"] = True
    return h.hexdigest()


def _load_memo(cache_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((cache_dir / "file_hashes.json").read_text())
    except (OSError, ValueError):
        return {}


def _save_memo(cache_dir: Path, memo: dict[str, Any]) -> None:
    if not memo.pop("__dirty__", False):
        return
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache_dir / f"file_hashes.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, cache_dir / "file_hashes.json")
    except OSError:
        pass  # the memo is an optimisation only


def fingerprint_files(files: list[Path], root: Path | None, settings: dict[str, Any], cache_dir: Path) -> str:
    memo = _load_memo(cache_dir)
    h = hashlib.sha256()
    h.update(json.dumps(settings, sort_keys=True).encode())
    for p in files:
        name = str(p.relative_to(root)) if root else p.name
        h.update(f"\n{name}\t{_file_sha256(p, memo)}".encode())
    _save_memo(cache_dir, memo)
    return h.hexdigest()


# ---------------------------------------------------------------------------
# Reading documents
# ---------------------------------------------------------------------------

def read_text(path: Path) -> str:
    """File text as UTF-8; undecodable bytes become U+FFFD (counted as their 3 UTF-8 bytes)."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read {path} ({err.strerror}); fix the path or its permissions") from None
    return data.decode("utf-8", errors="replace")


def unescape(sep: str) -> str:
    r"""Allow ``\n``-style escapes in a separator given on the command line."""
    if "\\" in sep:
        try:
            return codecs.decode(sep, "unicode_escape")
        except UnicodeDecodeError:
            return sep
    return sep


def _plain_docs(path: Path, name: str, separator: str) -> Iterator[tuple[str, str]]:
    text = read_text(path)
    if separator:
        for i, piece in enumerate(text.split(separator)):
            if piece:
                yield f"{name}#{i}", piece
    elif text:
        yield name, text


def _datasets_docs(files: list[Path], fmt: str, column: str) -> Iterator[tuple[str, str]]:
    import datasets

    try:
        ds = datasets.load_dataset(fmt, data_files=[str(f) for f in files], split="train", streaming=True)
        for i, row in enumerate(ds):
            if column not in row:
                raise DataError(
                    f"column {column!r} not in {files[0]} (columns: {', '.join(row)}); set data.text_column"
                )
            text = row[column]
            if text is None:
                continue
            if not isinstance(text, str):
                raise DataError(f"column {column!r} in {files[0]} holds {type(text).__name__}, not text; "
                                f"set data.text_column to a text column")
            if text:
                yield f"{fmt}:{i}", text
    except DataError:
        raise
    except Exception as err:  # pyarrow/json parse errors
        raise DataError(f"cannot read {files[0]} as {fmt} ({type(err).__name__}: {str(err)[:200]}); "
                        f"fix the file or its extension") from None


def _fmt_of(path: Path) -> str | None:
    name = path.name.lower()
    for ext, fmt in DATASETS_EXTS.items():
        if name.endswith(ext):
            return fmt
    return None


def _file_docs(files: list[Path], root: Path | None, separator: str, column: str,
               max_docs: int) -> Callable[[], Iterator[tuple[str, str]]]:
    def gen() -> Iterator[tuple[str, str]]:
        n = 0
        for p in files:
            fmt = _fmt_of(p)
            name = str(p.relative_to(root)) if root else p.name
            it = _datasets_docs([p], fmt, column) if fmt else _plain_docs(p, name, separator)
            for dname, text in it:
                yield (f"{name}:{dname}" if fmt else dname), text
                n += 1
                if max_docs and n >= max_docs:
                    return
    return gen


def stdlib_files(max_docs: int = 0) -> tuple[Path, list[Path]]:
    """The running interpreter's stdlib ``.py`` files, sorted, without site-packages and tests."""
    root = Path(sysconfig.get_paths()["stdlib"]).resolve()
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in STDLIB_EXCLUDE and not d.startswith("."))
        for fn in filenames:
            if fn.endswith(".py"):
                files.append(Path(dirpath) / fn)
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    if max_docs:
        files = files[:max_docs]
    if not files:
        raise DataError(f"no .py files found in the standard library at {root}; pass data.source=PATH")
    return root, files


def stdlib_source(max_docs: int, cache_dir: Path) -> Source:
    root, files = stdlib_files(max_docs)
    fp = fingerprint_files(files, root, {"kind": "stdlib"}, cache_dir)
    return Source(
        kind="stdlib",
        description=f"python stdlib {root} ({len(files)} files)",
        fingerprint=fp,
        groups={"all": _file_docs(files, root, "", "text", 0)},
        total_bytes=sum(p.stat().st_size for p in files),
        files=[p.relative_to(root).as_posix() for p in files],
    )


def _list_local(spec: str) -> tuple[Path | None, list[Path]]:
    if any(c in spec for c in "*?["):
        files = sorted(Path(p) for p in globmod.glob(os.path.expanduser(spec), recursive=True))
        files = [p for p in files if p.is_file()]
        if not files:
            raise DataError(f"data.source glob {spec!r} matches no files; fix the pattern")
        root = Path(os.path.commonpath([str(p.parent.resolve()) for p in files]))
        return root, [p.resolve() for p in files]
    path = Path(os.path.expanduser(spec))
    if path.is_file():
        return None, [path.resolve()]
    if path.is_dir():
        files = []
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            files.extend(Path(dirpath) / f for f in filenames if not f.startswith("."))
        files.sort(key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise DataError(f"directory {path} holds no files; point data.source at text, jsonl, parquet or csv")
        return path.resolve(), [p.resolve() for p in files]
    raise DataError(f"data.source {spec!r} does not exist; pass an existing file, directory or glob, "
                    f"'stdlib', or a hub name like hf:JeanKaddour/minipile")


def _split_of_file(p: Path, root: Path | None) -> str | None:
    parts = p.relative_to(root).parts if root else (p.name,)
    for part in parts:
        stem = re.split(r"[._\-]", part, maxsplit=1)[0]
        alias = split_alias(stem)
        if alias:
            return alias
    return None


def _check_readable(spec: str, files: list[Path]) -> None:
    """Every file opens and reads; not all of them are empty or binary (a NUL in the first 8 KiB)."""
    bad, binary, empty = [], [], 0
    for p in files:
        try:
            with open(p, "rb") as f:
                head = f.read(8192)
        except OSError as err:
            bad.append((p, err.strerror or type(err).__name__))
            continue
        if not head:
            empty += 1
        elif _fmt_of(p) is None and b"\0" in head:
            binary.append(p)
    if bad:
        p, why = bad[0]
        if len(bad) == len(files):
            raise DataError(f"data.source {spec!r} holds no readable text: cannot read {p} ({why})"
                            + (f" nor any of its other {len(files) - 1} files" if len(files) > 1 else "")
                            + "; fix the permissions or point data.source at readable text")
        raise DataError(f"cannot read {p} ({why}) in data.source {spec!r} ({len(bad)} of {len(files)} files "
                        f"unreadable); fix their permissions or remove them")
    if empty == len(files):
        raise DataError(f"data.source {spec!r} is empty (all {len(files)} files have 0 bytes); point it at text")
    if empty + len(binary) == len(files):
        raise DataError(f"data.source {spec!r} holds no readable text (its {len(binary)} non-empty files are "
                        f"binary, e.g. {binary[0]}); point it at text, jsonl, json, csv or parquet files")


def local_source(spec: str, data_cfg: Any, cache_dir: Path) -> Source:
    root, files = _list_local(spec)
    sep = unescape(data_cfg.separator)
    col = data_cfg.text_column
    settings = {"kind": "local", "separator": sep, "text_column": col, "max_docs": data_cfg.max_docs}
    _check_readable(spec, files)
    fp = fingerprint_files(files, root, settings, cache_dir)
    by_split: dict[str, list[Path]] = {}
    for p in files:
        by_split.setdefault(_split_of_file(p, root) or "other", []).append(p)
    if "train" in by_split and ({"validation", "test"} & set(by_split)):
        groups = {s: _file_docs(by_split[s] + (by_split.get("other", []) if s == "train" else []),
                                root, sep, col, data_cfg.max_docs)
                  for s in SPLITS if s in by_split}
    else:
        groups = {"all": _file_docs(files, root, sep, col, data_cfg.max_docs)}
    return Source(kind="local", description=f"{spec} ({len(files)} files)", fingerprint=fp, groups=groups,
                  total_bytes=sum(p.stat().st_size for p in files),
                  files=[str(p.relative_to(root)) if root else p.name for p in files])


# ---------------------------------------------------------------------------
# datasets streaming (hub names, and local files through the same calls)
# ---------------------------------------------------------------------------

def is_hub_name(source: str) -> bool:
    if source.startswith("hf:"):
        return True
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+", source)) and not Path(source).exists()


def parse_data_files(spec: str) -> Any:
    """``GLOB`` or ``train=GLOB;validation=GLOB`` (comma-separated globs allowed) for datasets."""
    if not spec:
        return None
    if "=" not in spec:
        return [s for s in spec.split(",") if s]
    out: dict[str, list[str]] = {}
    for part in spec.split(";"):
        if not part.strip():
            continue
        name, _, globs = part.partition("=")
        out[name.strip()] = [g for g in globs.split(",") if g]
    return out


def _hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Quick TCP check of the hub endpoint (datasets itself retries for ~30 s)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or \
            os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", "", "false"):
        return False
    url = urlparse(_hub_endpoint())
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def offline_message(name: str) -> str:
    return (f"the Hugging Face hub is unreachable (offline?), so {name!r} cannot be streamed; download it "
            f"on a connected machine (e.g. huggingface-cli download --repo-type dataset {name} --local-dir DIR) "
            f"and set data.source=DIR, or data.source=hf:json with data.data_files='train=DIR/train*.jsonl;...' "
            f"(if {name!r} was meant as a local path: it does not exist)")


def remote_code_kwargs(load_dataset: Callable, trust: bool) -> dict[str, bool]:
    """``trust_remote_code`` for ``load_dataset``: always explicit where it is accepted (datasets 2.x
    defaulted to running a dataset's script), True only if the user set data.trust_remote_code.
    datasets >= 4 has no such argument: it runs no dataset scripts at all."""
    import inspect
    try:
        params = inspect.signature(load_dataset).parameters
    except (TypeError, ValueError):
        return {}
    return {"trust_remote_code": bool(trust)} if "trust_remote_code" in params else {}


def open_stream(name: str, data_cfg: Any) -> dict[str, Any]:
    """``datasets.load_dataset(name, streaming=True)`` as {split: IterableDataset}, errors mapped."""
    import datasets
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    packaged = name in _PACKAGED_DATASETS_MODULES
    kwargs: dict[str, Any] = {"streaming": True}
    data_files = parse_data_files(data_cfg.data_files)
    if data_files is not None:
        kwargs["data_files"] = data_files
    elif packaged:
        raise DataError(f"data.source=hf:{name} reads local files: set data.data_files to a glob "
                        f"or 'train=GLOB;validation=GLOB'")
    kwargs.update(remote_code_kwargs(datasets.load_dataset, data_cfg.trust_remote_code))
    if not packaged and not hub_reachable():
        raise DataError(offline_message(name))
    try:
        ds = datasets.load_dataset(name, data_cfg.hub_config or None, **kwargs)
    except DataError:
        raise
    except FileNotFoundError:
        what = f"data.data_files {data_cfg.data_files!r}" if packaged else f"dataset {name!r}"
        raise DataError(f"{what} matches no files; fix the name or glob") from None
    except (ConnectionError, TimeoutError, OSError) as err:
        if packaged:
            raise DataError(f"cannot read data.data_files for hf:{name} ({str(err)[:200]}); fix the paths") from None
        raise DataError(offline_message(name)) from None
    except Exception as err:
        msg = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        if "remote code" in msg.lower() or "trust_remote_code" in msg:
            raise DataError(f"{name} needs to run its own code; set data.trust_remote_code=true only if you "
                            f"trust it") from None
        raise DataError(f"cannot open dataset {name!r} ({type(err).__name__}: {msg}); check the name, "
                        f"data.hub_config and data.data_files") from None
    out: dict[str, Any] = {}
    for key in ds.keys():
        alias = split_alias(str(key))
        if alias and alias not in out:
            out[alias] = ds[key]
    if "train" not in out:
        raise DataError(f"dataset {name!r} has no train split (splits: {', '.join(map(str, ds.keys()))})")
    return out


def iter_stream_docs(ds: Any, column: str, where: str) -> Iterator[str]:
    try:
        for row in ds:
            if column not in row:
                raise DataError(f"column {column!r} not in {where} (columns: {', '.join(row)}); "
                                f"set data.text_column")
            text = row[column]
            if isinstance(text, str) and text:
                yield text
    except DataError:
        raise
    except (ConnectionError, TimeoutError) as err:
        raise DataError(f"lost the connection while streaming {where} ({err}); retry, or use a local copy") from None
