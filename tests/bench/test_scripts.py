"""The benchmark scripts a device session runs (bench/device_check.sh) still run: small, on CPU, their
figures not checked (performance is measured, not asserted), only that each row is made and that
the two implementations gave the same tokens. A broken script costs a GPU session's scarce minutes."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_script(*args: str) -> list[dict]:
    """The JSON rows a bench script prints."""
    done = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_the_engine_bench_makes_its_row_and_profile(tmp_path):
    out = tmp_path / "rows.jsonl"
    (row,) = run_script("bench/engine.py", "--batches", "2", "--new-tokens", "3", "--repeats", "1", "--threads", "1",
                        "--tile", "64", "--layers", "2", "--profile", "--out", str(out))
    assert row["same_tokens"] == "2/2" and row["batch"] == 2 and row["ours_decode_tok_s"] > 0
    assert json.loads(out.read_text()) == row


@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler")
def test_the_engine_bench_runs_each_decode_variant():
    """The decode-step candidates the device session times, compiled as on CUDA: the reference's tokens.
    One compiled variant of two changes (a compile is ~25 s of CI; the base step compiles in tests/model)."""
    rows = run_script("bench/engine.py", "--batches", "2", "--new-tokens", "4", "--repeats", "1", "--threads", "1",
                      "--tile", "64", "--layers", "2", "--compile", "--variants", "unpadded+eager_pointwise", "eager")
    assert [r["variant"] for r in rows] == ["unpadded+eager_pointwise", "eager"]
    assert all(r["same_tokens"] == "2/2" and r["layers"] == 2 for r in rows)
    assert [r["compiled"] for r in rows] == [True, False]        # eager: the engine built with compile=False


def test_the_sampler_bench_times_each_kind():
    rows = run_script("bench/sampler.py", "--vocab", "300", "--rows", "4", "--repeats", "1", "--no-fused")
    assert [r["kind"] for r in rows] == ["greedy", "temperature", "top_p", "top_p_sort", "top_k", "repetition",
                                         "counted"]
    assert all(r["eager_ms"] > 0 for r in rows)


def test_the_stream_bench_makes_its_report():
    (report,) = run_script("bench/stream.py", "--tile", "64", "--blocks", "2", "--batch", "2", "--slots", "4",
                           "--min-new", "2", "--max-new", "3", "--repeats", "0", "--questions-per-image", "2",
                           "--layers", "2")
    assert report["streamed_shared_prefixes"]["images_encoded"] == 2          # 4 rows about 2 images
    assert report["one_at_a_time"]["images_encoded"] == 4


def test_the_samples_score_and_beams_benches_make_their_rows():
    (row,) = run_script("bench/samples.py", "--batch", "2", "--samples", "2", "--new-tokens", "3", "--repeats", "1",
                        "--threads", "1", "--tile", "64", "--layers", "2")
    assert row["generated_tokens"] == 12 and row["images_encoded"] == 2
    (row,) = run_script("bench/score.py", "--images", "2", "--texts", "2", "--text-tokens", "4", "--repeats", "1",
                        "--threads", "1", "--tile", "64", "--layers", "2")
    assert row["rows"] == 4 and row["images_encoded"] == 2 and row["max_abs_diff"] < 1e-3
    (row,) = run_script("bench/beams.py", "--batch", "2", "--beams", "2", "--new-tokens", "3", "--repeats", "1",
                        "--threads", "1", "--tile", "64", "--layers", "2")
    assert row["engine_same_answers"] == row["generate_same_answers"] == 2


def test_every_bench_script_explains_its_options():
    """`--help` of each script (the first thing a device session runs): a stray % in a help text
    made argparse fail there (bench/engine.py's --frames)."""
    scripts = sorted(p for p in (REPO / "bench").glob("*.py")
                     if p.name != "compare_torch_backend.py" and "__main__" in p.read_text())
    code = ("import runpy, sys\nfor path in sys.argv[1:]:\n    sys.argv = [path, '--help']\n"
            "    try:\n        runpy.run_path(path, run_name='__main__')\n    except SystemExit as e:\n"
            "        assert e.code == 0, path\n    else:\n        raise AssertionError(path + ': no --help')\n")
    done = subprocess.run([sys.executable, "-c", code, *map(str, scripts)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("usage:") == len(scripts) > 5


def test_the_dedup_bench_makes_its_row():
    (row,) = run_script("bench/dedup.py", "--rows", "24", "--repeated", "0.5", "--batch", "8", "--max-new-tokens", "4",
                        "--repeats", "1")
    assert (row["rows"], row["distinct_questions"], row["rows_shared"]) == (24, 12, 12)
    assert row["same_answers"] and row["shared_s"] > 0
