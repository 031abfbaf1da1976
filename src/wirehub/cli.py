"""The ``wirehub`` command line."""

from __future__ import annotations

import importlib
import os
import sys
from typing import TYPE_CHECKING, Any

import click

from . import config as cfg
from ._version import __version__
from .app import App

if TYPE_CHECKING:
    from .hub import Hooks

EXIT_CONFIG = 2


def _load_config(params: dict[str, Any]) -> cfg.Config:
    file, flags = cfg.flags_from_click(params)
    try:
        return cfg.load(file=file, flags=flags)
    except cfg.ConfigError as exc:
        click.echo(f"wirehub: {exc}", err=True)
        command = click.get_current_context().command_path
        click.echo(f"Nothing was started. Fix the values above (see `{command} --help`).", err=True)
        sys.exit(EXIT_CONFIG)


def exposure_warnings(config: cfg.Config, hooks: Hooks | None = None) -> list[str]:
    """Listeners reachable from other machines that have neither TLS nor auth (a ``--secret``,
    or an app whose ``on_connect`` hook decides who may connect)."""
    if config.secret or (hooks is not None and hooks.single.get("connect") is not None):
        return []
    out = []
    for kind in ("tcp", "ws", "udp"):
        for host, port in getattr(config, kind):
            if not cfg.is_loopback(host):
                out.append(
                    f"{kind} {cfg.format_addr((host, port))} is reachable from other machines without TLS or auth: "
                    f"anyone who can reach it can connect. Set --secret to require tokens, use --tls/--wss, or bind 127.0.0.1."
                )
    return out


def _import_attr(spec: str, what: str, example: str) -> Any:
    """Import ``module:attribute`` (or ``path/file.py:attribute``) and return the attribute."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise click.UsageError(f"{what} must look like module:attribute (for example {example}), got {spec!r}")
    if module_name.endswith(".py") or os.sep in module_name:
        path = os.path.abspath(module_name)
        sys.path.insert(0, os.path.dirname(path))
        module_name = os.path.splitext(os.path.basename(path))[0]
    elif "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise click.UsageError(f"cannot import module {module_name!r}: {exc}") from None
    try:
        obj: Any = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise click.UsageError(f"module {module_name!r} has no attribute {attr!r}") from None
    return obj


def load_app(spec: str) -> App:
    """Import ``module:attribute`` (or ``path/file.py:attribute``) and return the App."""
    obj = _import_attr(spec, "APP", "examples.echo:app")
    if isinstance(obj, type) and issubclass(obj, App):
        obj = obj()
    if not isinstance(obj, App):
        raise click.UsageError(f"{spec} is a {type(obj).__name__}, not a wirehub.App")
    try:
        obj.handlers()
    except TypeError as exc:
        raise click.UsageError(str(exc)) from None
    return obj


def load_hooks(spec: str) -> Any:
    """``--app module:hooks``: the :class:`wirehub.hub.Hooks` it names (or an embedded
    ``Hub``'s hooks)."""
    from .hub import Hooks, Hub

    obj = _import_attr(spec, "--app", "examples.chat_app.app:hub")
    if isinstance(obj, Hub):
        obj = obj.hooks
    if not isinstance(obj, Hooks):
        raise click.UsageError(f"--app {spec} is a {type(obj).__name__}, not wirehub.hub.Hooks: "
                               "create one with `hub = wirehub.hub.Hooks()` and register hooks on it")
    if not obj:
        click.echo(f"wirehub: warning: --app {spec} registers no hooks", err=True)
    return obj


class _Group(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)  # in the order they were added, not sorted


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "-V", "--version", prog_name="wirehub")
def main() -> None:
    """wirehub: a socket server for Python.

    \b
    Run the real-time hub:            wirehub serve
    Serve your own framework app:     wirehub run module:app
    Check a config file:              wirehub config check wirehub.toml

    Every option can also come from a TOML file (--config) or a WIREHUB_* environment
    variable; flags win over the environment, which wins over the file.
    """


