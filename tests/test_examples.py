"""The examples in examples/ work as documented: echo over TCP and UDP, and the chat room,
in-process and through ``wirehub run examples.chat:app``."""

from __future__ import annotations

import asyncio
import importlib.util
import re
import socket
from pathlib import Path

import pytest

from wirehub import App

from .helpers import WAIT, ServerProcess, addr, free_port, serving, wait_for

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"

WELCOME = "* welcome to wirehub chat! what is your name?"
ASK = "* what is your name?"
TCP_CLOSE_WAIT = 8  # tcp_info.tcpi_state
BAD_NAME = "error: a name is 1 to 32 printable characters without spaces"
COMMANDS = "(commands: /who, /me ACTION, /quit)"


def load_example(name: str):
    """Import examples/<name>.py by path (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"wirehub_example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------- echo


def test_echo_example_is_the_documented_app():
    echo = load_example("echo")
    assert isinstance(echo.app, App)
    assert echo.app.framing.name == "line"
    assert "wirehub run examples.echo:app" in echo.__doc__


async def test_echo_example_over_tcp():
    echo = load_example("echo")
    async with serving(echo.app, tcp="127.0.0.1:0") as server:
        reader, writer = await asyncio.open_connection(*addr(server))
        try:
            writer.write(b"hello\r\nwire")
            writer.write(b"hub\n")
            assert await asyncio.wait_for(reader.readline(), WAIT) == b"hello\n"
            assert await asyncio.wait_for(reader.readline(), WAIT) == b"wirehub\n"
        finally:
            writer.close()


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr) -> None:
        self.received.put_nowait(data)


async def test_echo_example_over_udp():
    echo = load_example("echo")
    async with serving(echo.app, udp="127.0.0.1:0") as server:
        loop = asyncio.get_running_loop()
        transport, client = await loop.create_datagram_endpoint(_Datagrams, remote_addr=addr(server, "udp"))
        try:
            transport.sendto(b"ping\n")
            assert await asyncio.wait_for(client.received.get(), WAIT) == b"ping\n"
            transport.sendto(b"no newline")  # one datagram is one frame either way
            assert await asyncio.wait_for(client.received.get(), WAIT) == b"no newline\n"
        finally:
            transport.close()


# ---------------------------------------------------------------------------- chat


class ChatClient:
    """One ``nc``-like user: write lines, read lines, each read bounded by WAIT."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, server) -> ChatClient:
        client = cls(*await asyncio.open_connection(*addr(server)))
        assert await client.line() == WELCOME
        return client

    @classmethod
    async def named(cls, server, name: str) -> ChatClient:
        client = await cls.connect(server)
        assert (await client.ask(name)).startswith(f"* hello, {name}! ")
        return client

    def say(self, text: str | bytes) -> None:
        data = text if isinstance(text, bytes) else text.encode()
        self.writer.write(data + b"\n")

    async def line(self) -> str:
        data = await asyncio.wait_for(self.reader.readline(), WAIT)
        assert data.endswith(b"\n"), f"connection ended; got {data!r}"
        return data[:-1].decode()

    async def ask(self, text: str | bytes) -> str:
        self.say(text)
        return await self.line()

    async def who(self) -> str:
        """``/who``. As the server answers in order, this is also the proof that nothing
        else (an echo of our own line, an announcement) was sent to us before it."""
        reply = await self.ask("/who")
        assert reply.startswith("* here: "), reply
        return reply

    async def eof(self) -> None:
        assert await asyncio.wait_for(self.reader.read(), WAIT) == b""

    def close(self) -> None:
        self.writer.close()


async def leave(server, *clients: ChatClient) -> None:
    """Hang up, then wait until the server has seen every client go, so that leaving
    ``serving`` has nothing left to drain."""
    for client in clients:
        client.close()
    await wait_for(lambda: not server.connections(), what="every client to be gone")


@pytest.fixture
def chat():
    """A fresh ChatApp per test (the room lives on the app)."""
    module = load_example("chat")
    assert isinstance(module.app, module.ChatApp)
    return module.ChatApp()


async def test_chat_names_are_validated_and_unique(chat):
    async with serving(chat, tcp="127.0.0.1:0") as server:
        alice = await ChatClient.connect(server)
        bob = await ChatClient.connect(server)
        try:
            alice.say("")  # an empty line is no frame: no answer
            for bad in ("two words", "x" * 33, "tab\there", b"esc\x1b[31m", "   "):
                assert await alice.ask(bad) == BAD_NAME, bad
                assert await alice.line() == ASK
            assert await alice.ask("  alice ") == f"* hello, alice! nobody else is here yet {COMMANDS}"

            for taken in ("alice", "ALICE"):
                assert await bob.ask(taken) == f"error: the name {taken} is taken"
                assert await bob.line() == ASK
            name32 = "b" * 31 + "ö"  # 32 characters, 33 bytes: the limit is in characters
            assert await bob.ask(name32) == f"* hello, {name32}! also here: alice {COMMANDS}"
            assert await alice.line() == f"* {name32} joined"
            assert await alice.who() == f"* here: alice, {name32}"
        finally:
            await leave(server, alice, bob)


