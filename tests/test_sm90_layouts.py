"""The register layouts the sm90 prefill kernel relies on, checked on the host (no GPU): compiles
tests/sm90_layouts.cu (which includes cuda/src/sparse_prefill_sm90.cu) with nvcc against the
nvidia-cutlass headers and runs it. Skipped without nvcc or the headers. About 2 minutes of
compilation on a 2-core machine, hence the `full` tier."""
import importlib.util
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cutlass_include():
    spec = importlib.util.find_spec("cutlass_library")  # located, not imported
    if spec is None:
        return None
    include = os.path.join(spec.submodule_search_locations[0], "source", "include")
    return include if os.path.exists(os.path.join(include, "cute", "tensor.hpp")) else None


@pytest.mark.full
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
@pytest.mark.skipif(_cutlass_include() is None, reason="needs the nvidia-cutlass headers")
def test_register_layouts_of_the_sm90_prefill_kernel(tmp_path):
    exe = tmp_path / "sm90_layouts"
    compile_cmd = ["nvcc", "-std=c++17", "-O0", "-arch=sm_90a", "--expt-relaxed-constexpr",
                   "-I", os.path.join(ROOT, "cpp", "include"), "-I", os.path.join(ROOT, "cuda", "src"),
                   "-isystem", _cutlass_include(), os.path.join(ROOT, "tests", "sm90_layouts.cu"),
                   "-o", str(exe)]
    built = subprocess.run(compile_cmd, capture_output=True, text=True, timeout=900)
    assert built.returncode == 0, built.stderr[-3000:]
    ran = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stdout[-3000:]
    assert ran.stdout.strip().endswith("0 mismatches")
