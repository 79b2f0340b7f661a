"""Native (non-Python) surfaces: the installed CMake package, the google-benchmark binary and the
host-overhead script.

- test_cpp_consumer: tests/cpp_consumer is configured against the installed absparse
  (find_package(absparse 0.1) with CMAKE_PREFIX_PATH = absparse.cmake_prefix_path), built and run.
- test_benchmark_smoke: the top-level project is configured with the benchmarks on and no Python
  extension; absparse_bench_cpu runs every benchmark once (--benchmark_dry_run on google-benchmark
  versions that have it, else one iteration each through --benchmark_min_time).
- test_host_overhead_script: bench/host_overhead.py in a short mode.

Skipped with the reason when cmake or a C++ compiler is missing, or (benchmark smoke only) when
CMake does not find google-benchmark. Builds use at most 2 jobs and Release.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
JOBS = "2"
BENCH_FAMILIES = ("update_centroids", "select_blocks", "sparse_decode", "dense_decode",
                  "quantize_rows")
HOST_OVERHEAD_OPS = ("dense_decode", "sparse_decode", "select_blocks", "update_centroids",
                     "_C.decode_attention", "torch.add")


def _run(cmd, timeout, **kwargs):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                          **kwargs)


def _check(proc, what):
    assert proc.returncode == 0, (f"{what} failed (exit {proc.returncode}):\n"
                                  f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")


@pytest.fixture(scope="session")
def cmake_tools():
    """Arguments for `cmake -S ... -B ...`: generator and build type. Skips without cmake/C++."""
    if shutil.which("cmake") is None:
        pytest.skip("cmake not found on PATH")
    cxx = os.environ.get("CXX") or next(
        (c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)
    if cxx is None or shutil.which(cxx.split()[0]) is None:
        pytest.skip("no C++ compiler found (CXX unset and none of c++, g++, clang++ on PATH)")
    args = ["-DCMAKE_BUILD_TYPE=Release"]
    if shutil.which("ninja"):
        args += ["-G", "Ninja"]
    return args


def _absparse_cmake_prefix():
    """absparse.cmake_prefix_path; in an editable install that is the source package (no CMake
    package there), so the directory of absparse._C, where the build's install step put lib/ and
    include/, is used instead (with a warning)."""
    import absparse

    config = Path("lib", "cmake", "absparse", "absparseConfig.cmake")
    prefix = Path(absparse.cmake_prefix_path)
    if (prefix / config).is_file():
        return prefix
    installed = Path(absparse._C.__file__).resolve().parent
    assert (installed / config).is_file(), (
        f"no {config} under absparse.cmake_prefix_path ({prefix}) nor beside absparse._C "
        f"({installed})")
    warnings.warn(f"absparse.cmake_prefix_path ({prefix}) holds no CMake package (editable "
                  f"install?); using the directory of absparse._C ({installed})")
    return installed


def test_cpp_consumer(cmake_tools, tmp_path):
    prefix = _absparse_cmake_prefix()
    build = tmp_path / "consumer"
    proc = _run(["cmake", "-S", REPO / "tests" / "cpp_consumer", "-B", build, *cmake_tools,
                 f"-DCMAKE_PREFIX_PATH={prefix}"], timeout=180)
    _check(proc, "configuring tests/cpp_consumer")
    assert "absparse_consumer: found absparse" in proc.stdout
    _check(_run(["cmake", "--build", build, "-j", JOBS], timeout=300), "building the consumer")
    exe = next(p for p in (build / "consumer", build / "Release" / "consumer") if p.exists())
    proc = _run([exe], timeout=60)
    assert proc.returncode == 0, f"consumer exit {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    assert "absparse consumer OK" in proc.stdout, proc.stdout


@pytest.fixture(scope="session")
def bench_binary(cmake_tools, tmp_path_factory):
    """absparse_bench_cpu built from the top-level project (CPU only, no Python extension)."""
    build = tmp_path_factory.mktemp("bench_build")
    proc = _run(["cmake", "-S", REPO, "-B", build, *cmake_tools, "-DABSPARSE_CUDA=OFF",
                 "-DABSPARSE_BUILD_BENCH=ON", "-DABSPARSE_BUILD_PYTHON=OFF"], timeout=180)
    _check(proc, "configuring absparse with the benchmarks")
    skipped = re.search(r"^-- (absparse: google-benchmark not found.*)$", proc.stdout, re.M)
    if skipped:
        pytest.skip(skipped.group(1))
    _check(_run(["cmake", "--build", build, "--target", "absparse_bench_cpu", "-j", JOBS],
                timeout=600), "building absparse_bench_cpu")
    return next(p for p in build.rglob("absparse_bench_cpu")
                if p.is_file() and os.access(p, os.X_OK))


def _smoke_flags(binary):
    """--benchmark_dry_run where supported; else one iteration per benchmark: `1x` on
    google-benchmark 1.8 (iteration-count syntax), `0` seconds on 1.7 and older (the first
    1-iteration run already meets a 0 s minimum, so it is reported)."""
    usage = _run([binary, "--help"], timeout=60).stdout
    if "benchmark_dry_run" in usage:
        return ["--benchmark_dry_run=true"]
    if re.search(r"benchmark_min_time=\S*x", usage):
        return ["--benchmark_min_time=1x"]
    return ["--benchmark_min_time=0"]


def test_benchmark_smoke(bench_binary, tmp_path):
    listed = _run([bench_binary, "--benchmark_list_tests=true"], timeout=60)
    _check(listed, "absparse_bench_cpu --benchmark_list_tests")
    names = listed.stdout.split()
    for family in BENCH_FAMILIES:
        assert any(n.startswith(family + "/") for n in names), f"no {family} benchmark in {names}"
    out = tmp_path / "smoke.json"
    proc = _run([bench_binary, *_smoke_flags(bench_binary), f"--benchmark_out={out}",
                 "--benchmark_out_format=json"], timeout=300)
    _check(proc, "absparse_bench_cpu smoke run")
    runs = json.loads(out.read_text())["benchmarks"]
    errors = {r["name"]: r.get("error_message") for r in runs if r.get("error_occurred")}
    assert not errors, f"benchmarks reported errors: {errors}"
    ran = {r["name"] for r in runs}
    assert set(names) <= ran, f"not run: {sorted(set(names) - ran)}"
    for name in names:
        assert name in proc.stdout, f"{name} missing from the console output"


def test_host_overhead_script(tmp_path):
    out = tmp_path / "host_overhead.json"
    proc = _run([sys.executable, REPO / "bench" / "host_overhead.py", "--calls", "200",
                 "--warmup", "20", "--json", out], timeout=120, cwd=tmp_path)
    _check(proc, "bench/host_overhead.py --calls 200")
    assert "| op | call | median µs | p10 µs | p90 µs |" in proc.stdout, proc.stdout
    for op in HOST_OVERHEAD_OPS:
        assert f"| `{op}` |" in proc.stdout, f"no row for {op}:\n{proc.stdout}"
    data = json.loads(out.read_text())
    assert {"device", "date", "torch", "command"} <= set(data)
    rows = {r["op"]: r for r in data["results"]}
    for op in HOST_OVERHEAD_OPS:
        r = rows[op]
        assert r["calls"] == 200
        assert 0 < r["p10_us"] <= r["median_us"] <= r["p90_us"], r
