"""A plain (not editable) install carries every package of the source tree: the wheel once held only
the five top-level folders, without model.engine, model.parallel or model.kernels."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP = ["model", "processing", "pipeline", "jobs", "evaluation"]


def test_the_wheel_holds_every_package(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ["pyproject.toml", "README.md", "lazy_exports.py"]:
        shutil.copy(ROOT / name, source / name)
    for name in TOP:
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "wheel"), str(source)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    packed = set(zipfile.ZipFile(wheel).namelist())
    expected = {str(p.relative_to(ROOT)) for name in TOP for p in (ROOT / name).rglob("*.py")
                if "__pycache__" not in p.parts}
    assert expected - packed == set()
    assert "lazy_exports.py" in packed
