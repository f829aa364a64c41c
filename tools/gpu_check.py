#!/usr/bin/env python3
"""One-command GPU check (`make gpu-check`): build the CUDA extension in place, run the CUDA tests,
compute-sanitizer (memcheck, racecheck) on small cases of every kernel, and the GPU benchmarks;
write one JSON and one Markdown report.

    python tools/gpu_check.py [--out DIR] [--deadline S] [--no-build]   # on a machine with a GPU
    python tools/gpu_check.py --cpu-smoke [--out DIR]                    # the same harness on the CPU

Stages, in order: environment (python, torch and its CUDA, the GPU, nvcc, compute-sanitizer),
build (``setup.py build_ext --inplace`` with FORCE_CUDA=1), extension (what got loaded),
tests (``pytest -m cuda tests``), memcheck and racecheck (compute-sanitizer over
``--worker sanitizer_cases``, only our kernels instrumented), bench_graph_kl (fused fwd+bwd
against eager PyTorch and torch.compile of the reference, benchmarks.scaling), bench_topk
(topk_singular_vectors against torch.linalg.svd and Gram + eigh, benchmarks.compression)
and bench_mhgd (the whole MHGD loss next to a ResNet32 fwd and a ResNet8 fwd+bwd step).

Every stage ends pass, fail or skipped, with a reason. Each runs in a subprocess with its own time
budget, cut to what is left of the global deadline (default 470 s, inside the 8 minutes a lent
H200 gets); a stage that cannot start in time is skipped with a note. The exit status is 1 when a
stage failed, else 0. ``--cpu-smoke`` skips the build and the sanitizer, runs the sanitizer's
cases and the benchmarks on the CPU at tiny sizes, and torch.compile with its aot_eager backend
(no code generation), so CI keeps the harness working (tests/test_gpu_check.py).

Written to the output folder (``--out``, else $OUT, else ./gpu-check-out): gpu_check.json,
gpu_check.md, and gpu_check.log with every subprocess's output. The parent never imports torch,
so a machine without it still gets a report saying so.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DEADLINE_S = 470.0
MIN_STAGE_S = 15.0  # a stage is not started with less time than this left
RESERVE_S = 5.0  # kept back for writing the reports
SANITIZER_ERROR_EXIT = 86  # compute-sanitizer's exit status when it found errors (vs the worker's own 1)
KERNEL_FILTER = "kns=mhgd_fast"  # only kernels whose mangled name has our namespace are instrumented
LOG_CHARS_PER_STAGE = 2_000_000

# Seconds each stage may take on an H200 (the build dominates; compute-sanitizer slows a launch
# 10-100×, so its cases are tiny).
BUDGETS = {"environment": 45, "build": 240, "extension": 40, "tests": 150, "memcheck": 90, "racecheck": 90,
           "bench_graph_kl": 120, "bench_topk": 60, "bench_mhgd": 60}
SMOKE_BUDGETS = {name: 120 for name in BUDGETS}


@dataclass
class Stage:
    name: str
    status: str  # "pass", "fail" or "skipped"
    reason: str
    seconds: float = 0.0
    details: Dict[str, object] = field(default_factory=dict)


# ---------------------------------------------------------------------------- output parsing

def pytest_counts(output: str) -> Dict[str, int]:
    """Counts of pytest's final summary line (``3 failed, 10 passed, 2 skipped in 4.2s``)."""
    lines = [line for line in output.splitlines() if re.search(r"\b(passed|failed|skipped|error|errors|"
                                                               r"deselected|no tests ran)\b", line)]
    counts: Dict[str, int] = {}
    if lines:
        for number, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)",
                                       lines[-1]):
            counts["errors" if word.startswith("error") else word] = int(number)
    return counts


