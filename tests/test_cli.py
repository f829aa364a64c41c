"""The mhgd-fast command line: info, bench and its argument errors."""
import json
import subprocess
import sys

import pytest
import torch

import mhgd_fast as mf
from benchmarks import harness
from benchmarks import ops as bench
from mhgd_fast import cli


def test_info_prints_json(capsys):
    assert cli.main(["info"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "reference" in out["available_backends"] and out["build_info"]["package_version"] == mf.__version__


def test_bench_quick_graph_kl_table_and_json(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        path = tmp_path / "r.json"
        assert cli.main(["bench", "--quick", "--ops", "graph_kl", "--threads", "1", "--json", str(path)]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| graph_kl")]
    runnable = bench.runnable_backends("graph_kl", "cpu")
    assert len(rows) == 4 * len(runnable)
    data = json.loads(path.read_text())
    assert data["header"]["threads"] == 1 and data["header"]["repeat"] == harness.QUICK.repeat
    assert data["header"]["cpu_capability"] == mf.build_info().get("cpu_capability")
    assert len(data["results"]) == len(rows)
    for r in data["results"]:
        assert r["min_ms"] <= r["median_ms"] <= r["max_ms"] and r["threads"] == 1


@pytest.mark.parametrize("argv", [
    [], ["bench", "--threads", "0"], ["bench", "--threads", "x"], ["bench", "--ops", "nope"],
    ["bench", "--json", "/nonexistent_dir/r.json"], ["bench", "--backends", "cuda"],
])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2 and capsys.readouterr().err


def test_plan_follows_available_backends(monkeypatch):
    """An op is timed on the reference and on the device's compiled backend where that backend is
    available (every op timed has cpu and cuda kernels)."""
    monkeypatch.setattr(bench, "available_backends", lambda: ["reference", "cpu", "cuda"])
    assert {job.backend for job in bench.plan(["graph_kl"])} == {"reference", "cpu"}
    assert {job.backend for job in bench.plan(["graph_kl"], device="cuda")} == {"reference", "cuda"}
    monkeypatch.setattr(bench, "available_backends", lambda: ["reference"])
    assert {job.backend for job in bench.plan(["graph_kl"])} == {"reference"}
    assert {job.backend for job in bench.plan(["graph_kl"], device="cuda")} == {"reference"}


@pytest.mark.subprocess
def test_python_dash_m():
    done = subprocess.run([sys.executable, "-m", "mhgd_fast", "info"], capture_output=True, text=True,
                          cwd="/")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["available_backends"][0] == "reference"
