"""Tests for wirehub.config: sources, precedence, syntaxes, problems, click."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import textwrap

import click
import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from wirehub import config as cfg
from wirehub.config import (
    OPTIONS,
    Config,
    ConfigError,
    Option,
    Problem,
    check_file,
    click_options,
    flags_from_click,
    load,
)


# ---------------------------------------------------------------- helpers


def write(tmp_path, text: str, name: str = "wirehub.toml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return str(path)


def problems(**kwargs) -> list[Problem]:
    kwargs.setdefault("env", {})
    with pytest.raises(ConfigError) as info:
        load(**kwargs)
    return info.value.problems


def one_problem(**kwargs) -> Problem:
    found = problems(**kwargs)
    assert len(found) == 1, found
    return found[0]


def parse(name: str, raw, *, text: bool = True):
    return cfg._BY_NAME[name].parse(raw, text=text)


@pytest.fixture
def certs(tmp_path):
    cert = tmp_path / "cert.pem"
    key = tmp_path / "key.pem"
    ca = tmp_path / "ca.pem"
    for p in (cert, key, ca):
        p.write_text("-----BEGIN PLACEHOLDER-----\n")
    return str(cert), str(key), str(ca)


# ---------------------------------------------------------------- table & defaults


def test_defaults_equal_table():
    c = load(env={})
    for opt in OPTIONS:
        expected = None if opt.default is None else opt.parse(opt.default, text=False)
        assert getattr(c, opt.name) == expected, opt.name
        assert getattr(Config(), opt.name) == expected, opt.name
    assert c.config_file is None
    assert c == Config()


def test_spec_defaults():
    c = Config()
    assert c.tcp == (("127.0.0.1", 7400),)
    assert c.ws == (("127.0.0.1", 7401),)
    assert c.udp == (("127.0.0.1", 7400),)
    assert c.admin == (("127.0.0.1", 7480),)
    assert c.tls == c.wss == c.unix == c.allow == c.deny == ()
    assert c.cert is c.key is c.client_ca is c.secret is None
    assert c.broker == "memory://"
    assert (c.workers, c.backlog, c.max_connections, c.max_connections_per_ip) == (1, 4096, 100000, 0)
    assert (c.reuse_port, c.reuse_address, c.nodelay, c.keepalive) == (False, True, True, True)
    assert (c.handshake_timeout, c.idle_timeout, c.drain_timeout, c.close_timeout) == (10.0, 300.0, 30.0, 5.0)
    assert (c.max_frame, c.send_buffer_low, c.send_buffer_high, c.max_send_buffer) == (65536, 16384, 65536, 1048576)
    assert (c.slow_consumer, c.log_level, c.log_format) == ("disconnect", "info", "text")


def test_table_and_dataclass_in_step():
    names = [o.name for o in OPTIONS]
    assert len(set(names)) == len(names)
    assert [f.name for f in dataclasses.fields(Config)] == names + ["config_file"]
    for opt in OPTIONS:
        assert opt.kind in cfg._KINDS
        assert opt.help and opt.group


def test_option_flag_and_env():
    opt = cfg._BY_NAME["max_frame"]
    assert opt.flag == "--max-frame"
    assert opt.env == "WIREHUB_MAX_FRAME"
    assert Option("x_y", "int", 1, "h").flag == "--x-y"


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().workers = 3  # type: ignore[misc]


# ---------------------------------------------------------------- precedence


def test_precedence_file_env_flags_per_key(tmp_path):
    path = write(tmp_path, """
        workers = 2
        backlog = 10
        max_frame = "1KiB"
        log_level = "debug"
    """)
    env = {"WIREHUB_BACKLOG": "20", "WIREHUB_MAX_FRAME": "2KiB"}
    flags = {"max_frame": "3KiB", "log_level": None}
    c = load(file=path, env=env, flags=flags)
    assert c.workers == 2  # file only
    assert c.backlog == 20  # env beats file
    assert c.max_frame == 3 * 1024  # flag beats env and file
    assert c.log_level == "debug"  # flag None = not given
    assert c.idle_timeout == 300.0  # default
    assert c.config_file == path


def test_config_file_from_env(tmp_path):
    path = write(tmp_path, "workers = 3\n")
    c = load(env={"WIREHUB_CONFIG": path})
    assert c.workers == 3 and c.config_file == path


def test_file_argument_beats_env_config(tmp_path):
    a = write(tmp_path, "workers = 3\n", "a.toml")
    b = write(tmp_path, "workers = 4\n", "b.toml")
    assert load(file=b, env={"WIREHUB_CONFIG": a}).workers == 4


def test_env_defaults_to_os_environ(monkeypatch):
    for var in list(os.environ):
        if var.startswith("WIREHUB_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("WIREHUB_WORKERS", "5")
    monkeypatch.setenv("OTHER_THING", "ignored")
    assert load().workers == 5


def test_empty_tuple_flag_is_not_given():
    c = load(env={"WIREHUB_TCP": "0.0.0.0:1"}, flags={"tcp": (), "nodelay": None})
    assert c.tcp == (("0.0.0.0", 1),) and c.nodelay is True


def test_flag_bool_false_is_given():
    assert load(env={"WIREHUB_NODELAY": "yes"}, flags={"nodelay": False}).nodelay is False


# ---------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (65536, 65536),
        ("512", 512),
        ("64KiB", 65536),
        ("64kib", 65536),
        ("64k", 65536),
        ("64K", 65536),
        ("1MiB", 1048576),
        ("1M", 1048576),
        ("1m", 1048576),
        ("1G", 1 << 30),
        ("2GiB", 2 << 30),
        (" 10 KiB ", 10240),
        ("100B", 100),
    ],
)
def test_size_accepted(raw, expected):
    assert cfg.parse_size(raw) == expected
    assert parse("max_frame", raw, text=False) == expected


@pytest.mark.parametrize("raw", ["lots", "1.5M", "-1", "64KB", "1T", "", "k", True, 1.5, -5, [1]])
def test_size_rejected(raw):
    with pytest.raises(ValueError, match="expected a size"):
        cfg.parse_size(raw)


def test_size_minimum():
    p = one_problem(flags={"max_frame": "0"})
    assert p.key == "max_frame" and "at least 1" in p.message
    assert load(env={}, flags={"send_buffer_low": "0"}).send_buffer_low == 0


def test_size_message_names_accepted_form():
    p = one_problem(flags={"max_frame": "lots"})
    assert str(p) == "flag --max-frame: max_frame: expected a size like 65536 or '64KiB', got 'lots'"


# ---------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (10, 10.0),
        (2.5, 2.5),
        ("250ms", 0.25),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1.5", 1.5),
        ("7", 7.0),
        (" 2 s ", 2.0),
        (".5s", 0.5),
        ("1e3ms", 1.0),
    ],
)
def test_duration_accepted(raw, expected):
    assert parse("idle_timeout", raw, text=False) == expected
    assert isinstance(parse("idle_timeout", raw), float)


@pytest.mark.parametrize("raw", ["soon", "5d", "-1s", "nan", "inf", "", "1e999", True, [1], "1 .5"])
def test_duration_rejected(raw):
    with pytest.raises(ValueError, match="expected a duration"):
        parse("idle_timeout", raw)


@pytest.mark.parametrize("raw", [0, "0s", "0ms", 0.0])
def test_duration_must_be_positive(raw):
    with pytest.raises(ValueError, match="more than zero"):
        parse("close_timeout", raw)


# ---------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("127.0.0.1:7400", (("127.0.0.1", 7400),)),
        ("[::1]:7400", (("::1", 7400),)),
        ("[fe80::1%eth0]:80", (("fe80::1%eth0", 80),)),
        ("localhost:0", (("localhost", 0),)),
        ("0.0.0.0:65535", (("0.0.0.0", 65535),)),
        ("off", ()),
        ("OFF", ()),
        ("", ()),
        ("a:1, [::]:2", (("a", 1), ("::", 2))),
        (["a:1", "b:2"], (("a", 1), ("b", 2))),
        (["off"], ()),
        ([], ()),
        ((("::1", 5),), (("::1", 5),)),  # typed values (Config.replace) round-trip
    ],
)
def test_addrs_accepted(raw, expected):
    assert parse("tcp", raw) == expected


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ("127.0.0.1", "expected HOST:PORT"),
        ("127.0.0.1:65536", "port must be a number from 0 to 65535"),
        ("127.0.0.1:-1", "port must be"),
        ("127.0.0.1:http", "port must be"),
        ("127.0.0.1:", "port must be"),
        (":7400", "host must be"),
        ("[]:7400", "host must be"),
        ("::1:7400", "must be in brackets"),
        ("[::1:7400", "unbalanced brackets"),
        ("[localhost]:7400", "only IPv6 addresses go in brackets"),
        ("a b:1", "host must be"),
        ("off, a:1", "cannot be combined"),
        ([7400], "expected HOST:PORT"),
        (7400, "expected a list of HOST:PORT"),
    ],
)
def test_addrs_rejected(raw, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse("tcp", raw)


def test_addrs_reports_every_bad_item():
    with pytest.raises(ValueError) as info:
        parse("udp", ["x:1", "y:99999", "::1:2"])
    assert "99999" in str(info.value) and "::1:2" in str(info.value)


def test_addr_helpers():
    assert cfg.format_addr(("::1", 7400)) == "[::1]:7400"
    assert cfg.format_addr(("h", 1)) == "h:1"
    assert cfg.parse_addr("[::1]:7400") == ("::1", 7400)


# ---------------------------------------------------------------- other kinds


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("true", True), ("FALSE", False), ("1", True), ("0", False), ("yes", True),
     ("No", False), ("on", True), ("Off", False), (True, True), (False, False)],
)
def test_bool_from_text(raw, expected):
    assert parse("nodelay", raw) is expected


@pytest.mark.parametrize("raw", ["maybe", "", "2"])
def test_bool_text_rejected(raw):
    with pytest.raises(ValueError, match="expected true/false"):
        parse("nodelay", raw)


def test_bool_from_toml_must_be_boolean(tmp_path):
    path = write(tmp_path, 'nodelay = "yes"\nkeepalive = false\n')
    p = one_problem(file=path)
    assert p.key == "nodelay" and "expected true or false" in p.message
    assert load(file=write(tmp_path, "keepalive = false\n", "ok.toml"), env={}).keepalive is False


def test_int_syntax_and_minimums(tmp_path):
    assert parse("workers", "4") == 4
    assert parse("max_connections_per_ip", "0") == 0
    for name, raw in [("workers", "0"), ("backlog", "0"), ("max_connections", "-3"), ("max_connections_per_ip", "-1")]:
        with pytest.raises(ValueError, match="at least"):
            parse(name, raw)
    for raw in ["four", "1.5", ""]:
        with pytest.raises(ValueError, match="whole number"):
            parse("workers", raw)
    # from TOML an integer must be a TOML integer
    path = write(tmp_path, 'workers = "4"\nbacklog = true\nmax_connections = 1.0\n')
    assert [p.key for p in problems(file=path)] == ["workers", "backlog", "max_connections"]


def test_choices():
    assert parse("slow_consumer", "drop_oldest") == "drop_oldest"
    assert parse("log_level", "WARNING") == "warning"
    assert parse("log_format", "json") == "json"
    with pytest.raises(ValueError, match=r"expected one of 'debug', 'info', 'warning', 'error'.*did you mean 'warning'"):
        parse("log_level", "warn")
    with pytest.raises(ValueError, match="expected one of"):
        parse("slow_consumer", 3, text=False)


@pytest.mark.parametrize(
    "raw", ["memory://", "redis://localhost:6379/0", "rediss://h", "nats://a:4222", "tls://nats.example:4443"]
)
def test_broker_accepted(raw):
    assert parse("broker", raw) == raw


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ("memory://x", "takes nothing after the scheme"),
        ("http://h", "expected a URL starting with one of memory://"),
        ("localhost:6379", "expected a URL"),
        ("redis://", "needs a host"),
        ("redis://h:99999", "bad URL"),
    ],
)
def test_broker_rejected(raw, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse("broker", raw)


def test_secret():
    assert load(env={"WIREHUB_SECRET": "s3cret"}).secret == "s3cret"
    with pytest.raises(ValueError, match="non-empty string"):
        parse("secret", "")
    with pytest.raises(ValueError, match="non-empty string"):
        parse("secret", 42, text=False)


def test_cidrs():
    nets = parse("allow", "10.0.0.0/8, 192.168.1.7, ::1, 2001:db8::/32, 10.1.2.3/16")
    assert nets == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("192.168.1.7/32"),
        ipaddress.ip_network("::1/128"),
        ipaddress.ip_network("2001:db8::/32"),
        ipaddress.ip_network("10.1.0.0/16"),  # strict=False
    )
    assert parse("deny", "off") == ()
    assert parse("deny", nets) == nets
    for raw in ["10.0.0.0/33", "not-an-ip", [10]]:
        with pytest.raises(ValueError, match="expected an IP network"):
            parse("deny", raw)


def test_unix_paths():
    assert parse("unix", "/tmp/a.sock,/tmp/b.sock") == ("/tmp/a.sock", "/tmp/b.sock")
    assert parse("unix", ("/tmp/a,b.sock",)) == ("/tmp/a,b.sock",)  # list items are not split
    assert parse("unix", "off") == ()


def test_path_must_exist_and_be_file(tmp_path, certs):
    cert, _, _ = certs
    assert parse("cert", cert) == cert
    with pytest.raises(ValueError, match="file not found"):
        parse("cert", str(tmp_path / "missing.pem"))
    with pytest.raises(ValueError, match="not a regular file"):
        parse("cert", str(tmp_path))


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can read anything")
def test_path_must_be_readable(tmp_path):
    p = tmp_path / "secret.pem"
    p.write_text("x")
    p.chmod(0)
    try:
        with pytest.raises(ValueError, match="not readable"):
            parse("key", str(p))
    finally:
        p.chmod(0o600)


# ---------------------------------------------------------------- env


def test_env_lists_and_values():
    env = {
        "WIREHUB_TCP": "0.0.0.0:1, [::]:2",
        "WIREHUB_WS": "off",
        "WIREHUB_UNIX": "/run/a.sock,/run/b.sock",
        "WIREHUB_DENY": "10.0.0.0/8,::1",
        "WIREHUB_NODELAY": "off",
        "WIREHUB_IDLE_TIMEOUT": "2m",
        "WIREHUB_MAX_SEND_BUFFER": "2M",
        "NOT_OURS_TCP": "garbage",
    }
    c = load(env=env)
    assert c.tcp == (("0.0.0.0", 1), ("::", 2))
    assert c.ws == ()
    assert c.unix == ("/run/a.sock", "/run/b.sock")
    assert [str(n) for n in c.deny] == ["10.0.0.0/8", "::1/128"]
    assert c.nodelay is False
    assert c.idle_timeout == 120.0
    assert c.max_send_buffer == 2 << 20


def test_unknown_env_var_with_hint():
    p = one_problem(env={"WIREHUB_MAX_FRAMES": "1"})
    assert p.where == "env WIREHUB_MAX_FRAMES"
    assert p.key == "WIREHUB_MAX_FRAMES"
    assert "did you mean 'WIREHUB_MAX_FRAME'?" in p.message


def test_env_problem_where():
    p = one_problem(env={"WIREHUB_MAX_FRAME": "lots"})
    assert (p.where, p.key) == ("env WIREHUB_MAX_FRAME", "max_frame")


# ---------------------------------------------------------------- files


def test_file_all_kinds(tmp_path, certs):
    cert, key, ca = certs
    path = write(tmp_path, f"""
        tcp = ["0.0.0.0:7400", "[::]:7400"]
        tls = ["0.0.0.0:7443"]
        ws = []
        wss = "off"
        unix = ["/tmp/w.sock"]
        cert = {cert!r}
        key = {key!r}
        client_ca = {ca!r}
        secret = "abc"
        broker = "redis://localhost:6379/0"
        workers = 4
        reuse_port = true
        max_frame = "1MiB"
        send_buffer_high = 131072
        handshake_timeout = "500ms"
        drain_timeout = 1.5
        slow_consumer = "drop_oldest"
        allow = ["10.0.0.0/8"]
        log_format = "json"
    """)
    c = load(file=path, env={})
    assert c.tcp == (("0.0.0.0", 7400), ("::", 7400))
    assert c.tls == (("0.0.0.0", 7443),)
    assert c.ws == c.wss == ()
    assert c.unix == ("/tmp/w.sock",)
    assert (c.cert, c.key, c.client_ca) == (cert, key, ca)
    assert c.workers == 4 and c.reuse_port is True
    assert c.max_frame == 1 << 20 and c.send_buffer_high == 131072
    assert c.handshake_timeout == 0.5 and c.drain_timeout == 1.5
    assert c.slow_consumer == "drop_oldest" and c.log_format == "json"
    assert c.allow == (ipaddress.ip_network("10.0.0.0/8"),)
    assert check_file(path) == []


def test_kebab_case_keys(tmp_path):
    path = write(tmp_path, 'max-frame = "2KiB"\nidle-timeout = "1m"\nmax_connections_per_ip = 3\n')
    c = load(file=path, env={})
    assert (c.max_frame, c.idle_timeout, c.max_connections_per_ip) == (2048, 60.0, 3)


def test_same_key_twice_snake_and_kebab(tmp_path):
    path = write(tmp_path, "max_frame = 1\nmax-frame = 2\n")
    p = one_problem(file=path)
    assert p.where == f"{path}:2" and p.key == "max-frame" and "given twice" in p.message


def test_three_bad_keys_three_problems_with_lines(tmp_path):
    path = write(tmp_path, """
        # wirehub config
        workers = 2

        max_frame = "lots"
        tcp = ["::1:80"]
        log_level = "loud"
    """)
    found = problems(file=path)
    assert [(p.where, p.key) for p in found] == [
        (f"{path}:4", "max_frame"),
        (f"{path}:5", "tcp"),
        (f"{path}:6", "log_level"),
    ]
    assert str(found[0]) == f"{path}:4: max_frame: expected a size like 65536 or '64KiB', got 'lots'"


def test_line_numbers_for_quoted_and_multiline(tmp_path):
    path = write(tmp_path, """
        tcp = [
          "a:1",
        ]
        "udp" = ["x"]
        'max-frame' = "x"
    """)
    assert [(p.where, p.key) for p in problems(file=path)] == [
        (f"{path}:4", "udp"),
        (f"{path}:5", "max_frame"),  # known options are reported by name
    ]


def test_unknown_key_with_suggestion(tmp_path):
    path = write(tmp_path, "workers = 2\nmax_fram = 10\nmax-conections = 3\nzzz = 1\n")
    found = problems(file=path)
    assert [(p.where, p.key) for p in found] == [
        (f"{path}:2", "max_fram"),
        (f"{path}:3", "max-conections"),
        (f"{path}:4", "zzz"),
    ]
    assert found[0].message == "unknown option; did you mean 'max_frame'?"
    assert "did you mean 'max_connections'?" in found[1].message
    assert found[2].message == "unknown option"


def test_table_is_unknown_or_wrong_type(tmp_path):
    path = write(tmp_path, "workers = 1\n[server]\nport = 1\n[tcp]\nx = 1\n")
    found = problems(file=path)
    assert [(p.where, p.key) for p in found] == [(f"{path}:2", "server"), (f"{path}:4", "tcp")]
    assert "got a table" in found[1].message


def test_toml_syntax_error(tmp_path):
    path = write(tmp_path, "workers = 2\nmax_frame = = 3\n")
    p = one_problem(file=path)
    assert p.where == f"{path}:2"
    assert "invalid TOML" in p.message and "line 2" in p.message
    assert str(p).startswith(f"{path}:2: invalid TOML")


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.toml")
    p = one_problem(file=path)
    assert p.where == path and "cannot read config file" in p.message


def test_missing_file_via_env(tmp_path):
    path = str(tmp_path / "nope.toml")
    p = one_problem(env={"WIREHUB_CONFIG": path})
    assert p.where == path


def test_not_utf8(tmp_path):
    path = tmp_path / "bin.toml"
    path.write_bytes(b"workers = \xff\n")
    assert "not UTF-8" in one_problem(file=str(path)).message


def test_problems_from_all_sources_at_once(tmp_path):
    path = write(tmp_path, "workers = 0\n")
    found = problems(
        file=path,
        env={"WIREHUB_BACKLOG": "x", "WIREHUB_NOPE": "1"},
        flags={"max_frame": "lots", "tls": ("0.0.0.0:1",)},
    )
    assert [(p.where, p.key) for p in found] == [
        (f"{path}:1", "workers"),
        ("env WIREHUB_BACKLOG", "backlog"),
        ("env WIREHUB_NOPE", "WIREHUB_NOPE"),
        ("flag --max-frame", "max_frame"),
        ("flag --tls", "tls"),  # a cross-field problem names where its value came from
    ]


def test_config_error_str():
    err = ConfigError([Problem("a.toml:1", "workers", "bad"), Problem("config", "tls", "worse")])
    assert str(err) == "invalid configuration:\n  a.toml:1: workers: bad\n  config: tls: worse"


def test_check_file_ignores_env(tmp_path, monkeypatch):
    monkeypatch.setenv("WIREHUB_WORKERS", "zero")
    path = write(tmp_path, "max_frame = 'lots'\n")
    found = check_file(path)
    assert [(p.where, p.key) for p in found] == [(f"{path}:1", "max_frame")]
    assert check_file(write(tmp_path, "workers = 2\n", "ok.toml")) == []


def test_unknown_flag_name():
    p = one_problem(flags={"max_fram": "1"})
    assert p.where == "flag --max-fram" and "did you mean 'max_frame'?" in p.message


# ---------------------------------------------------------------- cross-field


def test_tls_listener_needs_cert_and_key(certs):
    cert, key, _ = certs
    found = problems(flags={"tls": ("0.0.0.0:7443",), "wss": ("0.0.0.0:7444",)})
    assert [(p.where, p.key) for p in found] == [("flag --tls", "tls"), ("flag --wss", "wss")]
    c = load(env={}, flags={"tls": ("0.0.0.0:7443",), "cert": cert, "key": key})
    assert c.tls == (("0.0.0.0", 7443),)


def test_cert_without_key_and_key_without_cert(certs):
    cert, key, _ = certs
    p = one_problem(flags={"cert": cert, "tls": ("h:1",)})
    assert (p.where, p.key) == ("flag --cert", "cert") and "key" in p.message
    p = one_problem(flags={"key": key})
    assert (p.where, p.key) == ("flag --key", "key")


def test_client_ca_needs_cert_and_key(certs):
    cert, key, ca = certs
    p = one_problem(flags={"client_ca": ca})
    assert (p.where, p.key) == ("flag --client-ca", "client_ca")
    assert load(env={}, flags={"client_ca": ca, "cert": cert, "key": key}).client_ca == ca


def test_missing_cert_file_is_reported_once(tmp_path):
    # cert fails to parse, so the cert/key rules are skipped rather than piling on
    p = one_problem(flags={"cert": str(tmp_path / "x.pem"), "tls": ("h:1",)})
    assert (p.where, p.key) == ("flag --cert", "cert") and "file not found" in p.message


@pytest.mark.parametrize(
    ("flags", "keys"),
    [
        ({"send_buffer_low": "64KiB"}, ["send_buffer_low"]),
        ({"send_buffer_low": "1MiB", "send_buffer_high": "512KiB"}, ["send_buffer_low"]),
        ({"send_buffer_high": "2MiB"}, ["send_buffer_high"]),
        ({"send_buffer_low": "4M", "send_buffer_high": "3M"}, ["send_buffer_low", "send_buffer_high"]),
    ],
)
def test_buffer_ordering(flags, keys):
    assert [p.key for p in problems(flags=flags)] == keys


def test_buffer_ordering_ok_at_boundary():
    c = load(env={}, flags={"send_buffer_low": "0", "send_buffer_high": "1MiB", "max_send_buffer": "1MiB"})
    assert c.send_buffer_high == c.max_send_buffer


# ---------------------------------------------------------------- replace


def test_replace_revalidates(certs):
    c = Config()
    assert c.replace(workers=4).workers == 4
    assert c.replace(max_frame="1KiB").max_frame == 1024
    assert c.replace(tcp=(("::1", 0),)).tcp == (("::1", 0),)
    with pytest.raises(ConfigError) as info:
        c.replace(workers=0, send_buffer_low=10**9)
    assert [(p.where, p.key) for p in info.value.problems] == [
        ("replace", "workers"),
        ("config", "send_buffer_low"),
    ]
    with pytest.raises(ConfigError):
        c.replace(tls=(("0.0.0.0", 1),))
    cert, key, _ = certs
    tls = c.replace(tls=(("0.0.0.0", 1),), cert=cert, key=key)
    assert tls.cert == cert
    with pytest.raises(ConfigError):
        tls.replace(key=None)
    assert tls.replace(tls=(), cert=None, key=None).cert is None
    with pytest.raises(TypeError):
        c.replace(nonsense=1)
    assert c.replace(config_file="x.toml").config_file == "x.toml"


# ---------------------------------------------------------------- click


@click.command(context_settings={"max_content_width": 120})
@click_options
def cli(**params):
    config, flags = flags_from_click(params)
    c = load(file=config, env={}, flags=flags)
    click.echo(repr((config, sorted(flags), c.tcp, c.nodelay, c.max_frame, c.workers)))


def run(*args: str):
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, result.output
    return eval(result.output)  # noqa: S307 - our own repr


def test_click_nothing_given():
    assert run() == (None, [], (("127.0.0.1", 7400),), True, 65536, 1)


def test_click_flags_parse(tmp_path):
    path = write(tmp_path, "workers = 3\nnodelay = true\n")
    config, given, tcp, nodelay, max_frame, workers = run(
        "--config", path, "--tcp", "0.0.0.0:1", "--tcp", "[::1]:2", "--no-nodelay", "--max-frame", "1M"
    )
    assert config == path
    assert given == ["max_frame", "nodelay", "tcp"]
    assert tcp == (("0.0.0.0", 1), ("::1", 2))
    assert nodelay is False and max_frame == 1 << 20 and workers == 3


def test_click_tcp_off_and_comma_list():
    assert run("--tcp", "off")[2] == ()
    assert run("--tcp", "a:1,b:2")[2] == (("a", 1), ("b", 2))


def test_click_params_and_defaults_none():
    params = {p.name: p for p in cli.params}
    assert list(params) == ["config"] + [o.name for o in OPTIONS]
    for opt in OPTIONS:
        p = params[opt.name]
        assert p.default is None
        assert p.multiple is opt.is_list
        assert p.opts == [opt.flag]
        if opt.kind == "bool":
            assert p.secondary_opts == ["--no-" + opt.flag[2:]]


def test_click_bad_value_is_config_error():
    result = CliRunner().invoke(cli, ["--max-frame", "lots", "--tcp", "::1:2"])
    assert isinstance(result.exception, ConfigError)
    assert [p.where for p in result.exception.problems] == ["flag --tcp", "flag --max-frame"]


def test_click_help_lists_every_option_with_default():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())  # undo click's line wrapping
    assert "--config FILE" in text
    for opt in OPTIONS:
        assert opt.flag in text, opt.name
        assert f"[default: {opt.default_text}]" in text, opt.name
    assert "[default: 127.0.0.1:7400]" in text
    assert "--nodelay / --no-nodelay" in text
    assert "--max-frame SIZE" in text and "[default: 64KiB]" in text
    assert "--log-level [debug|info|warning|error]" in text


def test_flags_from_click_filters_not_given():
    params = {"config": None, "tcp": (), "workers": None, "nodelay": False, "max_frame": "1K", "unrelated": 1}
    assert flags_from_click(params) == (None, {"nodelay": False, "max_frame": "1K"})
    assert flags_from_click({"config": "a.toml"}) == ("a.toml", {})


# ---------------------------------------------------------------- round trips


@given(st.integers(min_value=0, max_value=1 << 45))
def test_size_format_round_trip(n):
    text = cfg.format_size(n)
    assert cfg.parse_size(text) == n
    assert parse("max_send_buffer", text) == n


@given(st.integers(min_value=0, max_value=1 << 20), st.sampled_from(["", "B", "k", "KiB", "M", "MiB", "G", "GiB"]))
def test_size_units(n, unit):
    mult = {"": 1, "B": 1, "k": 1024, "KiB": 1024, "M": 1 << 20, "MiB": 1 << 20, "G": 1 << 30, "GiB": 1 << 30}
    assert cfg.parse_size(f"{n}{unit}") == n * mult[unit]


@given(st.floats(min_value=1e-9, max_value=1e9, allow_nan=False, allow_infinity=False))
def test_duration_format_round_trip(secs):
    text = cfg.format_duration(secs)
    assert parse("idle_timeout", text) == secs


@given(st.integers(min_value=1, max_value=10**6), st.sampled_from(["ms", "s", "m", "h"]))
def test_duration_units(n, unit):
    secs = parse("idle_timeout", f"{n}{unit}")
    assert secs == {"ms": n / 1000, "s": n, "m": n * 60, "h": n * 3600}[unit]
    assert parse("idle_timeout", cfg.format_duration(secs)) == secs
