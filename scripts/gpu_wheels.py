"""The packages an offline GPU machine lacks, carried as wheels: fetched beforehand on a networked machine, installed
there without a registry.

The GPU machine qmor is checked on (docs/gpu.md) has PyTorch, transformers, accelerate, peft, safetensors, numpy,
pandas and pyarrow, but no bitsandbytes, datasets or matplotlib, and no network. `fetch` downloads those wheels (and
what they need that such an image may lack) for the GPU machine's Python into `.whl/`, an ignored folder that
travels with the working tree; `install` puts every one whose package is not installed already into a folder of
its own, then qmor itself, all with `--no-deps`, so nothing of the image is replaced.

bitsandbytes' wheel carries its library built for every CUDA and ROCm release (43 MB); `fetch` keeps the builds
for the GPU machine's CUDA major only (8 MB), so the tree with the wheels stays under the 64 MiB that travels.
"""

from __future__ import annotations

import base64
import hashlib
import re
import subprocess
import sys
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".whl"
SITE = ROOT / ".gpu-site"  # where `install` puts them (ignored, kept between calls on a warm machine)
BNB = "bitsandbytes>=0.48,<0.51"  # qmor's range (pyproject.toml)
# what the GPU image may lack, with what they need; the resolver picks versions that fit together
WITH_DEPS = ["datasets>=3.0", "matplotlib>=3.9", "setuptools>=77"]
KEEP = {"bitsandbytes", "datasets", "dill", "multiprocess", "xxhash", "matplotlib", "contourpy", "cycler", "fonttools",
        "kiwisolver", "pillow", "pyparsing", "python-dateutil", "six", "setuptools"}
PLATFORMS = ["manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_24_x86_64", "manylinux_2_27_x86_64",
             "manylinux_2_28_x86_64"]


def dist_name(wheel: Path) -> str:
    """The normalised distribution name of a wheel file (PEP 427: name-version-...)."""
    return re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()


def download(requirements: list[str], dest: Path, python: str, deps: bool) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--python-version", python,
           "--implementation", "cp", "-d", str(dest), *(f"--platform={p}" for p in PLATFORMS), *requirements]
    subprocess.run(cmd + ([] if deps else ["--no-deps"]), check=True)


def slim_bitsandbytes(wheel: Path, cuda_major: str) -> Path:
    """The wheel without the native libraries of other CUDA majors and of ROCm/XPU, its RECORD rewritten to match."""
    keep = re.compile(rf"libbitsandbytes_(cpu|cuda{cuda_major}\d+)\.so$")
    out = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        names = [n for n in src.namelist() if not n.endswith(".so") or keep.search(n)]
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        lines = []
        for name in names:
            if name == record:
                continue
            data = src.read(name)
            dst.writestr(name, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            lines.append(f"{name},sha256={digest},{len(data)}")
        dst.writestr(record, "\n".join([*lines, f"{record},,"]) + "\n")
    out.replace(wheel)
    return wheel


def fetch(dest: Path = WHEELS, python: str = "3.12", cuda_major: str = "13") -> list[Path]:
    """Download into `dest` the wheels the GPU machine lacks, for its Python and CUDA major; returns them."""
    dest.mkdir(exist_ok=True)
    for old in dest.glob("*.whl"):
        old.unlink()
    with tempfile.TemporaryDirectory() as tmp:
        download([BNB], Path(tmp), python, deps=False)  # its dependency is torch, which the image has
        download(WITH_DEPS, Path(tmp), python, deps=True)
        for wheel in Path(tmp).glob("*.whl"):
            if dist_name(wheel) in KEEP:
                wheel.replace(dest / wheel.name)
    slim_bitsandbytes(next(dest.glob("bitsandbytes-*.whl")), cuda_major)
    return sorted(dest.glob("*.whl"))


def installed(name: str) -> bool:
    try:
        metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return False
    return True


def missing_wheels(src: Path) -> list[Path]:
    """The wheels in `src` whose package is not installed here: what is installed stays as it is."""
    return [w for w in sorted(src.glob("*.whl")) if not installed(dist_name(w))]


def install(src: Path = WHEELS, site: Path = SITE) -> list[str]:
    """Install into `site` every wheel in `src` whose package is missing here, then qmor, without dependencies and
    without a registry (qmor's build backend comes from `src` too); returns the names installed."""
    wheels = missing_wheels(src)
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site)]
    if wheels:
        subprocess.run([*pip, *map(str, wheels)], check=True)
    subprocess.run([*pip, "--find-links", str(src), "--upgrade", str(ROOT)], check=True)
    return [dist_name(w) for w in wheels] + ["qmor"]


def tree_size() -> int:
    """Bytes of what travels to the GPU machine: the files git tracks or would track, and the wheels."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.split(b"\0")
    files = [ROOT / name.decode() for name in listed if name] + list(WHEELS.glob("*.whl"))
    return sum(f.stat().st_size for f in files if f.is_file())