async def test_chat_broadcasts_to_everyone_else(chat):
    async with serving(chat, tcp="127.0.0.1:0") as server:
        alice = await ChatClient.named(server, "alice")
        bob = await ChatClient.connect(server)
        assert await bob.ask("bob") == f"* hello, bob! also here: alice {COMMANDS}"
        assert await alice.line() == "* bob joined"
        carol = await ChatClient.connect(server)
        assert await carol.ask("carol") == f"* hello, carol! also here: alice, bob {COMMANDS}"
        assert [await alice.line(), await bob.line()] == ["* carol joined"] * 2
        try:
            alice.say("hello, room")
            assert await bob.line() == "<alice> hello, room"
            assert await carol.line() == "<alice> hello, room"
            assert await alice.who() == "* here: alice, bob, carol"  # alice got no echo

            carol.say("/me waves")
            assert await alice.line() == "* carol waves"
            assert await bob.line() == "* carol waves"
            assert await carol.who() == "* here: alice, bob, carol"

            # several lines in one write arrive in order, to each of the others
            bob.writer.write(b"one\ntwo\r\nthree\n")
            for who in (alice, carol):
                assert [await who.line() for _ in range(3)] == ["<bob> one", "<bob> two", "<bob> three"]

            # control characters never reach another terminal; blank messages are dropped
            alice.say(b"\x1b[2Jclear\tscreen\x07")
            alice.say(b"\x1b")
            assert await bob.line() == "<alice> [2Jclearscreen"
            assert await bob.who() == "* here: alice, bob, carol"

            assert await alice.ask("/me") == "error: usage: /me ACTION"
            assert await alice.ask("/nick al") == "error: unknown command /nick; try /who, /me ACTION, /quit"
            assert await bob.who() == "* here: alice, bob, carol"  # nothing leaked to bob
        finally:
            await leave(server, alice, bob, carol)


async def test_chat_leaves_are_announced_and_free_the_name(chat):
    async with serving(chat, tcp="127.0.0.1:0") as server:
        alice = await ChatClient.named(server, "alice")
        bob = await ChatClient.named(server, "bob")
        assert await alice.line() == "* bob joined"
        carol = await ChatClient.named(server, "carol")
        assert [await alice.line(), await bob.line()] == ["* carol joined"] * 2
        newcomer = None
        try:
            bob.close()  # the peer leaves
            assert await alice.line() == "* bob left"
            assert await carol.line() == "* bob left"

            newcomer = await ChatClient.connect(server)
            assert await newcomer.ask("Bob") == f"* hello, Bob! also here: alice, carol {COMMANDS}"
            assert await alice.line() == "* Bob joined"
            assert await carol.line() == "* Bob joined"

            assert await carol.ask("/quit") == "* bye"
            await carol.eof()
            # announced at once, not when carol has finished hanging up
            assert await alice.line() == "* carol left"
            assert await newcomer.line() == "* carol left"
            carol.close()

            # someone who never gave a name leaves without an announcement
            anonymous = await ChatClient.connect(server)
            anonymous.close()
            await wait_for(lambda: len(server.connections()) == 2, what="the anonymous client to be gone")
            assert await alice.who() == "* here: alice, Bob"
            assert chat.members.keys() == {"alice", "bob"}  # casefolded
        finally:
            await leave(server, *(c for c in (alice, carol, newcomer) if c is not None))
        assert chat.members == {}


async def test_chat_long_lines_are_refused_and_shutdown_says_goodbye(chat):
    async with serving(chat, tcp="127.0.0.1:0", max_frame="64") as server:
        alice = await ChatClient.named(server, "alice")
        bob = await ChatClient.named(server, "bob")
        assert await alice.line() == "* bob joined"
        alice.say("y" * 100)
        assert await alice.line() == "error: line of 100 bytes exceeds max_frame 64; not sent"
        alice.say("still here")
        assert await bob.line() == "<alice> still here"

        drain = asyncio.ensure_future(server.shutdown())  # what SIGTERM does
        for client in (alice, bob):
            assert await client.line() == "* the server is shutting down, bye"
            await client.eof()
            client.close()
        await asyncio.wait_for(drain, WAIT)
        assert not server.connections()