def sanitizer_summary(output: str) -> Tuple[Optional[int], Optional[str]]:
    """(errors reported, first reported problem) from compute-sanitizer's output; errors is None
    when no summary line was printed (the tool did not get to the end)."""
    errors = None
    # memcheck: "ERROR SUMMARY: 2 errors"; racecheck: "RACECHECK SUMMARY: 3 hazards displayed (1 error,
    # 2 warnings)", where only the errors count (warnings are hazards it cannot confirm).
    for match in re.finditer(r"ERROR SUMMARY: (\d+) errors?|RACECHECK SUMMARY: \d+ hazards? displayed "
                             r"\((\d+) errors?", output):
        errors = max(errors or 0, int(match.group(1) or match.group(2)))
    first = next((line.strip("= ").strip() for line in output.splitlines()
                  if re.search(r"=+ (Invalid|Race|Error|Program hit|Malloc|Barrier|Uninitialized|Warning)",
                               line)), None)
    return errors, first


def tail(text: str, lines: int = 12) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


# ---------------------------------------------------------------------------- tools on the machine

def find_tool(name: str) -> Optional[str]:
    """``name`` on PATH, in $CUDA_HOME/bin or under /usr/local/cuda*/ (the newest first)."""
    found = shutil.which(name)
    if found:
        return found
    homes = [os.environ.get(v) for v in ("CUDA_HOME", "CUDA_PATH")] + sorted(glob.glob("/usr/local/cuda*"),
                                                                             reverse=True)
    for home in filter(None, homes):
        for candidate in (Path(home) / "bin" / name, Path(home) / name / name):
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    return None


def first_line_of(argv: Sequence[str]) -> Optional[str]:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[-1].strip() if lines else None


# ---------------------------------------------------------------------------- the check

