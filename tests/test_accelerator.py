"""The optional compiled accelerator (hatch_build.py, wirehub/transport/connection.py).

The whole suite runs on whichever implementation the install gave (compiled where a C
compiler and Cython were at hand); the tests here check the choice itself, and run the
transport, server and hub-protocol tests again on the pure-Python code, so that both stay
working.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import wirehub
from wirehub.transport import connection

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = Path(wirehub.__file__).resolve().parent

pytestmark = pytest.mark.one_loop


def probe(env: dict[str, str], path: Path | None = None) -> subprocess.CompletedProcess:
    """Import wirehub in a fresh interpreter and print which implementation it took."""
    env = {**os.environ, **env}
    if path is not None:
        env["PYTHONPATH"] = str(path)
    code = "import wirehub.transport.connection as c; print(c.ACCELERATOR); print(c.Connection.__module__)"
    return subprocess.run([sys.executable, "-W", "always", "-c", code], env=env, capture_output=True, text=True, timeout=60)


def test_the_implementation_in_use_is_reported_and_matches_its_sources():
    assert connection.ACCELERATOR in ("compiled", "not built (pure Python)", "off (WIREHUB_PURE_PYTHON is set)")
    if os.environ.get("EXPECT_WIREHUB_COMPILED") == "1":  # set by CI, where gcc and Cython are at hand
        assert connection.COMPILED, f"the accelerator should have been built: {connection.ACCELERATOR}"
    if connection.COMPILED:
        assert connection.Connection.__module__ == "wirehub.transport._connection_c"
        assert connection._impl._SOURCE_DIGEST == connection.sources_digest()
    else:
        assert connection.Connection.__module__ == "wirehub.transport._connection"


def test_wirehub_pure_python_selects_the_python_code():
    done = probe({"WIREHUB_PURE_PYTHON": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["off (WIREHUB_PURE_PYTHON is set)", "wirehub.transport._connection"]


def test_a_build_older_than_the_source_is_not_used(tmp_path):
    if not connection.COMPILED:
        pytest.skip("the accelerator is not built here")
    copy = tmp_path / "wirehub"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / "transport" / "_connection.py", "a") as f:
        f.write("\n# an edit made after the build\n")
    done = probe({}, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["out of date (pure Python)", "wirehub.transport._connection"]
    assert "Reinstall wirehub" in done.stderr
    assert probe({}, PACKAGE.parent).stdout.startswith("compiled")  # the untouched copy is used


@pytest.mark.timeout(900)
def test_the_core_suites_pass_on_the_pure_python_code():
    if not connection.COMPILED:
        pytest.skip("the whole suite already runs on the pure-Python code here")
    env = {**os.environ, "WIREHUB_PURE_PYTHON": "1"}
    env.pop("EXPECT_WIREHUB_COMPILED", None)
    suites = ["tests/transport", "tests/server", "tests/protocol", "tests/hub/test_hub_protocol.py", "tests/test_examples.py"]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *suites],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=850,
    )
    tail = "\n".join(done.stdout.splitlines()[-15:])
    assert done.returncode == 0, tail + done.stderr[-2000:]
    assert " passed" in tail