async def test_closing_a_client_that_just_hung_up(chat):
    """The server closes a connection (drain, idle timeout, kick) with a last word just as
    the peer hangs up: the close must not raise, and the room carries on. (On asyncio's
    loop, write_eof() raised ENOTCONN here, which aborted a whole drain: fixed in 51c7952.)"""
    loop = asyncio.get_running_loop()
    async with serving(chat, tcp="127.0.0.1:0") as server:
        bob = await ChatClient.named(server, "bob")
        gone = socket.socket()
        gone.setblocking(False)
        try:
            await loop.sock_connect(gone, addr(server))
            assert await asyncio.wait_for(loop.sock_recv(gone, 4096), WAIT) == (WELCOME + "\n").encode()
            [conn] = [c for c in server.connections() if c.state["name"] is None]
        finally:
            gone.close()  # a FIN (nothing unread), which the server has not read yet
        # Wait, without giving the loop a turn, until the FIN has arrived (CLOSE_WAIT).
        server_sock = conn._transport.get_extra_info("socket")
        deadline = loop.time() + WAIT
        while server_sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] != TCP_CLOSE_WAIT:
            assert loop.time() < deadline, "the FIN never arrived"
        try:
            conn.close("kicked")  # the last word ("* kicked") meets a closed socket
            await wait_for(lambda: conn not in server.connections(), what="the hung-up connection to be gone")
            assert conn.close_reason == "kicked"
            assert await bob.who() == "* here: bob"
        finally:
            await leave(server, bob)


# ---------------------------------------------------------------------------- as documented


class LineSocket:
    """A blocking client, like ``nc``: every read bounded by the socket timeout."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        self.file = self.sock.makefile("rb")

    def say(self, text: str) -> None:
        self.sock.sendall(text.encode() + b"\n")

    def line(self) -> str:
        return self.file.readline().decode()

    def close(self) -> None:
        self.file.close()  # the socket's fd stays open while its makefile() is
        self.sock.close()


def test_chat_served_by_wirehub_run(tmp_path):
    port = free_port()
    server = ServerProcess(
        "run", "examples.chat:app", "--tcp", f"127.0.0.1:{port}", "--ws", "off", "--udp", "off",
        cwd=str(REPO),
    ).start(tmp_path)
    clients: list[LineSocket] = []
    try:
        server.wait_log(f"listening transport=tcp address=127.0.0.1:{port}")
        alice, bob = LineSocket(port), LineSocket(port)
        clients += [alice, bob]
        assert alice.line() == bob.line() == WELCOME + "\n"
        alice.say("alice")
        assert alice.line() == f"* hello, alice! nobody else is here yet {COMMANDS}\n"
        bob.say("bob")
        assert bob.line() == f"* hello, bob! also here: alice {COMMANDS}\n"
        assert alice.line() == "* bob joined\n"
        alice.say("hi bob, ça va ?")
        assert bob.line() == "<alice> hi bob, ça va ?\n"
        bob.say("/me nods")
        assert alice.line() == "* bob nods\n"
        bob.say("/who")
        assert bob.line() == "* here: alice, bob\n"

        server.proc.terminate()  # SIGTERM: drain
        for client in (alice, bob):
            assert client.line() == "* the server is shutting down, bye\n"
            assert client.line() == ""  # then the server's FIN
            client.close()  # the server waits for ours (up to --close-timeout)
        assert server.proc.wait(WAIT) == 0, server.log  # not stop(): a 2nd SIGTERM forces
        assert "draining" in server.log and "stopped" in server.log
    finally:
        for client in clients:
            client.close()
        server.stop()


@pytest.mark.one_loop
async def test_hooks_example_from_the_readme(tmp_path):
    """examples/hooks_app.py, served as the README says: a chat.* message gains its sender's
    name, a bad one is refused with the app's code, whoami answers."""
    from .helpers import LineClient

    readme = (EXAMPLES.parent / "README.md").read_text()
    code = (EXAMPLES / "hooks_app.py").read_text()
    one_blank = lambda text: re.sub(r"\n{3,}", "\n\n", text)  # noqa: E731  (PEP 8's two blank lines in the file)
    assert one_blank(code[code.index("from wirehub.hub import"):].strip()) in one_blank(readme)
    port = free_port()
    server = ServerProcess("serve", "--tcp", f"127.0.0.1:{port}", "--ws", "off", "--udp", "off", "--admin", "off",
                           "--app", str(EXAMPLES / "hooks_app.py") + ":hub").start(tmp_path)
    try:
        server.wait_port(port)
        c = await LineClient.open(port)
        await c.request({"op": "hello", "name": "ann"}, "welcome")
        await c.request({"op": "join", "room": "chat.lobby"}, "joined")
        c.send({"op": "pub", "room": "chat.lobby", "data": {"text": "hi"}})
        assert (await c.until("msg", room="chat.lobby"))["data"] == {"text": "hi", "by": "ann"}
        refused = await c.request({"op": "pub", "room": "chat.lobby", "data": "just text"}, "error")
        assert refused["code"] == "app.bad_message"
        me = await c.request({"op": "rpc", "method": "whoami", "data": None}, "result")
        assert me["data"]["rooms"] == ["chat.lobby"]
        c.close()
    finally:
        assert server.stop() == 0, server.log
