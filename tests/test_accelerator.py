"""The optional compiled accelerator (hatch_build.py, wirehub/_accelerator.py): the
connection module, the frame decoders, the hub's ping/pub path and the memory broker, each
compiled with Cython.

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
from wirehub import _accelerator
from wirehub.hub import frames
from wirehub.hub.broker import memory, publishing
from wirehub.protocol import framing
from wirehub.transport import connection

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = Path(wirehub.__file__).resolve().parent

pytestmark = pytest.mark.one_loop


ECHOED = repr(b"one\ntwo\nthree\n")


def probe(env: dict[str, str], path: Path | None = None) -> subprocess.CompletedProcess:
    """In a fresh interpreter: which implementation each module took, and an echo through a
    real server with them (tests/accelerator_probe.py)."""
    env = {**os.environ, **env}
    if path is not None:
        env["PYTHONPATH"] = str(path)
    script = str(Path(__file__).with_name("accelerator_probe.py"))
    return subprocess.run([sys.executable, "-W", "always", script], env=env, capture_output=True, text=True, timeout=60)


MODULES = [(connection, "wirehub.transport._connection"), (framing, "wirehub.protocol._framing"),
           (frames, "wirehub.hub._frames"), (memory, "wirehub.hub.broker._memory"),
           (publishing, "wirehub.hub.broker._publishing")]


@pytest.mark.parametrize("module, source", MODULES, ids=["connection", "framing", "hub-frames", "memory-broker", "redis-publishing"])
def test_the_implementation_in_use_is_reported_and_matches_its_sources(module, source):
    assert module.ACCELERATOR in ("compiled", "not built (pure Python)", "off (WIREHUB_PURE_PYTHON is set)")
    if os.environ.get("EXPECT_WIREHUB_COMPILED") == "1":  # set by CI, where gcc and Cython are at hand
        assert module.ACCELERATOR == "compiled", f"the accelerator should have been built: {module.ACCELERATOR}"
    if module.ACCELERATOR == "compiled":
        assert module._impl.__name__ == source + "_c"
        assert module._impl._SOURCE_DIGEST == _accelerator.sources_digest(Path(module.__file__).parent, module.SOURCE)
    else:
        assert module._impl.__name__ == source
    assert _accelerator.STATUS[module.__package__] == module.ACCELERATOR


def test_the_summary_is_one_word_when_all_agree():
    states = set(_accelerator.STATUS.values())
    summary = _accelerator.summary()
    if len(states) == 1:
        assert summary == states.pop()
    else:  # each module named with its state
        assert "transport " in summary and "protocol " in summary


def test_wirehub_pure_python_selects_the_python_code():
    done = probe({"WIREHUB_PURE_PYTHON": "1"})
    assert done.returncode == 0, done.stderr
    off = "off (WIREHUB_PURE_PYTHON is set)"
    assert done.stdout.split("\n")[:6] == [off, "wirehub.transport._connection", off, "wirehub.protocol._framing", off,
                                            ECHOED]


@pytest.mark.parametrize("edited", ["transport/_connection.py", "protocol/_framing.pxd"])
def test_a_build_older_than_the_source_is_not_used(tmp_path, edited):
    if not (connection.COMPILED and framing.ACCELERATOR == "compiled"):
        pytest.skip("the accelerator is not built here")
    copy = tmp_path / "wirehub"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / edited, "a") as f:
        f.write("\n# an edit made after the build\n")
    done = probe({}, tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.split("\n")
    stale = "out of date (pure Python)"
    # the edited module falls back, the other stays compiled, and the two work together
    if edited.startswith("transport"):
        assert lines[:6] == [stale, "wirehub.transport._connection", "compiled", "wirehub.protocol._framing_c",
                             "protocol compiled, transport out of date (pure Python)", ECHOED]
    else:
        assert lines[:6] == ["compiled", "wirehub.transport._connection_c", stale, "wirehub.protocol._framing",
                             "protocol out of date (pure Python), transport compiled", ECHOED]
    assert "Reinstall wirehub" in done.stderr and edited.rsplit(".", 1)[0] in done.stderr
    untouched = probe({}, PACKAGE.parent).stdout.split("\n")  # the installed copy is used as it is
    assert untouched[4:6] == ["compiled", ECHOED]


@pytest.mark.timeout(900)
def test_the_core_suites_pass_on_the_pure_python_code():
    if not connection.COMPILED:
        pytest.skip("the whole suite already runs on the pure-Python code here")
    env = {**os.environ, "WIREHUB_PURE_PYTHON": "1"}
    env.pop("EXPECT_WIREHUB_COMPILED", None)
    suites = ["tests/transport", "tests/server", "tests/protocol", "tests/abuse", "tests/hub/test_hub_protocol.py",
              "tests/test_examples.py"]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *suites],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=850,
    )
    tail = "\n".join(done.stdout.splitlines()[-15:])
    assert done.returncode == 0, tail + done.stderr[-2000:]
    assert " passed" in tail
