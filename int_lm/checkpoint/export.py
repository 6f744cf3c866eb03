"""A trained model: load it from a run directory or an export; export it as one ``.safetensors``.

The export holds the int8 weights under their flattened names (``embed``,
``layers.Wf``, ...) and a string header (format, step, config, tokenizer, run
metadata, sha256 per array); loading verifies it like a checkpoint. Plain
NumPy reads it with ``safetensors.numpy.load_file``.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from int_lm import config
from int_lm.checkpoint.arrays import _check_arrays, _digest, flatten, _param_arrays, _unflat
from int_lm.checkpoint.store import CHECKPOINTS, CheckpointError, atomic_write, list_steps, restore
from int_lm.errors import UserError

EXPORT_FORMAT = "int_lm-export-v1"


@dataclasses.dataclass
class LoadedModel:
    params: dict            # int8 NumPy arrays, model.param_shapes layout
    config: config.Config
    metadata: dict          # run metadata: config, tokenizer identity, corpus fingerprint, versions, ...
    step: int
    source: str = ""        # the run directory or exported file it came from
    kind: str = "checkpoint"  # "checkpoint" or "export"

    @property
    def shape(self):
        from int_lm import model
        return model.ModelShape.from_config(self.config.model)


def load_model(path: str | Path, step: int | None = None) -> LoadedModel:
    """A trained model from a run directory (latest checkpoint, or ``step``) or an exported file."""
    path = Path(path)
    if path.is_dir():
        if not list_steps(path) and list_steps(path.parent) and path.name.isdigit() \
                and path.parent.name == CHECKPOINTS:
            return load_model(path.parent.parent, int(path.name))   # a step directory
        r = restore(path, step)
        return LoadedModel(params=r.params, config=r.config, metadata={**r.metadata, "step": r.step},
                           step=r.step, source=str(path), kind="checkpoint")
    if path.is_file():
        return _load_export(path)
    raise CheckpointError(f"{path} does not exist; pass a run directory with checkpoints or an exported "
                          f".safetensors file")


def _load_export(path: Path) -> LoadedModel:
    from safetensors import safe_open
    hint = "pass a run directory or a file written by `python -m int_lm.checkpoint export`"
    try:
        with safe_open(str(path), framework="numpy") as f:
            header = f.metadata() or {}
            flat = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises several kinds for a damaged file
        raise CheckpointError(f"{path} is not a readable exported model ({type(err).__name__}: "
                              f"{str(err)[:200]}); {hint}") from None
    if header.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{path} is not an {EXPORT_FORMAT} file (format {header.get('format')!r}); {hint}")
    try:
        metadata = json.loads(header["metadata"])
        cfg = config.validate(config.from_dict(json.loads(header["config"])))
        step = int(header["step"])
        digests = json.loads(header["sha256"])
    except (KeyError, ValueError, UserError) as err:
        raise CheckpointError(f"{path}: its JSON header is damaged ({err}); export it again") from None
    _check_arrays(flat, _param_arrays(cfg), digests, str(path), "export it again")
    return LoadedModel(params=_unflat(flat), config=cfg, metadata={**metadata, "step": step}, step=step,
                       source=str(path), kind="export")


def export_model(src: str | Path | LoadedModel, out_path: str | Path, step: int | None = None) -> Path:
    """Write one portable ``.safetensors``: int8 arrays named ``embed``, ``layers.Wf``, ... and a JSON header.

    Header (all strings, as safetensors requires): ``format``, ``step``,
    ``config`` (JSON), ``tokenizer`` (JSON identity), ``metadata`` (JSON run
    metadata: corpus fingerprint, versions, ...), ``sha256`` (JSON per array).
    Plain NumPy reads it with ``safetensors.numpy.load_file``. Written atomically, with the
    mode a new file gets (0644 under umask 022), so others on the machine can read it.
    """
    from safetensors.numpy import save
    model = src if isinstance(src, LoadedModel) else load_model(src, step)
    flat = {k: np.ascontiguousarray(v) for k, v in flatten(dict(model.params)).items()}
    _check_arrays(flat, _param_arrays(model.config), None, "the model to export", "it is not an int_lm model")
    metadata = {k: v for k, v in model.metadata.items() if k != "step"}
    header = {
        "format": EXPORT_FORMAT,
        "step": str(model.step),
        "config": json.dumps(config.to_dict(model.config)),
        "tokenizer": json.dumps(metadata.get("tokenizer")),
        "metadata": json.dumps(metadata),
        "sha256": json.dumps({k: _digest(v) for k, v in flat.items()}),
    }
    out = Path(out_path)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, save(flat, metadata=header))     # mode 0666 less the umask (0644), not 0600
    except OSError as err:
        raise CheckpointError(f"cannot write {out} ({err.strerror}); choose a writable path") from None
    return out
