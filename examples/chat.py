"""A line-based chat room, written on the framework API (no hub).

Run it from the repository root, then chat from two (or more) other terminals::

    wirehub run examples.chat:app --udp off      # TCP 127.0.0.1:7400, WebSocket :7401

    nc 127.0.0.1 7400                             # terminal 1
    nc 127.0.0.1 7400                             # terminal 2

The first line you send is your name: 1 to 32 printable characters without spaces, unique
in the room (``Bob`` and ``bob`` count as the same name). After that every line goes to
everyone else as ``<name> text``; your own lines are not echoed back. Commands::

    /who          who is here
    /me ACTION    "* name ACTION" to everyone else
    /quit         leave

Joins and leaves are announced, and a name is free again as soon as its owner leaves.

The handlers are plain functions: they run inline as bytes arrive and never wait, so the
room lives in ordinary dicts with no locks. A broadcast encodes its text once and hands the
same bytes to every ``conn.send()``.
"""

from __future__ import annotations

from wirehub import App, Connection, FrameError, broadcast

MAX_NAME = 32
COMMANDS = "/who, /me ACTION, /quit"
ASK = b"* what is your name?"
GOODBYES = {"quit": "bye", "shutdown": "the server is shutting down, bye", "idle": "you were idle too long, bye"}


def clean(text: str) -> str:
    """Drop control characters (terminal escapes, stray CR, tabs) so no one can mess up
    another user's terminal, and so a line never contains a newline."""
    return "".join(ch for ch in text if ch.isprintable())


def valid_name(name: str) -> bool:
    return 1 <= len(name) <= MAX_NAME and name.isprintable() and not any(ch.isspace() for ch in name)


class ChatApp(App):
    def __init__(self) -> None:
        super().__init__(framing="line", name="chat")
        self.members: dict[str, Connection] = {}  # casefolded name -> connection, in join order

    # ------------------------------------------------------------------ room

    def names(self) -> list[str]:
        return sorted((c.state["name"] for c in self.members.values()), key=str.casefold)

    def broadcast(self, text: str, exclude: Connection | None = None) -> None:
        # encoded once, whatever the number of members
        broadcast([m for m in self.members.values() if m is not exclude], text.encode())

    # ------------------------------------------------------------------ handlers

    def connect(self, conn: Connection) -> None:
        conn.state["name"] = None
        conn.send(b"* welcome to wirehub chat! what is your name?")

    def frame(self, conn: Connection, frame: bytes) -> None:
        text = frame.decode("utf-8", "replace")
        name = conn.state["name"]
        if name is None:
            self.join(conn, text.strip())
            return
        text = clean(text)
        if text.startswith("/"):
            self.command(conn, name, text)
        elif text.strip():
            self.broadcast(f"<{name}> {text}", exclude=conn)

    def join(self, conn: Connection, name: str) -> None:
        if not valid_name(name):
            conn.send(f"error: a name is 1 to {MAX_NAME} printable characters without spaces".encode())
            conn.send(ASK)
            return
        if name.casefold() in self.members:
            conn.send(f"error: the name {name} is taken".encode())
            conn.send(ASK)
            return
        others = self.names()
        conn.state["name"] = name
        self.members[name.casefold()] = conn
        here = f"also here: {', '.join(others)}" if others else "nobody else is here yet"
        conn.send(f"* hello, {name}! {here} (commands: {COMMANDS})".encode())
        self.broadcast(f"* {name} joined", exclude=conn)

    def command(self, conn: Connection, name: str, text: str) -> None:
        command, _, arg = text.partition(" ")
        arg = arg.strip()
        if command == "/who":
            conn.send(f"* here: {', '.join(self.names())}".encode())
        elif command == "/me" and arg:
            self.broadcast(f"* {name} {arg}", exclude=conn)
        elif command == "/me":
            conn.send(b"error: usage: /me ACTION")
        elif command == "/quit":
            conn.close("quit")
        else:
            conn.send(f"error: unknown command {command}; try {COMMANDS}".encode())

    def frame_error(self, conn: Connection, error: FrameError) -> None:
        if error.fatal:  # the stream cannot be decoded any more: the default closes it
            return super().frame_error(conn, error)
        # A line over --max-frame: tell the sender and carry on (line framing recovers).
        conn.send(f"error: {error.message}; not sent".encode())

    def closing(self, conn: Connection, reason: str) -> None:
        # The server is closing conn (/quit, idle, shutdown...): say why, and leave the room
        # now rather than when the peer has finished hanging up.
        conn.send(f"* {GOODBYES.get(reason, reason)}".encode())
        self.leave(conn, announce=reason != "shutdown")  # on shutdown everyone goes

    def disconnect(self, conn: Connection, reason: str) -> None:
        self.leave(conn)  # the peer hung up

    def leave(self, conn: Connection, announce: bool = True) -> None:
        name = conn.state.get("name")
        if name is not None and self.members.get(name.casefold()) is conn:
            del self.members[name.casefold()]
            if announce:
                self.broadcast(f"* {name} left")


app = ChatApp()
