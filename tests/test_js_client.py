"""The JavaScript client (clients/js) under Node's own test runner, against real `wirehub serve`
processes that its tests start (this interpreter, this source tree). One pytest test per test
file. scripts/test installs Node's packages (npm ci in clients/js); without them these skip."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JS = os.path.join(ROOT, "clients", "js")
NODE = shutil.which("node")
FILES = sorted(f for f in os.listdir(os.path.join(JS, "test")) if f.endswith(".test.js"))
INSTALLED = os.path.isdir(os.path.join(JS, "node_modules", "ws"))

pytestmark = pytest.mark.skipif(
    NODE is None or not INSTALLED, reason="node and clients/js/node_modules are needed (scripts/test runs npm ci there)"
)


def test_every_test_file_is_run():
    assert set(FILES) >= {"basic.test.js", "reconnect.test.js", "kick.test.js", "auth.test.js", "timeout.test.js", "size.test.js", "types.test.js", "rpc.test.js"}


@pytest.mark.parametrize("name", FILES)
def test_node(name):
    env = dict(os.environ, JS_TEST_PYTHON=sys.executable, NODE_NO_WARNINGS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.join(ROOT, "src"), env.get("PYTHONPATH")) if p)
    result = subprocess.run(
        [NODE, "--test", "--test-reporter=spec", os.path.join("test", name)],
        cwd=JS, env=env, capture_output=True, text=True, timeout=180,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "ℹ fail 0" in output and "ℹ pass 0" not in output, output