class Check:
    """Runs the stages in order against one global deadline and collects their results."""

    def __init__(self, args: argparse.Namespace, out: Path):
        self.args, self.out = args, out
        self.smoke = args.cpu_smoke
        self.device = "cpu" if self.smoke else "cuda"
        self.started = time.monotonic()
        self.started_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self.deadline = self.started + args.deadline
        self.stages: List[Stage] = []
        self.benchmarks: Dict[str, object] = {}
        self.environment: Dict[str, object] = {}
        self.work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
        self.log = open(out / "gpu_check.log", "w", encoding="utf-8")
        # The package the stages import: the source tree's, which the GPU flow builds in place; in
        # a smoke run without a build in the tree (CI, after `make install`) the installed one, so
        # the repo root stays off sys.path (no PYTHONPATH entry; pytest under ``python -P``).
        self.use_tree = not self.smoke or args.build or (ROOT / "mhgd_fast" / "_build_meta.json").exists()
        self.python = [args.python] + ([] if self.use_tree else ["-P"])
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            filter(None, [str(ROOT) if self.use_tree else None, os.environ.get("PYTHONPATH")])), PYTHONUNBUFFERED="1")

    # -- plumbing

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, argv: Sequence[str], timeout: float, env: Optional[dict] = None) -> Tuple[int, str, bool]:
        """(exit status, stdout+stderr, timed out) of ``argv`` in the repo root; on timeout its
        whole process group is killed."""
        try:
            proc = subprocess.Popen(list(argv), cwd=ROOT, env=env or self.env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
        except OSError as exc:  # no such interpreter or tool
            self.log.write(f"\n$ {' '.join(argv)}\n(could not start: {exc})\n")
            return 127, f"could not start {argv[0]}: {exc}", False
        try:
            output, _ = proc.communicate(timeout=max(timeout, 1.0))
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            timed_out = True
        self.log.write(f"\n$ {' '.join(argv)}\n(exit {proc.returncode}{', timed out' if timed_out else ''})\n")
        self.log.write(output[-LOG_CHARS_PER_STAGE:])
        self.log.flush()
        return proc.returncode, output, timed_out

    def worker(self, name: str, timeout: float, prefix: Sequence[str] = (), env: Optional[dict] = None,
               extra: Sequence[str] = ()) -> Tuple[Optional[dict], int, str, bool]:
        """Runs ``gpu_check.py --worker name`` (under ``prefix``, e.g. compute-sanitizer); returns
        the JSON it wrote (None if it wrote none), its exit status, output and whether it timed out."""
        result = self.work / f"{name}.json"
        result.unlink(missing_ok=True)
        argv = [*prefix, self.args.python, str(Path(__file__).resolve()), "--worker", name, "--device", self.device,
                "--result", str(result), "--budget", str(max(timeout - 10.0, 5.0)), "--threads", str(self.args.threads)]
        rc, output, timed_out = self.run(argv + (["--cpu-smoke"] if self.smoke else []) + list(extra), timeout, env)
        data = json.loads(result.read_text()) if result.exists() else None
        return data, rc, output, timed_out

    def stage(self, name: str, body: Callable[[float], Stage], skip: Optional[str] = None) -> Stage:
        budget = (SMOKE_BUDGETS if self.smoke else BUDGETS)[name]
        timeout = min(budget, self.left() - RESERVE_S)
        print(f"[gpu-check] {name} ...", flush=True)
        self.log.write(f"\n===== {name} =====\n")
        start = time.monotonic()
        if skip is None and timeout < MIN_STAGE_S:
            skip = (f"global deadline: {max(self.left(), 0):.0f} s of the {self.args.deadline:.0f} s left, "
                    f"not enough to start it (budget {budget} s)")
        if skip is not None:
            result = Stage(name, "skipped", skip)
        else:
            try:
                result = body(timeout)
            except Exception as exc:  # a bug of this script must still leave a report
                result = Stage(name, "fail", f"gpu_check.py raised {type(exc).__name__}: {exc}")
        result.seconds = round(time.monotonic() - start, 1)
        self.stages.append(result)
        print(f"[gpu-check] {name}: {result.status} ({result.seconds} s) {result.reason}", flush=True)
        return result

    # -- stages

    def environment_stage(self, timeout: float) -> Stage:
        tools = {}
        for tool in ("nvcc", "compute-sanitizer", "nvidia-smi", "ninja", "c++"):
            tools[tool] = find_tool(tool)
        versions = {"nvcc": first_line_of([tools["nvcc"], "--version"]) if tools["nvcc"] else None,
                    "compute-sanitizer": first_line_of([tools["compute-sanitizer"], "--version"])
                    if tools["compute-sanitizer"] else None,
                    "nvidia-smi": first_line_of([tools["nvidia-smi"], "-L"]) if tools["nvidia-smi"] else None}
        self.environment.update(python_executable=self.args.python, machine=platform.machine(),
                                cpu_count=os.cpu_count(), tools=tools, tool_versions=versions)
        data, rc, output, timed_out = self.worker("probe", timeout)
        if data is None:
            return Stage("environment", "fail", f"python could not import torch ({self.args.python}): "
                         + (tail(output, 3) or f"exit {rc}") + ("; timed out" if timed_out else ""),
                         details=self.environment)
        self.environment.update(data)
        missing = [m for m in data["missing_modules"]]
        problems = []
        if not self.smoke:
            if data["torch_cuda"] is None:
                problems.append(f"torch {data['torch']} is a CPU build")
            elif not data["cuda_available"]:
                problems.append("torch sees no GPU (torch.cuda.is_available() is False)")
            if not tools["nvcc"]:
                problems.append("no nvcc (not on PATH, $CUDA_HOME/bin or /usr/local/cuda*/bin): the CUDA "
                                "kernels cannot be built")
        if missing:
            problems.append("missing Python modules: " + ", ".join(missing))
        where = (f"{data.get('device_name')} (sm_{data.get('capability')}), torch {data['torch']} "
                 f"(CUDA {data['torch_cuda']}), Python {data['python']}") if data.get("cuda_available") else \
            f"CPU only, torch {data['torch']} (CUDA build: {data['torch_cuda']}), Python {data['python']}"
        notes = [] if tools["compute-sanitizer"] else ["no compute-sanitizer: memcheck/racecheck will be skipped"]
        if problems:
            return Stage("environment", "fail", "; ".join(problems + notes) + f" [{where}]", details=self.environment)
        return Stage("environment", "pass", "; ".join([where] + notes), details=self.environment)

    def build_stage(self, timeout: float) -> Stage:
        if self.smoke and not self.args.build:
            return Stage("build", "skipped", "--cpu-smoke: uses the extension as already built (no compile)")
        if self.args.no_build:
            return Stage("build", "skipped", "--no-build: uses the extension as already built")
        env = dict(self.env, MAX_JOBS=str(os.cpu_count() or 4))
        env.update({"FORCE_ONLY_CPU": "1"} if self.smoke else {"FORCE_CUDA": "1"})
        rc, output, timed_out = self.run([self.args.python, "setup.py", "build_ext", "--inplace"], timeout, env)
        if timed_out:
            return Stage("build", "fail", f"did not finish within {timeout:.0f} s")
        if rc != 0:
            errors = [line for line in output.splitlines() if re.search(r"error|Error", line)]
            return Stage("build", "fail", f"setup.py build_ext exited {rc}: " + " | ".join(errors[:3] or [tail(output, 3)]))
        return Stage("build", "pass", "setup.py build_ext --inplace " + ("(CPU kernels)" if self.smoke else "with FORCE_CUDA=1"))

    def extension_stage(self, timeout: float) -> Stage:
        data, rc, output, _ = self.worker("extension", timeout)
        if data is None:
            return Stage("extension", "fail", "importing mhgd_fast failed: " + tail(output, 3))
        self.environment["extension"] = data
        info, backends = data["build_info"], data["available_backends"]
        summary = (f"backends {backends}, compiled {info['compiled_backends']}"
                   + (f", archs {info.get('build_cuda_archs')}" if info.get("build_cuda_archs") else ""))
        if not info["extension_loaded"]:
            return Stage("extension", "fail" if not self.smoke else "skipped",
                         f"extension not loaded: {info.get('extension_problem')}", details=data)
        if not self.smoke and "cuda" not in backends:
            return Stage("extension", "fail", f"no usable cuda backend: {summary}", details=data)
        return Stage("extension", "pass", summary, details=data)

    def cuda_backend_problem(self) -> Optional[str]:
        """Why the kernels cannot run on the GPU here (None when they can, or in --cpu-smoke)."""
        if self.smoke:
            return None
        ext = self.environment.get("extension")
        if not self.environment.get("cuda_available"):
            return "no usable GPU (see the environment stage)"
        if not ext or "cuda" not in ext["available_backends"]:
            return "the extension has no usable cuda backend (see the build and extension stages)"
        return None

    def tests_stage(self, timeout: float) -> Stage:
        env = dict(self.env, MHGD_REQUIRE_EXTENSION="0" if self.smoke else "1")
        argv = [*self.python, "-m", "pytest", "-m", "cuda", "tests", "-q", "-p", "no:cacheprovider"]
        rc, output, timed_out = self.run(argv, timeout, env)
        counts = pytest_counts(output)
        failed = [line[len("FAILED "):] for line in output.splitlines() if line.startswith(("FAILED ", "ERROR "))]
        details = {"counts": counts, "failed": failed[:50], "exit_status": rc}
        said = ", ".join(f"{n} {w}" for w, n in counts.items()) or "no summary line"
        if timed_out:
            return Stage("tests", "fail", f"pytest -m cuda did not finish within {timeout:.0f} s ({said})", details=details)
        if rc not in (0, 5):
            return Stage("tests", "fail", f"pytest -m cuda: {said}" + (f"; first: {failed[0]}" if failed else ""),
                         details=details)
        if counts.get("passed", 0) == 0:
            if self.smoke:
                return Stage("tests", "skipped", f"no GPU: pytest -m cuda ran, {said}", details=details)
            return Stage("tests", "fail", f"no CUDA test ran ({said})", details=details)
        return Stage("tests", "pass", f"pytest -m cuda: {said}", details=details)

    def sanitizer_stage(self, tool: str, timeout: float) -> Stage:
        sanitizer = self.environment.get("tools", {}).get("compute-sanitizer")
        if self.smoke or not sanitizer:
            why = "--cpu-smoke" if self.smoke else "compute-sanitizer not found (PATH, $CUDA_HOME/bin, /usr/local/cuda*/bin)"
            data, rc, output, _ = self.worker("sanitizer_cases", timeout)
            if data is None or rc != 0:
                return Stage(tool, "fail", f"the sanitizer cases failed without the sanitizer ({why}): {tail(output, 3)}")
            return Stage(tool, "skipped", f"{why}: ran its {len(data['cases'])} cases on the {self.device} "
                         "backend without it, all finite", details=data)
        prefix = [sanitizer, "--tool", tool, "--error-exitcode", str(SANITIZER_ERROR_EXIT), "--report-api-errors", "no",
                  "--kernel-name", KERNEL_FILTER, "--print-limit", "20"]
        # Every allocation its own cudaMalloc, so that an overrun is not hidden inside a cached block.
        env = dict(self.env, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
        data, rc, output, timed_out = self.worker("sanitizer_cases", timeout, prefix=prefix, env=env)
        errors, first = sanitizer_summary(output)
        details = {"exit_status": rc, "errors": errors, "first": first, "filter": KERNEL_FILTER,
                   "cases": data["cases"] if data else None}
        if errors is None and re.search(r"not supported|Unable to|Target application terminated before", output,
                                        re.I) and data is None:
            return Stage(tool, "skipped", f"compute-sanitizer could not run here: {tail(output, 2)}", details=details)
        if errors:
            return Stage(tool, "fail", f"{errors} errors; first: {first}", details=details)
        if timed_out:
            return Stage(tool, "fail", f"did not finish within {timeout:.0f} s", details=details)
        if rc != 0 or data is None:
            return Stage(tool, "fail", f"exit {rc}: {tail(output, 3)}", details=details)
        return Stage(tool, "pass", f"{len(data['cases'])} cases of every kernel, 0 errors "
                     f"(kernels matching {KERNEL_FILTER})", details=details)

    def bench_stage(self, name: str, timeout: float) -> Stage:
        data, rc, output, timed_out = self.worker(name, timeout)
        if data is None:
            return Stage(name, "fail", ("timed out" if timed_out else f"exit {rc}") + ": " + tail(output, 3))
        self.benchmarks[name] = data
        errors, skipped = data.get("errors", []), data.get("skipped", [])
        note = f"{len(data['results'])} results" + (f"; skipped for time: {', '.join(skipped)}" if skipped else "")
        if errors:
            return Stage(name, "fail", f"{note}; errors: " + " | ".join(errors[:3]), details={"errors": errors})
        return Stage(name, "pass", note)

    # -- the whole run

    def run_all(self) -> int:
        env = self.stage("environment", self.environment_stage)
        no_env = {"pass": None, "fail": "the environment stage failed"}.get(
            env.status, f"the environment stage was skipped: {env.reason}")
        self.stage("build", self.build_stage, skip=no_env)
        self.stage("extension", self.extension_stage, skip=no_env)
        gpu = no_env or self.cuda_backend_problem()
        self.stage("tests", self.tests_stage, skip=gpu)
        for tool in ("memcheck", "racecheck"):
            self.stage(tool, lambda t, tool=tool: self.sanitizer_stage(tool, t), skip=gpu)
        for name in ("bench_graph_kl", "bench_topk", "bench_mhgd"):
            self.stage(name, lambda t, name=name: self.bench_stage(name, t), skip=gpu)
        code = 1 if any(s.status == "fail" for s in self.stages) else 0
        self.write_reports(code)
        shutil.rmtree(self.work, ignore_errors=True)
        self.log.close()
        return code

    def write_reports(self, code: int) -> None:
        header = {"mode": "cpu-smoke" if self.smoke else "gpu", "started": self.started_at,
                  "seconds": round(time.monotonic() - self.started, 1), "deadline_s": self.args.deadline,
                  "exit_status": code, "environment": self.environment}
        with open(self.out / "gpu_check.json", "w", encoding="utf-8") as f:
            json.dump({"header": header, "stages": [asdict(s) for s in self.stages], "benchmarks": self.benchmarks},
                      f, indent=2, default=str)
            f.write("\n")
        markdown = self.markdown(header)
        (self.out / "gpu_check.md").write_text(markdown, encoding="utf-8")
        print("\n" + markdown, flush=True)

    def markdown(self, header: dict) -> str:
        lines = [f"# mhgd_fast GPU check ({header['mode']}), {header['started']}", "",
                 f"{self.environment_line()}; {header['seconds']} s of a {header['deadline_s']:.0f} s deadline; "
                 f"exit status {header['exit_status']}.", "",
                 "| stage | status | s | reason |", "|---|---|---:|---|"]
        lines += [f"| {s.name} | {s.status} | {s.seconds} | {s.reason.replace('|', '/')} |" for s in self.stages]
        for name, title in (("bench_graph_kl", "graph_kl fwd+bwd: fused kernel vs eager and torch.compile'd reference"),
                            ("bench_topk", "topk_singular_vectors vs torch.linalg.svd and Gram + eigh"),
                            ("bench_mhgd", "The whole MHGD loss next to the networks' step")):
            if name in self.benchmarks:
                data = self.benchmarks[name]
                lines += ["", f"## {title}", "", data["caption"], "", *data["table"]]
        return "\n".join(lines) + "\n"

    def environment_line(self) -> str:
        e = self.environment
        gpu = e.get("device_name") if e.get("cuda_available") else "no GPU"
        return (f"{gpu}, torch {e.get('torch')} (CUDA {e.get('torch_cuda')}), Python {e.get('python')}, "
                f"nvcc: {(e.get('tool_versions') or {}).get('nvcc') or 'none'}, "
                f"compute-sanitizer: {'yes' if (e.get('tools') or {}).get('compute-sanitizer') else 'none'}")


# ---------------------------------------------------------------------------- workers (subprocesses)

def worker_probe(args) -> dict:
    import importlib.util

    import torch
    data = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "device_count": torch.cuda.device_count(),
            "missing_modules": [m for m in ("numpy", "scipy", "tqdm", "matplotlib", "pytest", "setuptools")
                                if importlib.util.find_spec(m) is None]}
    if data["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        data.update(device_name=props.name, capability="%d%d" % (props.major, props.minor),
                    memory_gib=round(props.total_memory / 2 ** 30, 1), multiprocessors=props.multi_processor_count)
    return data


def worker_extension(args) -> dict:
    import mhgd_fast as mf
    return {"build_info": mf.build_info(), "available_backends": mf.available_backends()}


def sanitizer_cases(device: str):
    """(name, call) pairs: small inputs that launch every kernel of the device's backend on each of
    its paths (row blocks over 256 columns, > 48 KB of shared memory, both Gram routes, power
    iteration, the exact fallback of a rank-deficient map), float32 and float64."""
    import torch

    import mhgd_fast as mf
    backend = device

    def randn(*shape, dtype, grad=False):
        return torch.randn(*shape, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_(grad)

    def attention(h, n, m, d, squash, dtype):
        q, k = randn(h, n, d, dtype=dtype, grad=True), randn(h, m, d, dtype=dtype, grad=True)
        out = mf.ops.attention_graph(q, k, squash=squash, scale=0.7, backend=backend)
        return [out, *torch.autograd.grad((out * torch.randn_like(out)).sum(), (q, k))]

    def graph_kl(h, n, m, d, reduction, direction, dtype):
        t = [randn(h, rows, d, dtype=dtype, grad=True) for rows in (n, m, n, m)]
        out = mf.ops.graph_kl(*t, direction=direction, reduction=reduction, backend=backend)
        weight = torch.randn_like(out) if reduction == "none" else 1.0
        return [out, *torch.autograd.grad((out * weight).sum(), t)]

    def topk(b, c, hw, k, grad, dtype, rank=None):
        fm = torch.relu(torch.randn(b, c, hw, dtype=torch.float64))
        if rank is not None:
            fm = torch.randn(b, c, rank, dtype=torch.float64) @ torch.randn(b, rank, hw, dtype=torch.float64)
        fm = fm.to(device=device, dtype=dtype).requires_grad_(grad)
        out = mf.ops.topk_singular_vectors(fm, k, backend=backend)
        return [out] + (list(torch.autograd.grad((out * torch.randn_like(out)).sum(), fm)) if grad else [])

    cases = []
    for dtype in (torch.float32, torch.float64):
        tag = str(dtype).replace("torch.", "")
        cases += [
            (f"attention_graph {tag} 2x7x45x5 squash", lambda dtype=dtype: attention(2, 7, 45, 5, "tanh", dtype)),
            (f"attention_graph {tag} 1x3x300x9", lambda dtype=dtype: attention(1, 3, 300, 9, None, dtype)),
            (f"graph_kl {tag} 2x9x37x6 rows", lambda dtype=dtype: graph_kl(2, 9, 37, 6, "none", "student_teacher", dtype)),
            (f"graph_kl {tag} 3x5x40x7 fused mean t-s",
             lambda dtype=dtype: graph_kl(3, 5, 40, 7, "mean", "teacher_student", dtype)),
            (f"graph_kl {tag} 1x6x5x520 fused sum (> 48 KB shared)",
             lambda dtype=dtype: graph_kl(1, 6, 5, 520, "sum", "student_teacher", dtype)),
            (f"topk {tag} 3x6x20 k1 power", lambda dtype=dtype: topk(3, 6, 20, 1, False, dtype)),
            (f"topk {tag} 3x6x20 k4 grad", lambda dtype=dtype: topk(3, 6, 20, 4, True, dtype)),
            (f"topk {tag} 2x12x6 k3 grad (XXt route)", lambda dtype=dtype: topk(2, 12, 6, 3, True, dtype)),
            (f"topk {tag} 2x9x11 k5 grad rank 2", lambda dtype=dtype: topk(2, 9, 11, 5, True, dtype, rank=2)),
        ]
    return cases


def worker_sanitizer_cases(args) -> dict:
    import torch
    torch.manual_seed(0)
    done = []
    for name, call in sanitizer_cases(args.device):
        outputs = call()
        if args.device == "cuda":
            torch.cuda.synchronize()
        bad = [i for i, t in enumerate(outputs) if not bool(torch.isfinite(t).all())]
        if bad:
            raise SystemExit(f"{name}: non-finite output(s) {bad}")
        done.append(name)
    return {"cases": done}


class Budget:
    """The worker's own time budget: cases that would start after it are skipped and listed."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def allows(self, guess_s: float = 0.0) -> bool:
        return time.monotonic() + guess_s < self.end


def bench_header(device: str) -> dict:
    import torch

    from benchmarks import harness
    return harness.header(device, harness.Repeats(warmup=0, repeat=0))


def worker_bench_graph_kl(args) -> dict:
    import torch

    from benchmarks import scaling as bench_scaling
    torch.set_num_threads(args.threads)
    smoke, budget = args.cpu_smoke, Budget(args.budget)
    batches = (16, 32) if smoke else bench_scaling.BATCHES
    fused_only = (64,) if smoke else bench_scaling.FUSED_ONLY_BATCHES
    compile_backend = "aot_eager" if smoke else "inductor"
    jobs = [(impl, b) for b in batches for impl in bench_scaling.IMPLEMENTATIONS] + [("fused", b) for b in fused_only]
    results, errors, skipped = [], [], []
    for impl, batch in jobs:
        if not budget.allows(30.0 if impl == "compiled" else 5.0):
            skipped.append(f"{impl} B={batch}")
            continue
        repeats = 2 if smoke else 20 if batch <= 1024 else 10
        try:
            results.append(bench_scaling.measure_in_this_process(impl, batch, repeats, args.threads, args.device,
                                                                 compile_backend))
        except Exception as exc:  # one case's failure (a compile error, say) is reported, the rest run
            errors.append(f"{impl} B={batch}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    header = bench_header(args.device)
    caption = (f"H={bench_scaling.HEADS}, d={bench_scaling.DIM}, sum, tanh; {header['device_name']}, torch "
               f"{header['torch_version']}; median and min–max of the timed calls after warm-up; torch.compile "
               f"backend {compile_backend}; extra peak = "
               + ("CUDA allocator peak during the timed calls minus memory allocated before them"
                  if args.device == "cuda" else "peak RSS during the timed calls minus RSS before them") + ".")
    return {"header": header, "caption": caption, "results": [asdict(r) for r in results],
            "table": bench_scaling.format_markdown(results).splitlines(), "errors": errors, "skipped": skipped}


def worker_bench_topk(args) -> dict:
    import torch

    from benchmarks import compression as bench_compression
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    smoke, budget = args.cpu_smoke, Budget(args.budget)
    batch, repeats = (4, 1) if smoke else (128, 10)
    shapes = [(8, 4), (16, 2)] if smoke else bench_compression.PAPER_SHAPES
    rows, errors, skipped = [], [], []
    for shape in shapes:
        if not budget.allows(5.0):
            skipped.append(f"{shape[0]}×{shape[1]}×{shape[1]}")
            continue
        try:
            rows += bench_compression.compression_times(batch, repeats, args.device, args.device, [shape])
        except Exception as exc:
            errors.append(f"{shape}: {type(exc).__name__}: {exc}")
    header = bench_header(args.device)
    caption = (f"B={batch}, float32 post-ReLU maps; {header['device_name']}, torch {header['torch_version']}; "
               f"median ms of {repeats} round-robin repeats after one warm-up, a device sync after each call.")
    return {"header": header, "caption": caption, "results": rows,
            "table": bench_compression.format_compression(rows, args.device) if rows else [],
            "errors": errors, "skipped": skipped}


def worker_bench_mhgd(args) -> dict:
    import torch

    from benchmarks import compression as bench_compression
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batch, repeats, width = (4, 1, 1) if args.cpu_smoke else (128, 10, 4)
    times = bench_compression.mhgd_times(batch, repeats, args.device, width)
    header = bench_header(args.device)
    caption = (f"B={batch}, CIFAR 32×32, teacher {bench_compression.TEACHER} / student {bench_compression.STUDENT} "
               f"of mhgd_fast.training.models at width {width}, MHGD backend auto; {header['device_name']}, torch "
               f"{header['torch_version']}; median ms of {repeats} round-robin repeats after one warm-up.")
    return {"header": header, "caption": caption, "results": times,
            "table": bench_compression.format_mhgd(times), "errors": [], "skipped": []}


WORKERS = {"probe": worker_probe, "extension": worker_extension, "sanitizer_cases": worker_sanitizer_cases,
           "bench_graph_kl": worker_bench_graph_kl, "bench_topk": worker_bench_topk,
           "bench_mhgd": worker_bench_mhgd}


# ---------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="folder for gpu_check.json/.md/.log (default: $OUT, else ./gpu-check-out)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="no GPU: the same stages on the CPU at tiny sizes; GPU-only parts skipped with reasons")
    parser.add_argument("--deadline", type=float, default=DEFAULT_DEADLINE_S,
                        help="seconds for the whole run; stages that cannot start in time are skipped "
                             "(default: %(default)s)")
    parser.add_argument("--no-build", action="store_true", help="skip the build (use the extension as built)")
    parser.add_argument("--build", action="store_true", help="with --cpu-smoke: build the CPU kernels in place too")
    parser.add_argument("--python", default=sys.executable,
                        help="the Python (with torch) to build and test with (default: this one)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads in the benchmarks (default: all cores; 2 with --cpu-smoke)")
    # Internal: one stage's work in a subprocess.
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=float, default=60.0, help=argparse.SUPPRESS)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads is None:
        args.threads = 2 if args.cpu_smoke else (os.cpu_count() or 1)
    if args.threads < 1:
        build_parser().error("--threads must be at least 1")
    if args.worker:
        data = WORKERS[args.worker](args)
        with open(args.result, "w", encoding="utf-8") as f:
            json.dump(data, f, default=str)
        return 0
    out = Path(args.out or os.environ.get("OUT") or ROOT / "gpu-check-out")
    out.mkdir(parents=True, exist_ok=True)
    return Check(args, out).run_all()


if __name__ == "__main__":
    sys.exit(main())
