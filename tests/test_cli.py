"""The ``wirehub`` command line, run as a user runs it: ``python -m wirehub ...`` in a
subprocess (and once through the ``wirehub`` console script)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

import wirehub
from wirehub.config import OPTIONS

from .helpers import WAIT, ServerProcess, free_port

REPO = Path(__file__).resolve().parents[1]
EXIT_CONFIG = 2
EXIT_BIND = 3
ONLY_TCP = ("--ws", "off", "--udp", "off", "--admin", "off")
LISTENING = " listening transport="  # the log line of a bound listener


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without WIREHUB_* variables (they would change what is tested)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WIREHUB_")}
    env.update(extra)
    return env


def wirehub_cli(*args: str, env: dict[str, str] | None = None, cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "wirehub", *args],
        capture_output=True,
        text=True,
        timeout=WAIT * 2,
        env=clean_env(**(env or {})),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )


def port_is_free(port: int, kind: int = socket.SOCK_STREAM) -> bool:
    """Could a server bind 127.0.0.1:port? (For TCP with SO_REUSEADDR, as wirehub does, so
    that connections lingering in TIME_WAIT do not count.)"""
    with socket.socket(socket.AF_INET, kind) as s:
        if kind == socket.SOCK_STREAM:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def listening_socket(port: int = 0) -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", port))
    s.listen()
    return s


# ---------------------------------------------------------------------------- help, version


def test_group_help():
    result = wirehub_cli("--help")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for command in ("serve", "run", "config"):
        assert f"\n  {command} " in out
    assert "wirehub run module:app" in out and "wirehub config check" in out
    assert "--version" in out
    assert wirehub_cli("-h").stdout == out


@pytest.mark.parametrize("command", [["serve"], ["run"]])
def test_serve_and_run_help_list_every_option(command):
    result = wirehub_cli(*command, "--help")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "--config FILE" in out
    for opt in OPTIONS:
        assert f"  {opt.flag} " in out or f"  {opt.flag}/" in out, f"{opt.flag} missing from {command} --help"
        if opt.kind == "bool":
            assert f"--no-{opt.flag[2:]}" in out
        assert f"[default: {opt.default_text}]" in " ".join(out.split()), opt.name
    if command == ["run"]:
        assert "MODULE:APP" in out


def test_config_check_help():
    result = wirehub_cli("config", "check", "--help")
    assert result.returncode == 0, result.stderr
    assert "check [OPTIONS] FILE" in result.stdout
    assert "Validate FILE" in result.stdout
    assert "\n  check " in wirehub_cli("config", "--help").stdout


def test_version():
    for flag in ("--version", "-V"):
        result = wirehub_cli(flag)
        assert result.returncode == 0, result.stderr
        assert result.stdout == f"wirehub, version {wirehub.__version__}\n"


def test_console_script_on_path():
    exe = shutil.which("wirehub")
    assert exe is not None, "the wirehub console script is not on PATH (pip install -e .)"
    result = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=WAIT * 2, env=clean_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"wirehub, version {wirehub.__version__}\n"
    usage = subprocess.run([exe, "serve", "--help"], capture_output=True, text=True, timeout=WAIT * 2, env=clean_env())
    assert usage.stdout.startswith("Usage: wirehub serve [OPTIONS]")


# ---------------------------------------------------------------------------- config check

BAD_TOML = """\
# several problems, one a line
tcp = ["127.0.0.1:9000"]
max_frame = "lots"
backlog = -1
slow_consumer = "drop-oldest"
max_conections = 5

