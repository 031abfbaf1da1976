"""Takes docs/img/collab.png: two editors side by side on one document, each showing the
other's cursor and name, in headless Chromium (CDP Page.captureScreenshot).

    python -m tests.collab_screenshot [docs/img/collab.png]

It needs the page's bundle (cd examples/collab/web && npm ci && npm run build)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile

from .test_collab import DocStore, ROOT, chromium, editor_hub

LINES = {
    "ada": "# Launch checklist\n\n- [x] hub on redis:// behind haproxy\n- [ ] load test: 20k sockets\n",
    "grace": "\nNotes: the document outlives the room's history; a late tab syncs the whole text.",
}


async def main(out: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = DocStore(os.path.join(tmp, "docs.sqlite3"))
        async with editor_hub(store) as (hub, url), chromium() as chrome:
            # a page of the same origin as the editors (so that it may reach into their frames):
            # an editor page of another document, whose editor gives way to the two frames
            page = await chrome.open(f"{url}?doc=frames&name=host")
            await page.wait_until("window.collab?.provider.synced", "the host page")
            await page.eval("collab.provider.destroy(); collab.view.destroy(); true")
            frames = "".join(
                f'<iframe id="{name}" src="{url}?doc=launch&name={name}" '
                'style="width:49%;height:96vh;border:1px solid #bbb;margin:0 0.25%"></iframe>'
                for name in LINES
            )
            await page.eval(f"document.body.style.margin = '8px'; document.body.style.background = '#fff'; document.body.innerHTML = {json.dumps(frames)}; true")
            for name in LINES:
                await page.wait_until(f"document.getElementById('{name}').contentWindow.collab?.provider.synced", f"{name} synced")
            for name, text in LINES.items():
                await page.eval(
                    f"{{ const v = document.getElementById('{name}').contentWindow.collab.view; v.focus();"
                    "v.dispatch({selection: {anchor: v.state.doc.length}}); } true"
                )
                await page.send("Input.insertText", {"text": text})
            # ada selects a word, so that grace's editor shows ada's selection and caret
            await page.eval(
                "{ const v = document.getElementById('ada').contentWindow.collab.view; v.focus();"
                "const at = v.state.doc.toString().indexOf('20k'); v.dispatch({selection: {anchor: at, head: at + 11}}); } true"
            )
            for name in LINES:
                frame = f"document.getElementById('{name}').contentWindow"
                await page.wait_until(f"{frame}.document.querySelectorAll('.cm-ySelectionCaret').length === 1", f"the other's caret in {name}'s editor")
                await page.wait_until(f"{frame}.collab.ytext.toString().includes('late tab')", f"both edits in {name}'s editor")
            await page.screenshot(out)
        store.close()
    print(f"wrote {out}")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "docs", "img", "collab.png")))
