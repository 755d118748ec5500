"""No third-party notice reaches the user from bitsandbytes' hub kernel lookup, with or without HF_HUB_OFFLINE, on
AMD and Intel CPUs alike: qmor never lets bitsandbytes ask the `kernels` package for it (qmor/model/quant.py)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AS_AVX512_BF16 = Path(__file__).resolve().parent / "as_avx512_bf16"  # a sitecustomize, see its docstring
NOTICES = ("kernels-community", "publisher trust", "gemm_4bit_forward")


def offline_env(**extra: str) -> dict:
    """The environment of a subprocess that runs offline on a (simulated) CPU with AVX512-BF16: where bitsandbytes
    would ask the Hub for its CPU kernel and `kernels` would say it cannot check the publisher."""
    path = os.pathsep.join(p for p in (str(AS_AVX512_BF16), str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path, **extra}


def notices(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if any(n in line for n in NOTICES)]


def test_a_run_offline_prints_no_hub_kernel_notice(tmp_path):
    cmd = [sys.executable, "-m", "qmor", "train", "--max-steps", "1", "--num-examples", "8", "--eval-generate", "0",
           "--output", str(tmp_path / "run")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600,
                          env=offline_env(QMOR_CACHE=str(tmp_path / "cache")))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert notices(proc.stderr) == []


def test_kernels_stays_importable():
    # hidden from bitsandbytes' import only (conftest imported it through qmor): transformers' hub kernels still work
    import kernels

    assert "bitsandbytes.backends.cpu.ops" in sys.modules and callable(kernels.get_kernel)