idle_timeout = "0s"
"""


def test_config_check_valid_file(tmp_path):
    path = tmp_path / "wirehub.toml"
    path.write_text('tcp = ["127.0.0.1:9000", "[::1]:9000"]\nmax-frame = "1MiB"\nidle_timeout = "30s"\nudp = "off"\n')
    result = wirehub_cli("config", "check", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{path}: ok"
    assert result.stderr == ""


def test_config_check_reports_every_problem_with_its_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(BAD_TOML)
    result = wirehub_cli("config", "check", str(path))
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    expected = [
        (3, "max_frame", "'lots'"),
        (4, "backlog", "-1"),
        (5, "slow_consumer", "did you mean 'drop_oldest'?"),
        (6, "max_conections", "did you mean 'max_connections'?"),
        (8, "idle_timeout", "'0s'"),
    ]
    for (line, key, detail), got in zip(expected, lines):
        assert got.startswith(f"{path}:{line}: {key}: "), got
        assert detail in got
    assert lines[len(expected):] == [f"{path}: {len(expected)} problems"]
    assert result.stdout == ""


def test_config_check_invalid_toml_names_the_line(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text('tcp = ["127.0.0.1:9000"]\n\n[unclosed\n')
    result = wirehub_cli("config", "check", str(path))
    assert result.returncode == 1
    assert result.stderr.splitlines()[0].startswith(f"{path}:3: invalid TOML")
    missing = wirehub_cli("config", "check", str(tmp_path / "nope.toml"))
    assert missing.returncode == 1
    assert "nope.toml: cannot read config file: No such file or directory" in missing.stderr


def test_config_check_cross_field_problem_names_the_line(tmp_path):
    path = tmp_path / "buffers.toml"
    path.write_text('idle_timeout = "1m"\nsend_buffer_low = "1MiB"\n')
    result = wirehub_cli("config", "check", str(path))
    assert result.returncode == 1
    assert result.stderr.splitlines()[0].startswith(f"{path}:2: send_buffer_low: ")


# ---------------------------------------------------------------------------- invalid values


@pytest.mark.parametrize("source", ["flag", "env", "file", "toml"])
def test_serve_with_an_invalid_value_exits_2_before_binding(tmp_path, source):
    port = free_port()
    args = ["serve", "--tcp", f"127.0.0.1:{port}", *ONLY_TCP]
    env = {}
    if source == "flag":
        args += ["--max-frame", "lots"]
        expected = ["flag --max-frame: max_frame:", "'lots'"]
    elif source == "env":
        env = {"WIREHUB_BACKLOG": "-1"}
        expected = ["env WIREHUB_BACKLOG: backlog:", "'-1'"]
    elif source == "file":
        config = tmp_path / "wirehub.toml"
        config.write_text('log_level = "info"\nidle_timeout = "soon"\n')
        args += ["--config", str(config)]
        expected = [f"{config}:2: idle_timeout:", "'soon'"]
    else:
        config = tmp_path / "wirehub.toml"
        config.write_text('log_level = "info"\nidle_timeout = 30s\n')  # not TOML: unquoted
        args += ["--config", str(config)]
        expected = [f"{config}:2: invalid TOML"]
    result = wirehub_cli(*args, env=env)
    assert result.returncode == EXIT_CONFIG, result.stderr
    for text in expected:
        assert text in result.stderr
    assert "Nothing was started" in result.stderr
    assert LISTENING not in result.stdout + result.stderr
    assert port_is_free(port)


def test_config_is_checked_before_any_socket_is_bound():
    """Proof that validation comes first: the port is busy, yet the exit is the config
    error (2), not the bind error (3)."""
    with listening_socket() as busy:
        port = busy.getsockname()[1]
        result = wirehub_cli("serve", "--tcp", f"127.0.0.1:{port}", *ONLY_TCP, "--workers", "0")
    assert result.returncode == EXIT_CONFIG, result.stderr
    assert "flag --workers: workers: must be at least 1, got '0'" in result.stderr
    assert "already in use" not in result.stderr


def test_every_problem_is_reported_at_once(tmp_path):
    config = tmp_path / "wirehub.toml"
    config.write_text('backlog = 0\n')
    result = wirehub_cli(
        "serve", "--config", str(config), "--max-frame", "lots", "--tcp", "localhost", *ONLY_TCP,
        env={"WIREHUB_IDLE_TIMEOUT": "-5s"},
    )
    assert result.returncode == EXIT_CONFIG
    for text in (f"{config}:1: backlog:", "env WIREHUB_IDLE_TIMEOUT: idle_timeout:", "flag --max-frame: max_frame:",
                 "flag --tcp: tcp:", "'localhost'"):
        assert text in result.stderr


# ---------------------------------------------------------------------------- run: bad specs


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nomodule:app", "cannot import module 'nomodule': No module named 'nomodule'"),
        ("wirehub.apps.echo:nothing", "module 'wirehub.apps.echo' has no attribute 'nothing'"),
        ("wirehub.apps.echo:echo", "wirehub.apps.echo:echo is a function, not a wirehub.App"),
        ("wirehub.apps.echo", "APP must look like module:attribute (for example examples.echo:app)"),
    ],
)
def test_run_with_a_bad_spec(spec, message):
    port = free_port()
    result = wirehub_cli("run", spec, "--tcp", f"127.0.0.1:{port}", *ONLY_TCP)
    assert result.returncode == EXIT_CONFIG, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert LISTENING not in result.stderr
    assert port_is_free(port)


def test_run_an_app_without_a_frame_handler():
    port = free_port()
    result = wirehub_cli("run", "wirehub:App", "--tcp", f"127.0.0.1:{port}", *ONLY_TCP)
    assert result.returncode != 0
    assert "App has no frame handler" in result.stderr
    assert LISTENING not in result.stderr
    assert "Traceback" not in result.stderr


def test_run_serves_an_example_by_path(tmp_path):
    """``wirehub run path/to/file.py:app`` works from anywhere."""
    port = free_port()
    server = ServerProcess("run", str(REPO / "examples" / "echo.py") + ":app", "--tcp", f"127.0.0.1:{port}",
                           *ONLY_TCP, cwd=str(tmp_path)).start(tmp_path)
    try:
        server.wait_log(f"listening transport=tcp address=127.0.0.1:{port}")
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
            sock.sendall(b"by path\n")
            with sock.makefile("rb") as lines:
                assert lines.readline() == b"by path\n"
    finally:
        code = server.stop()
    assert code == 0, server.log


# ---------------------------------------------------------------------------- binding


@pytest.mark.parametrize("kind", ["tcp", "udp"])
def test_serve_on_an_address_in_use_exits_3(kind):
    other = free_port()  # a listener that binds fine: it must not stay bound
    if kind == "tcp":
        busy = listening_socket()
    else:
        busy = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        busy.bind(("127.0.0.1", 0))
    with busy:
        taken = f"127.0.0.1:{busy.getsockname()[1]}"
        if kind == "tcp":
            listeners = ["--tcp", taken, "--ws", f"127.0.0.1:{other}", "--udp", "off"]
        else:
            listeners = ["--tcp", f"127.0.0.1:{other}", "--ws", "off", "--udp", taken]
        result = wirehub_cli("serve", *listeners, "--admin", "off")
    assert result.returncode == EXIT_BIND, result.stderr
    err = result.stderr
    assert f"cannot listen on {kind} {taken}: Address already in use" in err
    assert f"stop it, pick another port with --{kind} HOST:PORT, or disable it with --{kind} off" in err
    assert LISTENING not in err
    assert port_is_free(other)


def _default_ports_busy() -> str | None:
    defaults = ((7400, socket.SOCK_STREAM, "tcp"), (7401, socket.SOCK_STREAM, "tcp"), (7400, socket.SOCK_DGRAM, "udp"),
                (7480, socket.SOCK_STREAM, "tcp"))  # the last one: --admin, once it binds
    for port, kind, name in defaults:
        if not port_is_free(port, kind):
            return f"{name} 127.0.0.1:{port} is busy on this machine"
    return None


def test_serve_with_defaults(tmp_path):
    busy = _default_ports_busy()
    if busy:
        pytest.skip(busy)
    server = ServerProcess("serve").start(tmp_path)
    try:
        for kind, port in (("tcp", 7400), ("ws", 7401), ("udp", 7400), ("admin", 7480)):
            server.wait_log(f"listening transport={kind} address=127.0.0.1:{port}")
        # the hub answers its protocol on every default listener
        with socket.create_connection(("127.0.0.1", 7400), timeout=WAIT) as sock:
            sock.sendall(b'{"op":"ping","ref":1}\n')
            with sock.makefile("rb") as lines:
                assert json.loads(lines.readline()) == {"op": "pong", "ref": 1}
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.settimeout(WAIT)
            udp.sendto(b'{"op":"ping"}\n', ("127.0.0.1", 7400))
            assert json.loads(udp.recvfrom(100)[0]) == {"op": "pong"}
        from websockets.sync.client import connect

        with connect("ws://127.0.0.1:7401/", open_timeout=WAIT) as ws:
            ws.send('{"op":"ping","ref":"w"}')
            assert json.loads(ws.recv(timeout=WAIT)) == {"op": "pong", "ref": "w"}
        with urllib.request.urlopen("http://127.0.0.1:7480/healthz", timeout=WAIT) as r:
            assert json.loads(r.read())["status"] == "ok"
    finally:
        code = server.stop()  # SIGTERM
    log = server.log
    assert code == 0, log
    assert "draining signal=SIGTERM" in log
    assert log.index("draining") < log.index("stopped")
    assert "warning" not in log  # loopback only: no exposure warning


def test_serve_warns_about_a_non_loopback_listener():
    # The warning comes before binding. To open nothing beyond loopback, the port is held
    # on 127.0.0.1, so the bind of 0.0.0.0 fails and the server exits (3) after warning.
    with listening_socket() as busy:
        port = busy.getsockname()[1]
        result = wirehub_cli("serve", "--tcp", f"0.0.0.0:{port}", *ONLY_TCP)
        quiet = wirehub_cli("serve", "--tcp", f"0.0.0.0:{port}", *ONLY_TCP, "--secret", "s3cret")
    assert result.returncode == EXIT_BIND, result.stderr
    assert (
        f"wirehub: warning: tcp 0.0.0.0:{port} is reachable from other machines without TLS or auth" in result.stderr
    )
    assert "Set --secret to require tokens, use --tls/--wss, or bind 127.0.0.1." in result.stderr
    assert quiet.returncode == EXIT_BIND
    assert "warning" not in quiet.stderr


def test_serve_does_not_warn_when_the_app_authenticates_in_on_connect(tmp_path):
    # An app whose on_connect hook decides who may connect is auth: no exposure warning.
    # One without on_connect still gets it. (Bind fails as above: nothing opens beyond loopback.)
    app = tmp_path / "gate_app.py"
    app.write_text(
        "from wirehub.hub import Hooks, Reject\n"
        "hooks = Hooks()\n"
        "@hooks.on_connect\n"
        "def connect(ctx, hello):\n"
        "    raise Reject('unauthorized', 'no')\n"
        "other = Hooks()\n"
        "@other.on_rpc('x')\n"
        "def x(ctx, data):\n"
        "    return data\n"
    )
    with listening_socket() as busy:
        port = busy.getsockname()[1]
        gated = wirehub_cli("serve", "--tcp", f"0.0.0.0:{port}", *ONLY_TCP, "--app", f"{app}:hooks")
        open_app = wirehub_cli("serve", "--tcp", f"0.0.0.0:{port}", *ONLY_TCP, "--app", f"{app}:other")
    assert gated.returncode == EXIT_BIND, gated.stderr
    assert "warning" not in gated.stderr
    assert open_app.returncode == EXIT_BIND, open_app.stderr
    assert "is reachable from other machines without TLS or auth" in open_app.stderr


def test_serve_refuses_workers_on_the_memory_broker():
    port = free_port()
    result = wirehub_cli("serve", "--workers", "2", "--tcp", f"127.0.0.1:{port}", "--ws", "off", "--udp", "off", "--admin", "off")
    assert result.returncode == 2
    assert "--workers 2 needs a shared broker" in result.stderr and "redis://" in result.stderr
    assert port_is_free(port)
