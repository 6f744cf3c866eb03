"""Smoke test of the throughput harness at a tiny size (timings are never asserted)."""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import import_benchmark

ROOT = Path(__file__).resolve().parent.parent


def test_throughput_harness_runs_and_reports_json():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--model.layers", "1", "--model.width", "16",
         "--model.vocab_size", "32", "--es.population", "8", "--es.tokens_per_update", "4", "--repeats", "1",
         "--naive", "--roofline", "--json"], capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("infer_tokens_per_s", "train_tokens_per_s", "train_over_infer", "peak_rss_mb",
                "naive_tokens_per_s", "eggroll_over_naive", "split_s", "compile_s", "cpu", "roofline", "breakdown_s"):
        assert key in result, key
    assert result["train_tokens_per_s"] > 0 and result["peak_rss_mb"] > 0
    assert {"model", "flags", "source"} <= set(result["cpu"])
    roof = result["roofline"]
    assert roof["ops_per_token"]["dense"] == 2 * (12 * 1 * 16 * 16 + 32 * 16)  # 12 L D^2 + V D multiply-adds
    assert set(roof["shapes"]) == {"D x D (Wf Uf Wh Uh)", "up 4D x D", "down D x 4D", "head V x D"}
    assert roof["mix_int8_gops"] > 0 and roof["infer_of_int8"] > 0
    for part in ("inference forward", "noise draw", "perturbed forward (both)", "fitness + vote", "update"):
        wall, cpu = result["breakdown_s"][part]
        assert wall > 0 and cpu >= 0, part


def test_throughput_text_output_names_the_cpu_and_takes_a_config_file(tmp_path):
    # --config applies train.py's TOML over the benchmark's defaults; --section.key still wins
    cfg = tmp_path / "mine.toml"
    cfg.write_text('[model]\nlayers = 1\nwidth = 16\nvocab_size = 32\n\n[es]\npopulation = 8\n'
                   'tokens_per_update = 2\noptimizer = "sign"\nfitness_levels = 1\n')
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--config", str(cfg), "--es.population", "4",
         "--repeats", "0"], capture_output=True, text=True, timeout=300, check=True)
    assert "  CPU: " in out.stdout and "train/infer" in out.stdout, out.stdout
    assert "model 1 x 16, V=32, population 4, T=2," in out.stdout, out.stdout    # the command line over the file
    assert "sign rule (1 fitness levels)" in out.stdout, out.stdout


def test_benchmark_config_errors_are_one_usage_line(capsys):
    common = import_benchmark("common")
    for argv, words in ((["--config", "no_such_config"], "does not exist"),
                        (["--model.widht", "3"], "did you mean model.width")):
        with pytest.raises(SystemExit) as exit_:
            common.parse_config(argparse.ArgumentParser(prog="bench"), argv, {})
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert "bench: error: " in err and words in err and "Traceback" not in err, err
    cfg, args, _ = common.parse_config(argparse.ArgumentParser(), ["--config", "tiny", "--es.population", "6"],
                                       {"model": {"width": 48}})
    assert (cfg.model.width, cfg.es.population, args.config) == (32, 6, "tiny")   # defaults < file < command line


def test_forward_overhead_benchmark_runs_and_checks_the_layer_major_forward():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "forward_overhead.py"), "--layers", "2", "--width", "16",
         "--members", "4", "--tokens", "5", "--repeats", "1"], capture_output=True, text=True, timeout=300,
        check=True)
    # it exits with an error unless the layer-major forward equals model.forward bit for bit
    assert "layer-major forward: bit-identical" in out.stdout, out.stdout
    for name in ("inference", "perturbed (all)", "vector params only", "matrix factors only",
                 "head only (shared trunk)", "layer-major inference", "layer-major perturbed"):
        assert name in out.stdout, out.stdout


def test_profile_step_runs_and_finds_the_loop(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "profile_step.py"), "--model.layers", "1", "--model.width", "16",
         "--model.vocab_size", "32", "--es.population", "8", "--es.tokens_per_update", "3", "--top", "5",
         "--trace_dir", str(tmp_path)], capture_output=True, text=True, timeout=300, check=True)
    assert "training outside the time loop" in out.stdout, out.stdout
    assert list(tmp_path.glob("training/plugins/profile/*/*.xplane.pb")), "no trace written"


@pytest.mark.slow
def test_xla_options_sweep_runs_one_variant():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "xla_options.py"), "--variants", "default", "--json",
         "--model.layers", "1", "--model.width", "16", "--model.vocab_size", "32", "--es.population", "8",
         "--es.tokens_per_update", "4", "--repeats", "1"], capture_output=True, text=True, timeout=600, check=True)
    (row,) = json.loads(out.stdout)
    assert row["variant"] == "default" and row["bit_identical"] and row["int8_gops"] > 0
