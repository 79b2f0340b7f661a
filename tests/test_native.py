"""Native (non-Python) surfaces: the installed CMake package, the google-benchmark binary and the
host-overhead script.

- test_cpp_consumer: tests/cpp_consumer is configured against the installed absparse
  (find_package(absparse 0.1) with CMAKE_PREFIX_PATH = absparse.cmake_prefix_path) with CMake's
  CUDAToolkit search disabled, built and run: the CPU API must not need the CUDA toolkit, even
  when the installed absparse has the CUDA kernels.
- test_cpp_consumer_cuda: the same project with find_package(absparse COMPONENTS cuda), building
  and running consumer_cuda (host-side calls into absparse::absparse_cuda, no GPU needed); skipped
  without nvcc. Against an absparse built without CUDA, configuring must fail and say so.
- test_cuda_component_needs_toolkit: COMPONENTS cuda with the CUDAToolkit search disabled fails
  with a message naming the toolkit; OPTIONAL_COMPONENTS cuda still finds absparse::absparse.
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


NO_CUDA_TOOLKIT = "-DCMAKE_DISABLE_FIND_PACKAGE_CUDAToolkit=ON"


def _package_has_cuda(prefix: Path) -> bool:
    """Whether the installed CMake package has the `cuda` component (absparse built with CUDA), as
    its config file says (a stale absparseCudaTargets.cmake of an earlier install does not count)."""
    config = (prefix / "lib" / "cmake" / "absparse" / "absparseConfig.cmake").read_text()
    return re.search(r"^set\(absparse_WITH_CUDA ON\)$", config, re.M) is not None


def _words(text: str) -> str:
    """text with CMake's line wrapping undone (runs of white space -> one space)."""
    return " ".join(text.split())


def _have_nvcc() -> bool:
    cuda_home = os.environ.get("CUDA_PATH") or os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    return shutil.which("nvcc") is not None or Path(cuda_home, "bin", "nvcc").is_file()


def _configure_consumer(cmake_tools, prefix, build, *extra):
    return _run(["cmake", "-S", REPO / "tests" / "cpp_consumer", "-B", build, *cmake_tools,
                 f"-DCMAKE_PREFIX_PATH={prefix}", *extra], timeout=180)


def _build_and_run(build, target, expect):
    _check(_run(["cmake", "--build", build, "--target", target, "-j", JOBS], timeout=300),
           f"building {target}")
    exe = next(p for p in (build / target, build / "Release" / target) if p.exists())
    proc = _run([exe], timeout=60)
    assert proc.returncode == 0, f"{target} exit {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    assert expect in proc.stdout, proc.stdout


def test_cpp_consumer(cmake_tools, tmp_path):
    prefix = _absparse_cmake_prefix()
    build = tmp_path / "consumer"
    proc = _configure_consumer(cmake_tools, prefix, build, NO_CUDA_TOOLKIT)
    _check(proc, "configuring tests/cpp_consumer without the CUDA toolkit")
    assert "absparse_consumer: found absparse" in proc.stdout
    _build_and_run(build, "consumer", "absparse consumer OK")


def test_cpp_consumer_cuda(cmake_tools, tmp_path):
    prefix = _absparse_cmake_prefix()
    build = tmp_path / "consumer_cuda"
    if not _package_has_cuda(prefix):
        proc = _configure_consumer(cmake_tools, prefix, build, "-DCONSUMER_CUDA=ON")
        assert proc.returncode != 0, "COMPONENTS cuda was found in an absparse built without CUDA"
        assert "this absparse was built without the CUDA kernels" in _words(proc.stderr), \
            proc.stderr
        return
    if not _have_nvcc():
        pytest.skip("nvcc not found (PATH, $CUDA_PATH, /usr/local/cuda): no CUDA toolkit to link "
                    "absparse::absparse_cuda against")
    proc = _configure_consumer(cmake_tools, prefix, build, "-DCONSUMER_CUDA=ON")
    _check(proc, "configuring tests/cpp_consumer with COMPONENTS cuda")
    assert "built with CUDA: ON" in proc.stdout, proc.stdout
    _build_and_run(build, "consumer_cuda", "absparse CUDA consumer OK")


def test_cuda_component_needs_toolkit(cmake_tools, tmp_path):
    prefix = _absparse_cmake_prefix()
    if not _package_has_cuda(prefix):
        pytest.skip("absparse was built without CUDA (test_cpp_consumer_cuda checks that case)")
    proc = _configure_consumer(cmake_tools, prefix, tmp_path / "required", "-DCONSUMER_CUDA=ON",
                               NO_CUDA_TOOLKIT)
    assert proc.returncode != 0, "COMPONENTS cuda was found without the CUDA toolkit"
    assert "component 'cuda' is not available: the CUDA toolkit" in _words(proc.stderr), \
        proc.stderr
    project = tmp_path / "optional_project"
    project.mkdir()
    (project / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.18)\n"
        "project(optional_cuda LANGUAGES CXX)\n"
        "find_package(absparse 0.1 REQUIRED OPTIONAL_COMPONENTS cuda)\n"
        "if(NOT TARGET absparse::absparse OR absparse_cuda_FOUND\n"
        "   OR TARGET absparse::absparse_cuda)\n"
        "  message(FATAL_ERROR \"unexpected: cuda found ${absparse_cuda_FOUND}\")\n"
        "endif()\n")
    proc = _run(["cmake", "-S", project, "-B", tmp_path / "optional", *cmake_tools,
                 f"-DCMAKE_PREFIX_PATH={prefix}", NO_CUDA_TOOLKIT], timeout=180)
    _check(proc, "configuring a project with OPTIONAL_COMPONENTS cuda without the CUDA toolkit")


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
