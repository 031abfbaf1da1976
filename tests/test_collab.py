"""examples/collab: the collaborative editor (CodeMirror 6 + Yjs in real headless Chromium,
our provider through the hub, the server's copy in pycrdt, stored in SQLite or PostgreSQL).

The browser tests need the page's bundle: ``cd examples/collab/web && npm ci && npm run
build`` (scripts/test does it)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import uuid

import aiohttp
import pytest
from pycrdt import Doc, Text, get_state

import wirehub.client
from wirehub.client import HubError
from wirehub.config import load
from wirehub.hub import Hub

from . import browser
from .helpers import WAIT, ServerProcess, free_port, reachable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.join(ROOT, "examples", "collab")
BUNDLE = os.path.join(HERE, "web", "dist", "collab.js")
TOML = os.path.join(HERE, "wirehub.toml")
POSTGRES = os.environ.get("COLLAB_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def _load_example():
    spec = importlib.util.spec_from_file_location("collab_example", os.path.join(HERE, "collab.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


collab = _load_example()
DocStore = sys.modules["docstore"].DocStore  # imported by collab.py from beside it

needs_browser = pytest.mark.skipif(not browser.available(), reason="chromium is not installed (scripts/test installs it)")
postgres_up = reachable(5432)


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        yield str(tmp_path / "docs.sqlite3")
        return
    if not postgres_up:
        pytest.skip("PostgreSQL is not running on 127.0.0.1:5432")
    yield POSTGRES
    import psycopg

    with psycopg.connect(POSTGRES) as db:  # the shared database keeps no test's documents
        db.execute("DELETE FROM collab_updates WHERE doc = ANY(%s)", (CREATED,))
        db.execute("DELETE FROM collab_docs WHERE name = ANY(%s)", (CREATED,))
    CREATED.clear()


@pytest.fixture
def bundle():
    if not os.path.exists(BUNDLE):
        pytest.fail("the editor's bundle is missing: cd examples/collab/web && npm ci && npm run build")


CREATED: list[str] = []  # the documents tests made, for the PostgreSQL clean-up


def doc_name() -> str:
    CREATED.append("t-" + uuid.uuid4().hex[:10])  # a fresh document in a shared PostgreSQL
    return CREATED[-1]


def yjs_update(text: str, doc: Doc | None = None) -> tuple[Doc, bytes]:
    """A Yjs update (v1, as the browser's yjs encodes it) appending ``text`` to Y.Text "text"."""
    doc = doc or Doc()
    before = doc.get_state()
    ytext = doc.get("text", type=Text)
    ytext += text
    return doc, doc.get_update(before)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@contextlib.asynccontextmanager
async def editor_hub(store: DocStore, broker=None, **options):
    """The hub with the editor's hooks (settings from wirehub.toml, ports of the OS's choosing)
    and the page server; yields (hub, page URL)."""
    flags = {"ws": "127.0.0.1:0", "tcp": "127.0.0.1:0", "udp": "off", "admin": "off"} | options
    async with Hub(load(file=TOML, env={}, flags=flags), broker=broker, hooks=collab.make_hooks(store)) as hub:
        runner, page = await collab.start_page("127.0.0.1:0", f"ws://{hub.addresses['ws'][0]}/")
        try:
            yield hub, f"http://{page}/"
        finally:
            await runner.cleanup()


@contextlib.asynccontextmanager
async def chromium():
    chrome = await browser.Browser().start()
    try:
        yield chrome
    finally:
        await chrome.close()


async def open_editor(chrome, url: str, doc: str, name: str):
    """A page on document ``doc`` (the page server adds the hub's address), once synced."""
    page = await chrome.open(f"{url}?doc={doc}&name={name}")
    await page.wait_until("window.collab && collab.provider.synced", f"{name}'s page synced with the server")
    return page


async def type_into(page, text: str) -> None:
    """Real typing: the editor focused, the cursor at the end, then the text as keyboard input."""
    await page.eval("collab.view.focus(); collab.view.dispatch({selection: {anchor: collab.view.state.doc.length}}); true")
    await page.send("Input.insertText", {"text": text})


async def editor_text(page) -> str:
    return await page.eval("collab.view.state.doc.toString()")


async def all_sent(page, what: str) -> None:
    """Every publication of the page acknowledged (so stored by the server's hook)."""
    await page.wait_until("collab.provider.synced && collab.provider.pending === 0 && !collab.provider.unsent", what)


async def converged(pages, *parts: str) -> str:
    """Wait until every page's editor shows the same text, holding each of ``parts``."""
    has_all = " && ".join(f"collab.view.state.doc.toString().includes({json.dumps(p)})" for p in parts)
    for page in pages:
        await page.wait_until(has_all, f"every edit ({', '.join(parts)}) in the page")
    texts = {await editor_text(page) for page in pages}
    assert len(texts) == 1, texts
    return texts.pop()


# ---------------------------------------------------------------------- in the browser


@needs_browser
async def test_typing_in_three_pages_converges_with_cursors_and_names(tmp_path, bundle):
    store = DocStore(str(tmp_path / "docs.sqlite3"))
    doc = doc_name()
    async with editor_hub(store) as (hub, url), chromium() as chrome:
        pages = [await open_editor(chrome, url, doc, name) for name in ("alice", "bob", "carol")]
        edits = [f"{name} was here. " for name in ("alice", "bob", "carol")]
        for page, edit in zip(pages, edits):  # one after the other, without waiting for anything
            await type_into(page, edit)
        text = await converged(pages, *edits)
        assert sorted(text.split(". ")) == sorted(["", *(e[:-2] for e in edits)])  # each once
        assert await pages[0].eval("collab.ytext.toString()") == text  # the editor is the Y.Text
        for page in pages:
            await all_sent(page, "every edit acknowledged")
        assert store.text(doc) == text  # the server's copy

        # awareness: every page knows the three users, with their names and colours
        names = "[...collab.awareness.getStates().values()].map(s => s.user && s.user.name).sort().join()"
        for page in pages:
            await page.wait_until(f"{names} === 'alice,bob,carol'", "three users in awareness")
        people = await pages[0].eval("document.getElementById('people').innerText")
        assert "bob" in people and "carol" in people and "alice (you)" in people
        # carol's cursor, drawn in the others' editors in her colour
        await pages[0].wait_until("document.querySelectorAll('.cm-ySelectionCaret').length === 2", "two remote carets")

        # carol closes her tab: the others drop her cursor (her doc:* leave)
        target = (await pages[2].send("Target.getTargetInfo"))["targetInfo"]["targetId"]
        await chrome.send("Target.closeTarget", {"targetId": target})
        for page in pages[:2]:
            await page.wait_until(f"{names} === 'alice,bob'", "carol's cursor gone")
    store.close()


@needs_browser
async def test_a_page_offline_keeps_typing_and_converges_when_back(tmp_path, bundle):
    store = DocStore(str(tmp_path / "docs.sqlite3"))
    doc = doc_name()
    async with editor_hub(store) as (hub, url), chromium() as chrome:
        alice, bob = [await open_editor(chrome, url, doc, name) for name in ("alice", "bob")]
        await type_into(alice, "shared start. ")
        await converged([alice, bob], "shared start. ")

        await bob.eval("document.getElementById('offline').click(); true")  # the page's Go offline button
        await bob.wait_until("collab.provider.hub.state === 'disconnected'", "bob offline")
        await type_into(bob, "bob offline 1. ")
        await type_into(alice, "alice while bob is away. ")
        await type_into(bob, "bob offline 2. ")
        await all_sent(alice, "alice's edits stored")
        assert "bob offline" not in await editor_text(alice)
        assert "alice while" not in await editor_text(bob)
        assert await bob.eval("collab.provider.unsent") is True  # kept for the sync when back

        await bob.eval("document.getElementById('offline').click(); true")  # Go online
        text = await converged([alice, bob], "shared start. ", "bob offline 1. ", "bob offline 2. ", "alice while bob is away. ")
        await all_sent(bob, "bob's offline edits sent")
        assert store.text(doc) == text
    store.close()


@needs_browser
async def test_the_network_drops_and_the_page_reconnects_by_itself(tmp_path, bundle):
    """Bob's network goes (Chromium offline, his socket cut without a close, as a dead link
    does); he types on while his client retries with backoff. The network comes back: his page
    reconnects, re-joins, syncs, and sends what he typed meanwhile."""
    store = DocStore(str(tmp_path / "docs.sqlite3"))
    doc = doc_name()
    async with editor_hub(store) as (hub, url), chromium() as chrome:
        alice, bob = [await open_editor(chrome, url, doc, name) for name in ("alice", "bob")]
        first = await bob.eval("collab.provider.hub.client")
        conditions = {"latency": 0, "downloadThroughput": -1, "uploadThroughput": -1}
        await bob.send("Network.enable")
        await bob.send("Network.emulateNetworkConditions", {"offline": True, **conditions})  # no new connection gets through
        hub.server.registry.get(first).abort()  # and the open one dies (no close frame, no bye)
        await bob.wait_until("collab.provider.hub.state === 'connecting' && !collab.provider.synced", "bob's page noticing")
        await type_into(bob, "typed with no network. ")
        await type_into(alice, "alice meanwhile. ")
        await all_sent(alice, "alice's edit stored")
        assert "typed with no network" not in await editor_text(alice)
        assert "alice meanwhile" not in await editor_text(bob)
        assert await bob.eval("collab.provider.hub.state") == "connecting"  # still retrying
        await bob.send("Network.emulateNetworkConditions", {"offline": False, **conditions})
        await converged([alice, bob], "typed with no network. ", "alice meanwhile. ")
        assert await bob.eval("collab.provider.hub.client") != first  # a new session
        await all_sent(bob, "bob's edit stored")
        assert "typed with no network. " in store.text(doc)
    store.close()


@needs_browser
async def test_a_page_opened_after_the_history_window_gets_the_whole_document(tmp_path, bundle):
    store = DocStore(str(tmp_path / "docs.sqlite3"))
    doc = doc_name()
    # the room keeps 2 publications; the document is made of 8
    async with editor_hub(store, rooms=["doc:*:history_size=2", "awareness:*:presence=off,history_size=0"]) as (hub, url), chromium() as chrome:
        alice = await open_editor(chrome, url, doc, "alice")
        for n in range(8):
            await type_into(alice, f"line {n}\n")
            await all_sent(alice, f"line {n} stored")
        assert await alice.eval("collab.provider.docRoom.seq") >= 8
        history = await hub.history("doc:" + doc)
        assert len(history) == 2  # the window has passed: the first six are gone from the room

        late = await open_editor(chrome, url, doc, "late")
        expected = "".join(f"line {n}\n" for n in range(8))
        assert await editor_text(late) == expected == await editor_text(alice)
        await type_into(late, "late was here")  # and it edits like the others
        await converged([alice, late], "late was here")
    store.close()


@pytest.mark.one_loop  # the hub runs in subprocesses
@needs_browser
async def test_the_server_restarted_with_its_store_gives_the_document(tmp_path, bundle, store_url):
    doc = doc_name()
    port = free_port()
    env = {"COLLAB_STORE": store_url, "WIREHUB_WS": f"127.0.0.1:{port}", "WIREHUB_ADMIN": "off"}

    def start():  # as the README says, from the repository's root
        server = ServerProcess("serve", "--config", "examples/collab/wirehub.toml", cwd=ROOT, env=env).start(tmp_path)
        server.wait_port(port, timeout=20)
        return server

    server = start()
    runner, page_address = await collab.start_page("127.0.0.1:0", f"ws://127.0.0.1:{port}/")
    url = f"http://{page_address}/"
    try:
        async with chromium() as chrome:
            alice = await open_editor(chrome, url, doc, "alice")
            await type_into(alice, "written before the restart. ")
            await all_sent(alice, "alice's edit stored")
            assert server.stop() == 0
            await alice.wait_until("!collab.provider.synced", "alice's page noticing the server is gone")

            server = start()  # a new process: a new memory broker, no history; the store has the document
            late = await open_editor(chrome, url, doc, "late")
            assert await editor_text(late) == "written before the restart. "
            await alice.wait_until("collab.provider.synced", "alice's page back by itself")
            await type_into(alice, "and after. ")
            await converged([alice, late], "written before the restart. ", "and after. ")
    finally:
        await runner.cleanup()
        server.stop()
    reader = DocStore(store_url)
    assert reader.text(doc) == "written before the restart. and after. "
    reader.close()


@pytest.mark.one_loop  # the runner is a subprocess
async def test_the_runner_serves_the_hub_and_the_page_as_the_readme_says(tmp_path, bundle):
    ws_port, page_port = free_port(), free_port()
    env = dict(os.environ, WIREHUB_WS=f"127.0.0.1:{ws_port}", WIREHUB_ADMIN="off")
    log = open(tmp_path / "runner.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "examples/collab/collab.py", "--page", f"127.0.0.1:{page_port}", "--store", str(tmp_path / "docs.sqlite3")],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    try:
        for port in (ws_port, page_port):
            deadline = asyncio.get_running_loop().time() + 20
            while not reachable(port):
                assert proc.poll() is None, (tmp_path / "runner.log").read_text()
                assert asyncio.get_running_loop().time() < deadline, f"port {port} never opened"
                await asyncio.sleep(0.05)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{page_port}/?doc=readme") as page:  # sent on to ?doc=readme&ws=...
                assert page.status == 200 and page.url.query["ws"] == f"ws://127.0.0.1:{ws_port}/"
                assert '<script type="module" src="/collab.js">' in await page.text()
            async with http.get(f"http://127.0.0.1:{page_port}/collab.js") as script:
                assert script.status == 200 and script.content_type == "text/javascript"
        doc = doc_name()
        async with wirehub.client.connect(f"ws://127.0.0.1:{ws_port}/") as client:
            await client.join("doc:" + doc)
            await client.publish("doc:" + doc, {"update": b64(yjs_update("hi")[1])})
            reply = await client.request({"op": "rpc", "method": "sync", "data": {"doc": doc, "sv": b64(b"\x00")}})
            assert reply["data"]["sv"] != b64(b"\x00")
    finally:
        proc.terminate()
        assert proc.wait(WAIT) == 0, (tmp_path / "runner.log").read_text()
        log.close()
    assert "collab: open http://127.0.0.1:" in (tmp_path / "runner.log").read_text()
    assert DocStore(str(tmp_path / "docs.sqlite3")).text(doc) == "hi"


# ---------------------------------------------------------------------- the protocol, from Python


async def test_updates_that_do_not_decode_are_refused(tmp_path):
    store = DocStore(str(tmp_path / "docs.sqlite3"))
    doc = doc_name()
    async with editor_hub(store) as (hub, url):
        tcp = "tcp://" + hub.addresses["tcp"][0]
        async with wirehub.client.connect(tcp, name="py") as client:
            with pytest.raises(HubError) as refused:
                await client.request({"op": "rpc", "method": "sync", "data": {"doc": doc, "sv": b64(b"\x00")}})
            assert refused.value.code == "not_member"
            with pytest.raises(HubError) as refused:
                await client.join("doc:" + "x" * 101)
            assert refused.value.code == "app.bad_doc_name"
            await client.join("doc:" + doc)
            bad = [
                ({"update": "not base64!"}, "app.bad_update"),
                ({"update": b64(b"garbage!!")}, "app.bad_update"),
                ({"update": b64(b"\x00")}, "app.bad_update"),  # truncated: no delete set
                ({"text": "hello"}, "app.bad_update"),
                ("just a string", "app.bad_update"),
            ]
            for data, code in bad:
                with pytest.raises(HubError) as refused:
                    await client.publish("doc:" + doc, data)
                assert refused.value.code == code, data
                assert "update" in refused.value.message
            for data in ({"awareness": b64(b"\x01\x05")}, {"awareness": "%%"}, {"cursor": 1}):
                with pytest.raises(HubError) as refused:
                    await client.publish("awareness:" + doc, data)
                assert refused.value.code == "app.bad_awareness", data

            # a good update is stored and published; sync answers with the server's copy
            _, update = yjs_update("from python")
            seq = await client.publish("doc:" + doc, {"update": b64(update)})
            assert seq == 1  # the refused ones were never published
            assert store.text(doc) == "from python"
            reply = await client.request({"op": "rpc", "method": "sync", "data": {"doc": doc, "sv": b64(Doc().get_state())}})
            fresh = Doc()
            fresh.apply_update(base64.b64decode(reply["data"]["update"]))
            assert str(fresh.get("text", type=Text)) == "from python"
            # a client that has it all gets nothing more than an empty update
            reply = await client.request({"op": "rpc", "method": "sync", "data": {"doc": doc, "sv": b64(fresh.get_state())}})
            assert base64.b64decode(reply["data"]["update"]) == b"\x00\x00"
            with pytest.raises(HubError) as refused:
                await client.request({"op": "rpc", "method": "sync", "data": {"doc": doc, "sv": b64(b"\xff\xff")}})
            assert refused.value.code == "app.bad_update" and "state vector" in refused.value.message
    store.close()


async def test_a_document_past_its_size_limit_is_refused(tmp_path):
    store = DocStore(str(tmp_path / "docs.sqlite3"), max_doc_bytes=2000)
    doc = doc_name()
    async with editor_hub(store) as (hub, url):
        async with wirehub.client.connect("tcp://" + hub.addresses["tcp"][0]) as client:
            await client.join("doc:" + doc)
            ydoc, update = yjs_update("x" * 1500)
            await client.publish("doc:" + doc, {"update": b64(update)})
            _, update = yjs_update("y" * 1500, ydoc)
            with pytest.raises(HubError) as refused:
                await client.publish("doc:" + doc, {"update": b64(update)})
            assert refused.value.code == "limit" and "MAX_DOC_BYTES" in refused.value.message
    assert store.text(doc) == "x" * 1500
    store.close()


async def test_a_new_document_past_the_stores_limit_is_refused(store_url):
    """Anyone may write to a new document name: the number of documents is bounded (MAX_DOCS)."""
    counter = DocStore(store_url)
    store = DocStore(store_url, max_docs=counter.count() + 2)  # PostgreSQL's is shared: two more
    counter.close()
    first, second, third = doc_name(), doc_name(), doc_name()
    async with editor_hub(store) as (hub, url):
        async with wirehub.client.connect("tcp://" + hub.addresses["tcp"][0]) as client:
            for doc in (first, second, third):
                await client.join("doc:" + doc)
            docs = {}
            for doc in (first, second):
                docs[doc], update = yjs_update(doc)
                await client.publish("doc:" + doc, {"update": b64(update)})
            with pytest.raises(HubError) as refused:
                await client.publish("doc:" + third, {"update": b64(yjs_update("one too many")[1])})
            assert refused.value.code == "limit" and "MAX_DOCS" in refused.value.message
            await client.publish("doc:" + first, {"update": b64(yjs_update(" and more", docs[first])[1])})  # existing ones take updates
    assert (store.text(first), store.text(second), store.text(third)) == (first + " and more", second, "")
    assert store.stats(third) == (0, 0)
    store.close()


@pytest.mark.one_loop
@pytest.mark.skipif(not reachable(6379), reason="no Redis at 127.0.0.1:6379")
async def test_two_nodes_on_redis_share_the_document_through_the_store(store_url):
    """A fleet: two hub nodes on one Redis broker, each with its own connection to the same
    store. What a client publishes on one node is in the sync another gets on the other."""
    from wirehub.hub.broker.redis import RedisBroker

    from .hub.test_broker_redis import URL as REDIS_URL
    from .hub.test_broker_redis import drop_prefix

    prefix = f"collab{uuid.uuid4().hex[:10]}"
    one_store, two_store = DocStore(store_url), DocStore(store_url)
    doc = doc_name()
    try:
        async with editor_hub(one_store, broker=RedisBroker(REDIS_URL, prefix=prefix)) as (one, _), \
                editor_hub(two_store, broker=RedisBroker(REDIS_URL, prefix=prefix)) as (two, _):
            async with wirehub.client.connect("tcp://" + one.addresses["tcp"][0]) as ada, \
                    wirehub.client.connect("tcp://" + two.addresses["tcp"][0]) as bea:
                await ada.join("doc:" + doc)
                ada_doc, update = yjs_update("ada on node one. ")
                await ada.publish("doc:" + doc, {"update": b64(update)})

                await bea.join("doc:" + doc)  # on the other node: sync step 2 from the shared store
                reply = await bea.request({"op": "rpc", "method": "sync", "data": {"doc": doc, "sv": b64(Doc().get_state())}})
                bea_doc = Doc()
                bea_doc.apply_update(base64.b64decode(reply["data"]["update"]))
                assert str(bea_doc.get("text", type=Text)) == "ada on node one. "

                _, update = yjs_update("bea on node two.", bea_doc)
                await bea.publish("doc:" + doc, {"update": b64(update)})
                event = {}
                while not (event.get("op") == "msg" and event["from"] == bea.client_id):
                    event = await asyncio.wait_for(ada.recv(), WAIT)  # her own update and bea's arrival come first
                ada_doc.apply_update(base64.b64decode(event["data"]["update"]))  # live, through Redis
                assert str(ada_doc.get("text", type=Text)) == "ada on node one. bea on node two."
        assert one_store.text(doc) == two_store.text(doc) == "ada on node one. bea on node two."
    finally:
        one_store.close()
        two_store.close()
        await drop_prefix(prefix)


# ---------------------------------------------------------------------- the store


def test_the_store_compacts_and_keeps_every_edit(store_url):
    store = DocStore(store_url, compact_after=10)
    doc = doc_name()
    ydoc = Doc()
    ytext = ydoc.get("text", type=Text)
    for n in range(25):
        before = ydoc.get_state()
        ytext += f"{n},"
        if n % 5 == 4:
            del ytext[0:2]  # deletions: merged away by compaction
        store.append(doc, ydoc.get_update(before))
    size, updates = store.stats(doc)
    assert updates < 10  # merged into one update, then the ones since
    assert store.text(doc) == str(ytext)
    missing, state = store.sync(doc, ydoc.get_state())
    assert state == ydoc.get_state()
    assert get_state(missing) == b"\x00"  # no new structs for a client that has them all (only the delete set)
    store.close()
    reopened = DocStore(store_url)  # another process, or after a restart
    assert reopened.text(doc) == str(ytext)
    reopened.close()
