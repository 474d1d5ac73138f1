"""Build and install fvd on every supported CPython, then run a fast test subset.

    nox                      # every version: wheel and sdist installs, fast subset
    nox -s install-3.9       # one version
    nox -s docs              # the API reference (sphinx-build -W)

Each `install` session builds an sdist and, from it, a wheel (the compiled fast path
included), installs each into a fresh venv and runs FAST_SUBSET there against the
installed package (the tests are copied out of the checkout so that `import fvd` cannot
pick up the source tree). CI (.ci/run) runs the full suite on 3.11 and these sessions.
"""

from __future__ import annotations

import glob
import os
import shutil

import nox

PYTHONS = ["3.9", "3.10", "3.11", "3.12", "3.13"]
FAST_SUBSET = [
    "tests/ondisk",
    "tests/native",
    "tests/core/test_image.py",
    "tests/ops/test_extents.py",
    "tests/test_syscall_recorder.py",
]
TEST_DEPS = ["pytest>=7", "hypothesis>=6.80", "pytest-benchmark>=4"]

nox.options.sessions = [f"install-{v}" for v in PYTHONS]
nox.options.reuse_existing_virtualenvs = True


def _pythons() -> list[str]:
    """FVD_NOX_PYTHONS=3.9,3.13 narrows the versions (CI's budget)."""
    chosen = os.environ.get("FVD_NOX_PYTHONS")
    return chosen.split(",") if chosen else PYTHONS


def _fresh_venv(session: nox.Session, where: str) -> str:
    """A new venv under the session's tmp dir; returns its python."""
    shutil.rmtree(where, ignore_errors=True)
    session.run("python", "-m", "venv", where)
    return os.path.join(where, "bin", "python")


def _run_subset(session: nox.Session, python: str, tmp: str) -> None:
    """FAST_SUBSET against the installed fvd, from a copy of the tests outside the tree."""
    work = os.path.join(tmp, "run")
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree("tests", os.path.join(work, "tests"))
    shutil.copytree("docs", os.path.join(work, "docs"))  # the spec tests read format.md
    shutil.copy("pyproject.toml", work)  # markers and addopts
    env = {"FVD_REQUIRE_CYTHON": "1", "PYTHONPATH": ""}
    with session.chdir(work):
        session.run(
            python, "-c", "import fvd, fvd._fastpath; print(fvd.__file__)", env=env, external=True
        )
        session.run(
            python,
            "-m",
            "pytest",
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
            *FAST_SUBSET,
            env=env,
            external=True,
        )


@nox.session(name="install", python=_pythons())
def install(session: nox.Session) -> None:
    """sdist -> wheel -> fresh venv (and sdist -> fresh venv) -> fast subset, per version."""
    session.install("build")
    tmp = os.path.abspath(session.create_tmp())
    dist = os.path.join(tmp, "dist")
    shutil.rmtree(dist, ignore_errors=True)
    session.run("python", "-m", "build", "--outdir", dist, ".")  # the wheel from the sdist
    sdist = glob.glob(os.path.join(dist, "fvd-*.tar.gz"))[0]
    wheel = glob.glob(os.path.join(dist, "fvd-*.whl"))[0]
    for name, artifact in (("wheel", wheel), ("sdist", sdist)):
        session.log(f"installing the {name} {os.path.basename(artifact)} into a fresh venv")
        python = _fresh_venv(session, os.path.join(tmp, f"venv-{name}"))
        session.run(python, "-m", "pip", "install", "-q", artifact, *TEST_DEPS, external=True)
        _run_subset(session, python, tmp)


@nox.session(python="3.11")
def docs(session: nox.Session) -> None:
    """The API reference (docs/api), warnings as errors."""
    session.install(".", "sphinx>=7")
    session.run(
        "sphinx-build",
        "-W",
        "--keep-going",
        "-q",
        "-b",
        "html",
        "docs/api",
        os.path.join(session.create_tmp(), "html"),
    )
