#!/usr/bin/env python3
"""Compiles each CUDA kernel header (csrc/cuda/*.cuh) on its own with nvcc for every target arch,
records ptxas's per-kernel resources in benchmarks/cuda_resources.md, and exits non-zero on any
compiler warning or register spill (docs/design.md §4). Needs only nvcc, no GPU and no torch.

Kernels are found by their ``__global__ void name(`` declarations in namespace
mhgd_fast::cuda_kernels; a kernel template takes one floating type and is instantiated for float
and double (tests/simt/README.md).

    python tools/check_cuda_resources.py [--output PATH] [--nvcc PATH] [HEADER ...]
"""
import argparse
import ast
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNEL_DIR = ROOT / "csrc" / "cuda"
NAMESPACE = "mhgd_fast::cuda_kernels"
LAUNCH_BOUNDS = r"(?:__launch_bounds__\s*\([^)]*\)\s*)?"
KERNEL_RE = re.compile(r"(template\s*<\s*typename\s+\w+\s*>\s*)?__global__\s+" + LAUNCH_BOUNDS + r"void\s+"
                       + LAUNCH_BOUNDS + r"(\w+)\s*\(")


def setup_constant(name):
    """A constant assigned at the top level of setup.py, read without importing setup.py (which
    needs torch)."""
    match = re.search(rf"^{name} = (.*)$", (ROOT / "setup.py").read_text(), re.M)
    return ast.literal_eval(match.group(1))


def nvcc_flags():
    """setup.py's NVCC_FLAGS."""
    return setup_constant("NVCC_FLAGS")


def default_archs():
    """setup.py's DEFAULT_CUDA_ARCHS ("8.0;9.0") as nvcc's sm numbers (["80", "90"])."""
    return [arch.replace(".", "") for arch in setup_constant("DEFAULT_CUDA_ARCHS").split(";")]


ARCHS = default_archs()


def find_nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def translation_unit(header: Path) -> str:
    """A .cu file that includes ``header`` and instantiates its kernels (taking their address does)."""
    refs = []
    for template, name in KERNEL_RE.findall(header.read_text()):
        refs += [f"(void*)&{name}<{t}>" for t in ("float", "double")] if template else [f"(void*)&{name}"]
    if not refs:
        return ""
    return (f'#include "{header.resolve()}"\nusing namespace {NAMESPACE};\n'
            f"void* mhgd_resource_check_kernels[] = {{{', '.join(refs)}}};\n")


def short_name(mangled: str) -> str:
    """``_ZN9mhgd_fast...IfEEv...`` -> ``attention_softmax_forward<float>``."""
    demangled = subprocess.run(["c++filt", mangled], capture_output=True, text=True).stdout.strip() or mangled
    demangled = re.sub(r"^void ", "", demangled).replace(NAMESPACE + "::", "")
    return demangled.split("(")[0]


def parse_ptxas(report: str):
    """Rows of (kernel, registers, smem, stack, spill stores, spill loads) from ``ptxas -v`` output."""
    rows, kernel, frame = [], None, None
    for line in report.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)'", line):
            kernel, frame = short_name(m.group(1)), None
        elif m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line):
            frame = tuple(map(int, m.groups()))
        elif kernel and (m := re.search(r"Used (\d+) registers", line)):
            smem = re.search(r"(\d+) bytes smem", line)
            stack, stores, loads = frame or (0, 0, 0)
            rows.append((kernel, int(m.group(1)), int(smem.group(1)) if smem else 0, stack, stores, loads))
            kernel = None
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "cuda_resources.md")
    parser.add_argument("--nvcc", default=find_nvcc())
    parser.add_argument("headers", nargs="*", type=Path, help="kernel headers (default: csrc/cuda/*.cuh)")
    args = parser.parse_args()
    if not args.nvcc:
        sys.exit("check_cuda_resources: nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    flags = nvcc_flags() + ["-Xptxas=-v"]
    version = subprocess.run([args.nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]

    table, problems, headers_with_kernels = [], [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for header in args.headers or sorted(KERNEL_DIR.glob("*.cuh")):
            source = translation_unit(header)
            if not source:
                continue
            headers_with_kernels += 1
            tu = Path(tmp) / f"{header.stem}_check.cu"
            tu.write_text(source)
            for arch in ARCHS:
                cmd = [args.nvcc, "-c", *flags, f"-I{KERNEL_DIR}", f"-gencode=arch=compute_{arch},code=sm_{arch}", str(tu),
                       "-o", str(Path(tmp) / "out.o")]
                result = subprocess.run(cmd, capture_output=True, text=True)
                report = result.stdout + result.stderr
                if result.returncode != 0 or re.search(r"warning", report, re.I):
                    problems.append(f"{header.name} sm_{arch}: nvcc failed or warned:\n{report}")
                for kernel, regs, smem, stack, stores, loads in parse_ptxas(report):
                    table.append(f"| {header.name} | `{kernel}` | sm_{arch} | {regs} | {smem} | {stack} "
                                 f"| {stores} | {loads} |")
                    if stores or loads:
                        problems.append(f"{header.name} sm_{arch}: {kernel} spills "
                                        f"({stores} B stores, {loads} B loads)")

    # No time stamp: rerunning on unchanged code leaves the committed report unchanged.
    lines = ["# CUDA kernel resources (ptxas)", "",
             "Written by `make cuda-check` (tools/check_cuda_resources.py): each csrc/cuda/*.cuh compiled on "
             "its own; a warning or a spill fails the check.", "",
             f"- nvcc: {version}", f"- flags: `{' '.join(flags)}`", "",
             "| header | kernel | arch | registers | smem (B) | stack (B) | spill stores (B) | spill loads (B) |",
             "|---|---|---|---:|---:|---:|---:|---:|", *table, ""]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines))
    print("\n".join(lines))
    if not headers_with_kernels:
        problems.append("no __global__ kernels found in the headers")
    for problem in problems:
        print(f"check_cuda_resources: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
