"""The release artefacts: an sdist and a wheel that install and work on their own.

``python -m build`` makes the sdist from a copy of the tree, then the wheel from the
sdist (so a file missing from the sdist breaks the wheel too); ``twine check``
validates both. The wheel is installed into a fresh venv that sees this
environment's packages (jax is not reinstalled) but not the source tree, and run
from an empty directory: jaxactv must import from that venv, compute one op and
ship ``py.typed``.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import venv

import pytest

import jaxactv

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCES = ["pyproject.toml", "README.md", "LICENSE", "jaxactv"]


def _run(cmd, **kwargs):
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kwargs)
  assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
  return proc.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
  pytest.importorskip("build")
  tree = tmp_path_factory.mktemp("tree")
  for name in SOURCES:
    src = ROOT / name
    if src.is_dir():
      shutil.copytree(src, tree / name, ignore=shutil.ignore_patterns("__pycache__"))
    else:
      shutil.copy2(src, tree / name)
  out = tmp_path_factory.mktemp("dist")
  # No isolation: this environment's setuptools builds it, nothing is downloaded.
  _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(tree)])
  return out


def test_build_makes_a_wheel_and_an_sdist(dist):
  version = jaxactv.__version__
  assert [p.name for p in dist.glob("*.whl")] == [f"jaxactv-{version}-py3-none-any.whl"]
  assert [p.name for p in dist.glob("*.tar.gz")] == [f"jaxactv-{version}.tar.gz"]


def test_twine_check_passes(dist):
  pytest.importorskip("twine")
  out = _run([sys.executable, "-m", "twine", "check", "--strict", *map(str, dist.iterdir())])
  assert out.count("PASSED") == 2, out


def test_wheel_installs_and_runs_outside_the_source_tree(dist, tmp_path):
  env = tmp_path / "venv"
  venv.create(env, with_pip=False)
  python = env / "bin" / "python"
  purelib = pathlib.Path(_run([str(python), "-c", "import sysconfig; "
                               "print(sysconfig.get_paths()['purelib'])"]).strip())
  # This environment's packages (jax, numpy), after the venv's own: a path in a .pth
  # file is appended to sys.path, and the .pth files in it (an editable jaxactv) are
  # not run, so only the wheel can provide jaxactv.
  here = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
  (purelib / "zz_parent_env.pth").write_text("\n".join(sorted(here)) + "\n")
  wheel = next(dist.glob("*.whl"))
  _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
        "--no-index", "--quiet", str(wheel)])
  script = textwrap.dedent("""
      import json, pathlib, sys
      import numpy as np
      import jaxactv
      pkg = pathlib.Path(jaxactv.__file__).parent
      p = jaxactv.softmax(np.log(np.array([1.0, 3.0], np.float32)))
      print(json.dumps({"file": jaxactv.__file__, "prefix": sys.prefix,
                        "py_typed": (pkg / "py.typed").is_file(),
                        "version": jaxactv.__version__, "softmax": np.asarray(p).tolist()}))
  """)
  cwd = tmp_path / "empty"
  cwd.mkdir()
  info = json.loads(_run([str(python), "-c", script], cwd=cwd).strip().splitlines()[-1])
  installed = pathlib.Path(info["file"]).resolve()
  assert installed.is_relative_to(env.resolve()), installed
  assert not installed.is_relative_to(ROOT)
  assert info["py_typed"]
  assert info["version"] == jaxactv.__version__
  assert info["softmax"] == pytest.approx([0.25, 0.75], abs=1e-6)  # 1/4, 3/4 by hand
