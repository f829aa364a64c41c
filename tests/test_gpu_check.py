"""tools/gpu_check.py (`make gpu-check`): its --cpu-smoke mode runs every stage's harness on the CPU
end to end, a machine without a GPU fails the GPU mode with a reason, the global deadline skips
stages instead of overrunning, and the output parsers read pytest's and compute-sanitizer's
summaries."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "gpu_check.py"
STAGES = ["environment", "build", "extension", "tests", "memcheck", "racecheck", "bench_graph_kl", "bench_topk",
          "bench_mhgd"]


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def run_check(out, *args, timeout=600):
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    report = json.loads((out / "gpu_check.json").read_text()) if (out / "gpu_check.json").exists() else None
    return done, report


@pytest.mark.subprocess
@pytest.mark.slow
def test_cpu_smoke_runs_every_stage(tmp_path):
    done, report = run_check(tmp_path, "--cpu-smoke", "--threads", "1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    stages = {s["name"]: s for s in report["stages"]}
    assert list(stages) == STAGES
    assert all(s["status"] in ("pass", "skipped") and s["reason"] for s in stages.values()), stages
    assert stages["environment"]["status"] == "pass" and stages["extension"]["status"] == "pass"
    assert "--cpu-smoke" in stages["build"]["reason"]
    if not torch.cuda.is_available():  # the CUDA tests are collected, and skipped
        assert stages["tests"]["status"] == "skipped" and stages["tests"]["details"]["counts"]["skipped"] > 0
    for tool in ("memcheck", "racecheck"):  # the sanitizer's cases ran, on the CPU
        assert stages[tool]["status"] == "skipped" and len(stages[tool]["details"]["cases"]) == 18
    bench = report["benchmarks"]
    impls = {(r["impl"], r["batch"]) for r in bench["bench_graph_kl"]["results"]}
    assert impls == {("fused", 16), ("eager", 16), ("compiled", 16), ("fused", 32), ("eager", 32),
                     ("compiled", 32), ("fused", 64)}
    assert all(0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"] for r in bench["bench_graph_kl"]["results"])
    methods = {m for row in bench["bench_topk"]["results"] for m in row["ms"]}
    assert methods == {"torch.linalg.svd", "Gram + eigh", "fast (cpu)"} and len(bench["bench_topk"]["results"]) == 8
    assert set(bench["bench_mhgd"]["results"]) == {"teacher ResNet32 fwd", "student ResNet8 fwd+bwd",
                                                   "MHGD loss fwd+bwd (auto)"}
    markdown = (tmp_path / "gpu_check.md").read_text()
    for name in STAGES:
        assert f"| {name} |" in markdown
    assert markdown.count("| B | impl | median ms") == 1 and "| teacher ResNet32 fwd |" in markdown
    assert "pytest" in (tmp_path / "gpu_check.log").read_text()


@pytest.mark.subprocess
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_gpu_mode_without_a_gpu_fails_with_the_reason(tmp_path):
    done, report = run_check(tmp_path, "--no-build", "--deadline", "120", timeout=300)
    assert done.returncode == 1, done.stdout[-3000:]
    env, *rest = report["stages"]
    assert env["status"] == "fail" and ("no GPU" in env["reason"] or "CPU build" in env["reason"])
    assert [s["status"] for s in rest] == ["skipped"] * len(rest)
    assert all(s["reason"] == "the environment stage failed" for s in rest)


@pytest.mark.subprocess
def test_missing_python_fails_the_environment(tmp_path):
    done, report = run_check(tmp_path, "--cpu-smoke", "--python", str(tmp_path / "no-such-python"), timeout=120)
    assert done.returncode == 1
    assert report["stages"][0]["status"] == "fail" and "could not import torch" in report["stages"][0]["reason"]


@pytest.mark.subprocess
def test_deadline_skips_stages_instead_of_overrunning(tmp_path):
    done, report = run_check(tmp_path, "--cpu-smoke", "--deadline", "1", timeout=120)
    assert done.returncode == 0
    assert [s["name"] for s in report["stages"]] == STAGES
    assert all(s["status"] == "skipped" and "global deadline" in s["reason"] for s in report["stages"])


def test_pytest_summary_parsing():
    gpu_check = load_script()
    out = "....F\nFAILED tests/test_x.py::test_y - AssertionError\n2 failed, 10 passed, 3 skipped, 1 error in 4.2s\n"
    assert gpu_check.pytest_counts(out) == {"failed": 2, "passed": 10, "skipped": 3, "errors": 1}
    assert gpu_check.pytest_counts("253 skipped, 609 deselected in 2.71s") == {"skipped": 253, "deselected": 609}
    assert gpu_check.pytest_counts("no output") == {}


def test_sanitizer_summary_parsing():
    gpu_check = load_script()
    memcheck = ("========= COMPUTE-SANITIZER\n========= Invalid __global__ read of size 4 bytes\n"
                "=========     at graph_kl_forward<float>+0x1a0\n========= ERROR SUMMARY: 3 errors\n")
    assert gpu_check.sanitizer_summary(memcheck) == (3, "Invalid __global__ read of size 4 bytes")
    assert gpu_check.sanitizer_summary("========= ERROR SUMMARY: 0 errors\n") == (0, None)
    racecheck = "========= RACECHECK SUMMARY: 4 hazards displayed (0 errors, 4 warnings)\n"
    assert gpu_check.sanitizer_summary(racecheck) == (0, None)
    assert gpu_check.sanitizer_summary("========= RACECHECK SUMMARY: 2 hazards displayed (1 error, 1 warning)")[0] == 1
    assert gpu_check.sanitizer_summary("Device not supported") == (None, None)
