"""benchmarks/gpu_check.py: the quick mode runs end to end on the CPU, and today's integer
semantics still give the committed golden digests (timings are never asserted; the forward and
step digests without the CPU workarounds: tests/test_backend.py)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import import_benchmark

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def gpu_check():
    return import_benchmark("gpu_check")


def test_quick_mode_runs_every_part_and_matches_the_golden_digests(gpu_check, tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), str(tmp_path), "--quick"],
                         capture_output=True, text=True, timeout=900)
    assert (tmp_path / "gpu_check.md").exists(), out.stdout + out.stderr
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    items = result.get("digests", {}).get("items", {})
    assert set(items) == {"a_forward", "b_step", "c_train"}, (result["errors"], out.stderr[-3000:])
    different = {name: item.get("differs") for name, item in items.items() if item["status"] != "equal"}
    assert not different, (
        f"the integer semantics changed: {different} no longer match tests/golden/gpu_check.json "
        f"((a) forward of a 2 x 128 model, (b) one EGGROLL step at N = 256, (c) 5 steps of configs/tiny.toml). "
        f"If the change is deliberate, regenerate the digests with `{gpu_check.REGENERATE}` and commit "
        f"tests/golden/gpu_check.json with the change; otherwise the change broke bit-exactness.")
    assert out.returncode == 0, (result["errors"], out.stdout[-3000:], out.stderr[-3000:])
    assert result["errors"] == []
    assert set(result["throughput"]) == {"N=64", "N=128", "N=256"}
    for r in result["throughput"].values():
        assert r["ok"] and r["train_tokens_per_s"] > 0 and "compile_s" in r
    training = result["training"]
    assert training["ok"] and training["steps"] >= 1 and training["val_bits_per_byte"] > 0
    assert result["machine"]["backend"] == "cpu" and "flags" in result["machine"]["cpu"]


def test_a_failing_part_is_recorded_and_the_check_goes_on(gpu_check, tmp_path, monkeypatch):
    """A part that raises or fails is written into the JSON; the later parts still run; exit status 1."""
    ran = []

    def throughput_part(sizes, population, env, timeout, roofline=False):
        ran.append(population)
        if population == 128:
            raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")
        return {"ok": True, "population": population, "chunk_size": 64, "infer_tokens_per_s": 2.0,
                "train_tokens_per_s": 1.0, "train_over_infer": 0.5, "step_s": 1.0,
                "compile_s": {"infer": 1.0, "train_step": 2.0}, "device_peak_mb": None}

    monkeypatch.setattr(gpu_check, "throughput_part", throughput_part)
    monkeypatch.setattr(gpu_check, "training_part", lambda *a, **k: {"ok": False, "error": "exit status 2"})
    status = gpu_check.main([str(tmp_path), "--quick", "--parts", "throughput,training"])
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert status == 1 and result["exit_status"] == 1
    assert ran == [128, 64, 256]  # the target size first; the others after the failures
    assert result["errors"] == ["throughput N=128: RuntimeError: RESOURCE_EXHAUSTED: out of memory",
                                "training: exit status 2"]
    assert result["throughput"]["N=64"]["ok"] and result["throughput"]["N=256"]["ok"]
    assert "digests" not in result  # not asked for
    summary = (tmp_path / "gpu_check.md").read_text()
    assert "RESOURCE_EXHAUSTED" in summary and "| N=64 | 64 |" in summary
