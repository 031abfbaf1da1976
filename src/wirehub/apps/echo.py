"""The echo app: every frame comes back to its sender. ``wirehub run wirehub.apps.echo:app``."""

from __future__ import annotations

from ..app import App

app = App(framing="line", name="echo")


@app.on_frame
def echo(conn, frame: bytes) -> None:
    conn.send(frame)


@app.on_refusal
def refusal(reason: str) -> bytes:
    return f"error: connection refused ({reason}); try again later".encode()
