"""Every bad input gets one clear error from the real entry points.

Each case runs ``python train.py`` / ``python eval.py`` in a subprocess and checks the
exit status (2), that stderr is exactly one ``error: ...`` line naming the problem and
the fix, and that no traceback is printed (``--debug`` shows one). The cases run
concurrently in one module fixture (three at a time): config errors fail before JAX is
imported (~0.5 s each), data and checkpoint errors after (~3 s each).

Tests run as root here, where ``chmod 000`` does not block reads; the unreadable-file
and unwritable-directory cases then run the entry point with CAP_DAC_OVERRIDE and
CAP_DAC_READ_SEARCH dropped from the capability bounding set (``setpriv``), which
restores ordinary permission checks, and are skipped with the reason if that is not
possible. Disk-full cases mount a small tmpfs (root only). Disk full during a
checkpoint save is tested in tests/test_checkpoint.py.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# Its tests share costly module fixtures: one worker runs them all (pyproject.toml: --dist loadgroup).
pytestmark = pytest.mark.xdist_group("test_errors")

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--config", "configs/tiny.toml", "--data.max_docs", "40", "--data.val_tokens", "512",
        "--train.progress", "false"]


def _can_drop_dac() -> str | None:
    """None if unprivileged permission checks can be had for a subprocess, else why not."""
    if os.geteuid() != 0:
        return None
    if not shutil.which("setpriv"):
        return "running as root (chmod does not block root) and setpriv is not available"
    p = subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search", "true"], capture_output=True)
    if p.returncode != 0:
        return f"running as root and cannot drop CAP_DAC_OVERRIDE ({p.stderr.decode().strip()[:100]})"
    return None


NO_DROP = _can_drop_dac()
UNPRIVILEGED = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []


@dataclass
class Case:
    script: str
    args: list[str]
    words: list[str]                      # all must appear in the error line
    prefix: list[str] = field(default_factory=list)
    env: dict = field(default_factory=dict)
    cwd: str | None = None
    needs_drop: bool = False
    max_s: float | None = None            # must fail this quickly


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("errors")
    e = dict(os.environ)
    e.update(JAX_PLATFORMS="cpu", XLA_PYTHON_CLIENT_PREALLOCATE="false", PYTHONUNBUFFERED="1",
             JAX_COMPILATION_CACHE_DIR=str(d / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    e.pop("HF_HUB_OFFLINE", None)
    e.pop("HF_DATASETS_OFFLINE", None)
    cache = str(d / "data_cache")
    os.chmod(d, 0o755)

    # corpora
    (d / "empty.txt").write_text("")
    (d / "tiny.txt").write_text("hello world\n")                            # 12 tokens < 33
    (d / "short.txt").write_text("alpha beta gamma delta epsilon zeta eta")  # train ok, validation 2 tokens
    (d / "locked.txt").write_text("some text " * 500)
    os.chmod(d / "locked.txt", 0)
    (d / "emptydir").mkdir()
    (d / "binary").mkdir()
    (d / "binary" / "a.bin").write_bytes(bytes(range(256)) * 8)
    (d / "binary" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(100))
    (d / "binary" / "empty.txt").write_text("")
    (d / "dangling").mkdir()
    os.symlink(d / "nowhere.txt", d / "dangling" / "doc.txt")
    # configs
    (d / "unknown_key.toml").write_text("[model]\nwidht = 64\n")
    (d / "unknown_section.toml").write_text("[optimizer]\nlr = 1\n")
    (d / "wrong_type.toml").write_text('[es]\npopulation = "many"\n')
    (d / "wrong_type2.toml").write_text("[train]\nsteps = [1, 2]\n")
    (d / "not_a_table.toml").write_text("model = 3\n")
    (d / "bad_syntax.toml").write_text("[model\nwidth = 64\n")
    (d / "odd_population.toml").write_text("[es]\npopulation = 31\n")
    # run directories
    (d / "readonly").mkdir()
    os.chmod(d / "readonly", 0o555)
    (d / "a_file").write_text("x")
    (d / "not_a_run").mkdir()
    (d / "fake_run" / "checkpoints" / "5").mkdir(parents=True)
    (d / "fake_run" / "checkpoints" / "5" / "junk").write_text("junk")
    return {"dir": d, "env": e, "cache": cache}


def run(base, case: Case, timeout=300):
    cmd = [*case.prefix, sys.executable, str(ROOT / case.script), *case.args]
    t0 = time.monotonic()
    p = subprocess.run(cmd, cwd=case.cwd or ROOT, env={**base["env"], **case.env}, capture_output=True,
                       text=True, timeout=timeout)
    return p, time.monotonic() - t0


def cases(base) -> dict[str, Case]:
    d, cache = base["dir"], base["cache"]
    data = ["--data.cache_dir", cache]

    def train(name, *args, words, **kw):
        return Case("train.py", [*TINY, *data, "--train.steps", "1", "--train.run_dir", str(d / "runs" / name),
                                 *map(str, args)], words, **kw)

    def cfg(name, *args, words):      # fails in config validation: before any run dir or data
        return Case("train.py", ["--train.run_dir", str(d / "runs" / name), *map(str, args)], words)

    out = {
        # corpus
        "corpus_missing": train("c1", "--data.source", d / "missing.txt",
                                words=["data.source", "missing.txt", "does not exist", "pass an existing"]),
        "corpus_empty": train("c2", "--data.source", d / "empty.txt", words=["empty.txt", "is empty", "point it at"]),
        "corpus_unreadable": train("c3", "--data.source", d / "locked.txt", prefix=UNPRIVILEGED, needs_drop=True,
                                   words=["locked.txt", "Permission denied", "fix the permissions"]),
        "corpus_too_small_for_batch": train("c4", "--data.source", d / "tiny.txt",
                                            words=["train split has", "fewer than tokens_per_update + 1",
                                                   "bigger corpus or fewer tokens per update"]),
        "corpus_too_small_for_split": train("c5", "--data.source", d / "short.txt", "--data.val_tokens", 4096,
                                            words=["validation split has", "lower data.val_tokens"]),
        "dir_empty": train("c6", "--data.source", d / "emptydir", words=["emptydir", "holds no files"]),
        "dir_no_readable_text": train("c7", "--data.source", d / "binary",
                                      words=["holds no readable text", "binary", "point it at text"]),
        "dir_dangling_link": train("c8", "--data.source", d / "dangling",
                                   words=["holds no readable text", "No such file"]),
        "hub_offline": train("c9", "--data.source", "hf:JeanKaddour/minipile",
                             env={"HF_ENDPOINT": "http://127.0.0.1:9"}, max_s=60,
                             words=["hub is unreachable", "JeanKaddour/minipile", "download it",
                                    "data.source=DIR"]),
        "hub_offline_bare_name": train("c10", "--data.source", "someone/some_corpus",
                                       env={"HF_ENDPOINT": "http://127.0.0.1:9"}, max_s=60,
                                       words=["hub is unreachable", "data.source=DIR", "local path"]),
        # tokenizer
        "tokenizer_unknown": train("t1", "--data.tokenizer", "nope",
                                   words=["unknown tokenizer 'nope'", "bytes", "cl100k_base"]),
        "encoding_not_offline": train("t2", "--data.tokenizer", "gpt2", words=["gpt2", "not available offline"]),
        "encoding_file_missing": train("t3", "--data.tokenizer", "cl100k_base", "--data.bpe_merges", 300,
                                       "--data.encoding_file", d / "none.tiktoken",
                                       words=["data.encoding_file", "does not exist"]),
        "bpe_cut_too_small": train("t4", "--data.tokenizer", "cl100k_base", "--data.bpe_merges", 100,
                                   words=["data.bpe_merges=100", "out of range", "256 <= K <= 100256"]),
        "bpe_cut_too_large": train("t5", "--data.tokenizer", "cl100k_base", "--data.bpe_merges", 200000,
                                   words=["data.bpe_merges=200000", "out of range"]),
        "bpe_vocab_over_model_limit": train("t6", "--data.tokenizer", "cl100k_base",
                                            words=["vocabulary of 100257", "more than the model supports",
                                                   "data.bpe_merges"]),
        "bpe_cut_with_bytes": train("t7", "--data.bpe_merges", 300, words=["needs a BPE tokenizer"]),
        # config files
        "config_unknown_key": cfg("f1", "--config", d / "unknown_key.toml",
                                  words=["unknown config key model.widht", "known keys", "width"]),
        "config_unknown_section": cfg("f2", "--config", d / "unknown_section.toml",
                                      words=["unknown config section [optimizer]", "known sections"]),
        "config_wrong_type": cfg("f3", "--config", d / "wrong_type.toml",
                                 words=["es.population must be an integer", "'many'"]),
        "config_wrong_type_list": cfg("f4", "--config", d / "wrong_type2.toml",
                                      words=["train.steps must be an integer"]),
        "config_not_a_table": cfg("f5", "--config", d / "not_a_table.toml", words=["[model]", "must be a table"]),
        "config_bad_syntax": cfg("f6", "--config", d / "bad_syntax.toml", words=["not valid TOML", "fix the syntax"]),
        "config_missing": cfg("f7", "--config", d / "nope.toml", words=["nope.toml does not exist", "configs/"]),
        "config_odd_population_file": cfg("f8", "--config", d / "odd_population.toml",
                                          words=["es.population must be even", "got 31"]),
        "config_unknown_cli_key": cfg("f9", "--model.widht", 64, words=["unknown config key model.widht"]),
        "config_missing_value": cfg("f10", "--es.population", words=["--es.population needs a value"]),
        # invalid values
        "population_odd": cfg("v1", "--es.population", 33, words=["es.population must be even", "got 33"]),
        "population_zero": cfg("v2", "--es.population", 0, words=["es.population must be even", "got 0"]),
        "group_size_not_dividing": cfg("v3", "--es.population", 64, "--es.group_size", 6,
                                       words=["es.group_size must divide es.population (64)", "got 6"]),
        "width_too_large": cfg("v4", "--model.width", 2048, words=["model.width", "[8, 1024]", "got 2048"]),
        "width_too_small": cfg("v5", "--model.width", 4, words=["model.width", "got 4"]),
        "width_not_multiple_of_4": cfg("v6", "--model.width", 30, words=["model.width", "multiple of 4", "got 30"]),
        "vocab_too_large": cfg("v7", "--model.vocab_size", 70000, words=["model.vocab_size", "65536", "got 70000"]),
        "vocab_too_small": cfg("v8", "--model.vocab_size", 1, words=["model.vocab_size", "got 1"]),
        "tokens_per_update_zero": cfg("v9", "--es.tokens_per_update", 0, words=["es.tokens_per_update must be >= 1"]),
        "steps_negative": cfg("v10", "--train.steps", -5, words=["train.steps must be >= 0", "got -5"]),
        "sigma_shift_high": cfg("v11", "--es.sigma_shift", 13, words=["es.sigma_shift must be in [0, 12]", "got 13"]),
        "sigma_shift_negative": cfg("v12", "--es.sigma_shift", -1, words=["es.sigma_shift", "got -1"]),
        "rank_over_width": cfg("v13", "--model.width", 32, "--es.rank", 33,
                               words=["es.rank must be in [1, model.width=32]", "got 33"]),
        "seed_negative": cfg("v14", "--train.seed", -1, words=["train.seed", "got -1"]),
        "bool_not_bool": cfg("v15", "--train.progress", "maybe", words=["train.progress must be true or false"]),
        "alpha_nan": cfg("v16", "--es.alpha", "nan", words=["es.alpha must be a finite number"]),
        # run directories
        "run_dir_not_writable": train("r1", "--train.run_dir", d / "readonly" / "run", prefix=UNPRIVILEGED,
                                      needs_drop=True, words=["cannot write", "Permission denied",
                                                              "writable --train.run_dir"]),
        "run_dir_under_a_file": train("r2", "--train.run_dir", d / "a_file" / "run",
                                      words=["cannot write", "Not a directory", "writable --train.run_dir"]),
        # eval.py on things that are not a run or an export
        "eval_missing": Case("eval.py", [str(d / "nothing")], ["nothing does not exist", "run directory",
                                                               ".safetensors"]),
        "eval_empty_dir": Case("eval.py", [str(d / "not_a_run")], ["has no checkpoints", "train into it first"]),
        "eval_text_file": Case("eval.py", [str(d / "tiny.txt")], ["not a readable exported model",
                                                                  "pass a run directory"]),
        "eval_config_file": Case("eval.py", [str(d / "odd_population.toml")], ["not a readable exported model"]),
        "eval_junk_checkpoint": Case("eval.py", [str(d / "fake_run")], ["checkpoint step 5", "no metadata",
                                                                        "nothing was deleted"]),
        "eval_model_override": Case("eval.py", [str(d / "fake_run"), "--model.width", "64"],
                                    ["eval.py takes only --data.KEY overrides", "--model.width"]),
    }
    return out


@pytest.fixture(scope="module")
def results(base):
    todo = {k: c for k, c in cases(base).items() if not (c.needs_drop and NO_DROP)}
    with ThreadPoolExecutor(3) as pool:
        futures = {k: pool.submit(run, base, c) for k, c in todo.items()}
        return {k: f.result() for k, f in futures.items()}


def check_one_line_error(p, words, rc=2):
    assert p.returncode == rc, f"exit {p.returncode}\nstdout:\n{p.stdout[-2000:]}\nstderr:\n{p.stderr[-3000:]}"
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout, p.stderr[-3000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr[-3000:]
    for w in words:
        assert w in lines[0], f"{w!r} not in {lines[0]!r}"
    return lines[0]


@pytest.mark.parametrize("name", list(cases({"dir": Path("/unused"), "cache": ""})))
def test_one_line_error(base, results, name):
    case = cases(base)[name]
    if case.needs_drop and NO_DROP:
        pytest.skip(NO_DROP)
    p, elapsed = results[name]
    check_one_line_error(p, case.words)
    if case.max_s is not None:
        assert elapsed < case.max_s, f"took {elapsed:.1f} s"


def test_debug_shows_the_traceback(base):
    p, _ = run(base, Case("train.py", ["--es.population", "33", "--debug"], []))
    assert p.returncode == 2 and "Traceback" in p.stderr and "ConfigError" in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("error: es.population must be even")


# ---------------------------------------------------------------------------
# Cases that need a trained run, another working directory, or a full disk
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(base):
    run_dir = base["dir"] / "runs" / "trained"
    p, _ = run(base, Case("train.py", [*TINY, "--data.cache_dir", base["cache"], "--train.run_dir", str(run_dir),
                                       "--train.steps", "2", "--train.eval_every", "0"], []))
    assert p.returncode == 0, p.stderr[-3000:]
    return run_dir


@pytest.mark.parametrize("args, words", [
    (["--model.layers", "2"], ["cannot change model.layers", "model's shape", "another --train.run_dir"]),
    (["--model.width", "64"], ["cannot change model.width", "model's shape"]),
    (["--data.tokenizer", "cl100k_base", "--data.bpe_merges", "300"],
     ["cannot change data.tokenizer", "changes the tokenizer", "another --train.run_dir"]),
])
def test_resume_with_another_shape_or_tokenizer(base, trained, args, words):
    before = sorted(str(q.relative_to(trained)) for q in trained.rglob("*"))
    p, _ = run(base, Case("train.py", ["--train.run_dir", str(trained), *args], []))
    check_one_line_error(p, words)
    assert sorted(str(q.relative_to(trained)) for q in trained.rglob("*")) == before   # nothing touched


def test_eval_with_another_tokenizer(base, trained):
    p, _ = run(base, Case("eval.py", [str(trained), "--data.tokenizer", "cl100k_base", "--data.bpe_merges", "300",
                                      "--data.cache_dir", base["cache"], "--no_tb"], []))
    check_one_line_error(p, ["trained with tokenizer bytes"])


def test_config_lookup_from_any_directory(base, tmp_path):
    """``--config configs/tiny.toml`` (and the default configs/default.toml) resolve from the repository."""
    args = ["--data.cache_dir", base["cache"], "--data.max_docs", "40", "--train.steps", "0",
            "--train.progress", "false"]
    p, _ = run(base, Case("train.py", ["--config", "configs/tiny.toml", "--train.run_dir", str(tmp_path / "a"),
                                       *args], [], cwd=str(tmp_path)))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "1 layers x 32 wide" in p.stdout
    p, _ = run(base, Case("train.py", ["--config", "tiny", "--es.population", "3"], [], cwd=str(tmp_path)))
    check_one_line_error(p, ["es.population must be even"])      # found by name, then validated
    p, _ = run(base, Case("train.py", ["--es.population", "3"], [], cwd=str(tmp_path)))
    check_one_line_error(p, ["es.population must be even"])      # the default config file was found


def _tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")


def test_tensorboard_on_a_full_disk(base, tmp_path):
    """TensorBoard's writer fails on ENOSPC: one warning line, no thread traceback, and training
    goes on to its last step and final checkpoint (metrics are a record, not a reason to stop)."""
    run_dir = tmp_path / "run"
    _tmpfs(run_dir / "tb", "12k")
    try:
        p, _ = run(base, Case("train.py", [*TINY, "--data.cache_dir", base["cache"], "--train.run_dir", str(run_dir),
                                           "--train.steps", "30", "--train.checkpoint_every", "10",
                                           "--train.eval_every", "2"], []))
        assert p.returncode == 0, p.stderr[-3000:]
        assert "Traceback" not in p.stderr, p.stderr[-3000:]
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("warning: cannot write TensorBoard events"), p.stderr
        assert "no space left on device" in lines[0] and "training and checkpoints go on" in lines[0]
        from int_lm import checkpoint as CK
        assert CK.list_steps(run_dir)[-1] == 30
        CK.restore(run_dir, 30)
    finally:
        subprocess.run(["umount", "-l", str(run_dir / "tb")], capture_output=True)


def test_run_files_on_a_full_disk(base, tmp_path):
    """A write outside the checkpoint and TensorBoard code (metadata.json) on a full disk: one line."""
    run_dir = tmp_path / "run"
    _tmpfs(run_dir, "8k")          # room for .lock and config.toml only
    try:
        p, _ = run(base, Case("train.py", [*TINY, "--data.cache_dir", base["cache"], "--train.run_dir", str(run_dir),
                                           "--train.steps", "2"], []))
        check_one_line_error(p, ["no space left on device", "free disk space", "resume"])
    finally:
        subprocess.run(["umount", "-l", str(run_dir)], capture_output=True)
