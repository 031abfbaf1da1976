"""``wirehub connect URL``: an interactive client on stdin/stdout.

Every frame that arrives is printed to stdout as one JSON object per line (replies, messages,
presence events, and the client's own ``recovery_failed``/``rejoin_failed`` events); what the
client has to say to a human (connected, reconnecting, a bad command) goes to stderr. Each
stdin line is either a JSON object, sent as is, or a command (see :data:`HELP`). Commands run
one after another; a request's reply is printed before the next line is read.
"""

from __future__ import annotations

import asyncio
import json
import ssl as _ssl
import sys
import threading
from typing import Any, Callable

from .core import Client, connect
from .errors import ClientError, ConnectError, Disconnected, HubError
from .transports import parse_url

HELP = """\
commands (anything else that is a JSON object is sent as is):
  /join ROOM              join a room (re-joined with recovery after a reconnect)
  /leave ROOM             leave it
  /pub ROOM TEXT          publish TEXT (a JSON string) to ROOM
  /send CLIENT TEXT       send TEXT to one client
  /presence ROOM          who is in ROOM
  /history ROOM [LIMIT]   ROOM's retained messages
  /ping                   a round trip to the hub
  /quit                   leave (so does end of input)
  /help                   this text"""

EXIT_OK = 0
EXIT_FAILED = 1  # could not connect, or the hub sent us away
EXIT_USAGE = 2


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":"), ensure_ascii=False) + "\n")
    sys.stdout.flush()


def _say(text: str) -> None:
    sys.stderr.write(f"wirehub: {text}\n")
    sys.stderr.flush()


def _stdin_lines(loop: asyncio.AbstractEventLoop) -> asyncio.Queue:
    """Lines of stdin, read by a daemon thread (works for ttys, pipes and files alike);
    ``None`` marks the end of input."""
    queue: asyncio.Queue = asyncio.Queue()

    def read() -> None:
        try:
            for line in sys.stdin:
                loop.call_soon_threadsafe(queue.put_nowait, line)
        except (OSError, ValueError):
            pass
        finally:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, None)
            except RuntimeError:  # the loop is gone: we are exiting anyway
                pass

    threading.Thread(target=read, name="wirehub-stdin", daemon=True).start()
    return queue


async def _command(client: Client, line: str) -> bool:
    """Run one input line; False to quit."""
    text = line.strip()
    if not text:
        return True
    if not text.startswith("/"):
        try:
            frame = json.loads(text)
        except ValueError:
            frame = None
        if not isinstance(frame, dict):
            _say(f"not a JSON object or a command: {text[:80]!r} (type /help)")
            return True
        await client.send_frame(frame)
        return True
    name, _, rest = text.partition(" ")
    rest = rest.strip()
    args = rest.split()
    if name in ("/quit", "/exit"):
        return False
    if name == "/help":
        sys.stderr.write(HELP + "\n")
        return True
    if name == "/ping":
        await client.ping()
        return True
    actions: dict[str, tuple[int, Callable[..., Any], str]] = {
        "/join": (1, lambda: client.join(args[0]), "/join ROOM"),
        "/leave": (1, lambda: client.leave(args[0]), "/leave ROOM"),
        "/presence": (1, lambda: client.presence(args[0]), "/presence ROOM"),
        "/history": (1, lambda: client.history(args[0], int(args[1]) if len(args) > 1 else None), "/history ROOM [LIMIT]"),
        "/pub": (2, lambda: client.publish(args[0], rest.split(None, 1)[1]), "/pub ROOM TEXT"),
        "/send": (2, lambda: client.send(args[0], rest.split(None, 1)[1]), "/send CLIENT TEXT"),
    }
    if name not in actions:
        _say(f"unknown command {name} (type /help)")
        return True
    need, action, usage = actions[name]
    if len(args) < need or (name == "/history" and len(args) > 1 and not args[1].isdigit()):
        _say(f"usage: {usage}")
        return True
    try:
        await action()
    except HubError:
        pass  # the error frame was printed with the others
    except asyncio.TimeoutError as exc:
        _say(str(exc) or "no reply in time")
    return True


async def run(url: str, *, token: str | None = None, name: str | None = None, cafile: str | None = None, reconnect: bool = True) -> int:
    try:
        endpoint = parse_url(url)
    except ValueError as exc:
        _say(str(exc))
        return EXIT_USAGE
    ssl_context = None
    if cafile is not None:
        if not endpoint.secure:
            _say(f"--cafile is for tls:// and wss:// URLs, not {endpoint.scheme}://")
            return EXIT_USAGE
        try:
            ssl_context = _ssl.create_default_context(cafile=cafile)
        except (OSError, _ssl.SSLError) as exc:
            _say(f"cannot read --cafile {cafile}: {exc}")
            return EXIT_USAGE

    client_box: list[Client] = []

    def on_state(state: str, reason: str | None) -> None:
        if state == "reconnecting":
            _say(f"connection lost ({reason}); reconnecting to {url}")
        elif state == "connected" and client_box:
            c = client_box[0]
            _say(f"reconnected to {url} as {c.client_id} (user {c.user})")

    try:
        client = await connect(url, token=token, name=name, ssl=ssl_context, reconnect=reconnect, on_state=on_state, on_frame=_print_json)
    except (ConnectError, HubError, OSError) as exc:
        _say(str(exc) if isinstance(exc, ConnectError) else f"cannot connect to {url}: {exc}")
        return EXIT_FAILED
    client_box.append(client)
    _say(f"connected to {url} as {client.client_id} (user {client.user}); type /help for commands")

    failure: list[BaseException] = []

    async def events() -> None:
        # Frames are printed by on_frame as they arrive; print the client's own events here.
        try:
            async for event in client:
                if event.get("op") in ("recovery_failed", "rejoin_failed"):
                    _print_json(event)
        except Disconnected as exc:
            failure.append(exc)

    watcher = asyncio.get_running_loop().create_task(events())
    lines = _stdin_lines(asyncio.get_running_loop())
    try:
        while True:
            next_line = asyncio.ensure_future(lines.get())
            done, _ = await asyncio.wait({next_line, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if watcher in done:
                next_line.cancel()
                break
            line = next_line.result()
            if line is None:
                # End of input: one round trip, so that the replies to what was sent are
                # printed before we go.
                try:
                    await client._request({"op": "ping"}, quiet=True)
                except (ClientError, asyncio.TimeoutError):
                    pass
                break
            try:
                if not await _command(client, line):
                    break
            except Disconnected as exc:
                failure.append(exc)
                break
            except ClientError as exc:
                _say(str(exc))
    finally:
        await client.close()
        watcher.cancel()
        try:
            await watcher
        except (asyncio.CancelledError, Exception):
            pass
    if failure:
        _say(f"disconnected: {failure[0]}")
        return EXIT_FAILED
    return EXIT_OK


def main(url: str, **options: Any) -> int:
    try:
        import uvloop  # noqa: F401

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:  # pragma: no cover - Windows
        runner = asyncio.Runner()
    with runner:
        try:
            return runner.run(run(url, **options))
        except KeyboardInterrupt:  # pragma: no cover - interactive
            return 130