@main.command()
@cfg.click_options
def serve(**params: Any) -> None:
    """Run the hub: rooms, presence, history, direct messages, token auth.

    Listens on TCP 127.0.0.1:7400, WebSocket 127.0.0.1:7401, UDP 127.0.0.1:7400 and the
    admin API on 127.0.0.1:7480 unless told otherwise. Talk to it with `wirehub connect`.
    """
    from .hub import HubApp
    from .hub.broker import BrokerError
    from .server.supervisor import run

    config = _load_config(params)
    if config.workers > 1 and config.broker == "memory://":
        click.echo(
            f"wirehub: --workers {config.workers} needs a shared broker: with memory:// each worker would have its own "
            "rooms, history and presence, and clients on different workers would not see each other. "
            "Use --broker redis://HOST:PORT or --broker nats://HOST:PORT, or run one worker.",
            err=True,
        )
        sys.exit(EXIT_CONFIG)
    hooks = load_hooks(config.app) if config.app else None
    for warning in exposure_warnings(config, hooks):
        click.echo(f"wirehub: warning: {warning}", err=True)
    try:
        app = HubApp(config, hooks=hooks)
    except (BrokerError, ValueError, OSError) as exc:
        click.echo(f"wirehub: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    sys.exit(run(app, config))


@main.command()
@click.option("--sub", required=True, help="The user the token is for (the 'sub' claim).")
@click.option("--rooms", multiple=True, metavar="GLOB", help="Rooms the user may join (repeatable; default: any).")
@click.option("--publish", multiple=True, metavar="GLOB", help="Rooms the user may publish to (repeatable; default: those it may join).")
@click.option("--ttl", default="1h", show_default=True, metavar="DURATION", help="Lifetime: seconds, or 30s, 15m, 1h, 7d...")
@click.option("--name", default=None, help="Display name claim.")
@click.option("--send/--no-send", "send", default=None,
              help="Whether the user may send direct messages to other clients (the 'send' claim; default: only with no --rooms).")
@click.option("--secret", envvar="WIREHUB_SECRET", help="The server's --secret (also $WIREHUB_SECRET).")
def token(sub: str, rooms: tuple[str, ...], publish: tuple[str, ...], ttl: str, name: str | None, send: bool | None, secret: str | None) -> None:
    """Mint an HS256 token for `hello` and `refresh`, signed with the server's secret."""
    from .hub.auth import mint_token

    if not secret:
        raise click.UsageError("no secret: pass --secret S or set WIREHUB_SECRET (the same one the server uses)")
    try:
        seconds = _parse_ttl(ttl)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--ttl") from None
    click.echo(mint_token(secret, sub, rooms=list(rooms) or None, publish=list(publish) or None, ttl=seconds, name=name, send=send))


def _parse_ttl(text: str) -> float:
    if text.endswith("d") and text[:-1].replace(".", "", 1).isdigit():
        return float(text[:-1]) * 86400
    return cfg.parse_duration(text)


@main.command()
@click.argument("url")
@click.option("--token", envvar="WIREHUB_TOKEN", default=None, help="Token for hello (also $WIREHUB_TOKEN); mint one with `wirehub token`.")
@click.option("--name", default=None, help="Display name sent in hello.")
@click.option("--cafile", default=None, type=click.Path(dir_okay=False), help="CA bundle (PEM) to verify a tls:// or wss:// hub.")
@click.option("--no-reconnect", is_flag=True, help="Exit when the connection drops instead of reconnecting.")
def connect(url: str, token: str | None, name: str | None, cafile: str | None, no_reconnect: bool) -> None:
    """Interactive client: tcp://, tls://, unix://, ws://, wss://, udp:// URLs.

    \b
    Prints every frame that arrives, one JSON object per line, on stdout. Reads stdin: a line
    that is a JSON object is sent as is; otherwise a command:
      /join ROOM   /leave ROOM   /pub ROOM TEXT   /send CLIENT TEXT
      /presence ROOM   /history ROOM [LIMIT]   /ping   /quit   /help
    Exits 0 at end of input or /quit; 1 when it cannot connect or the hub sends it away.
    """
    from .client.interactive import main as interactive

    sys.exit(interactive(url, token=token, name=name, cafile=cafile, reconnect=not no_reconnect))


def _admin_base(admin: str) -> str:
    return admin if admin.startswith(("http://", "https://")) else f"http://{admin}"


_admin_option = click.option("--admin", default="127.0.0.1:7480", show_default=True, metavar="HOST:PORT|URL", help="The server's admin API.")
_token_option = click.option("--admin-token", envvar="WIREHUB_ADMIN_TOKEN", default=None, help="Bearer token (also $WIREHUB_ADMIN_TOKEN).")


def _query_options(f):
    """The connection query of /api/connections, for status and top."""
    for option in reversed((
        click.option("--sort", default=None, metavar="KEY", help="Sort connections by: msgs (the default: busiest), msgs_in, msgs_out, "
                     "bytes_in, bytes_out, send_buffer, idle_s, connected_at, msgs_dropped, id, peer, transport; closed_at, reason with --closed."),
        click.option("--order", type=click.Choice(["asc", "desc"]), default=None, help="Sort order (counters default to desc)."),
        click.option("--transport", default=None, help="Only connections of this transport (tcp, tls, unix, ws, wss, udp)."),
        click.option("--user", default=None, help="Only connections of this user."),
        click.option("--room", default=None, help="Only connections in this room."),
        click.option("--peer", default=None, metavar="CIDR", help="Only connections from this address or network."),
        click.option("--closed", is_flag=True, help="Recently closed connections instead, with their close reason."),
    )):
        f = option(f)
    return f


def _query(sort, order, transport, user, room, peer, closed) -> dict[str, str | None]:
    return {"sort": sort, "order": order, "transport": transport, "user": user, "room": room, "peer": peer, "state": "closed" if closed else None}


@main.command()
@_admin_option
@_token_option
@click.option("--limit", default=50, show_default=True, help="Rows per table.")
@_query_options
def status(admin: str, admin_token: str | None, limit: int, **query: Any) -> None:
    """Print a running server's connections and rooms (from its admin API)."""
    from .status import StatusError, render

    try:
        click.echo(render(_admin_base(admin), admin_token, limit=limit, query=_query(**query)))
    except StatusError as exc:
        click.echo(f"wirehub: {exc}", err=True)
        sys.exit(1)


@main.command()
@_admin_option
@_token_option
@click.option("--limit", default=30, show_default=True, help="Rows per table.")
@click.option("--interval", default=1.0, show_default=True, help="Seconds between refreshes.")
@click.option("--iterations", default=0, help="Stop after N refreshes (0: until Ctrl-C).")
@_query_options
def top(admin: str, admin_token: str | None, limit: int, interval: float, iterations: int, **query: Any) -> None:
    """Like status, refreshed every --interval seconds until Ctrl-C."""
    import time

    from .status import StatusError, render

    n = 0
    try:
        while True:
            try:
                screen = render(_admin_base(admin), admin_token, limit=limit, query=_query(**query))
            except StatusError as exc:
                screen = f"wirehub: {exc}"
            click.echo("\x1b[H\x1b[2J" + screen if sys.stdout.isatty() else screen)
            n += 1
            if iterations and n >= iterations:
                return
            time.sleep(interval)
    except KeyboardInterrupt:
        pass


@main.command("run")
@click.argument("app_spec", metavar="MODULE:APP")
@cfg.click_options
def run_app(app_spec: str, **params: Any) -> None:
    """Serve your own App (for example: wirehub run examples.echo:app --tcp 127.0.0.1:9000)."""
    from .server.supervisor import run

    config = _load_config(params)
    app = load_app(app_spec)
    sys.exit(run(app, config))


@main.group("config")
def config_group() -> None:
    """Configuration files."""


@config_group.command("check")
@click.argument("file", type=click.Path(dir_okay=False))
def config_check(file: str) -> None:
    """Validate FILE; print every problem with its location. Exit 0 when it is valid."""
    problems = cfg.check_file(file)
    if not problems:
        click.echo(f"{file}: ok")
        return
    for problem in problems:
        click.echo(str(problem), err=True)
    click.echo(f"{file}: {len(problems)} problem{'s' if len(problems) != 1 else ''}", err=True)
    sys.exit(1)


from .bench.command import bench as _bench  # noqa: E402

main.add_command(_bench)


if __name__ == "__main__":  # pragma: no cover
    main()
