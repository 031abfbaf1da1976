// The editor page: CodeMirror 6 bound to a Y.Text (y-codemirror.next), synced through the hub
// by our HubProvider. Query: ?doc=NAME&name=YOUR_NAME&ws=ws://HOST:PORT/ (the server adds ws).
import * as Y from "yjs";
import { Awareness } from "y-protocols/awareness";
import { EditorView, basicSetup } from "codemirror";
import { EditorState } from "@codemirror/state";
import { yCollab } from "y-codemirror.next";
import { HubProvider } from "./provider.js";

const COLOURS = ["#d9480f", "#2b8a3e", "#1971c2", "#9c36b5", "#e67700", "#0c8599", "#c2255c", "#5f3dc4"];
const ANIMALS = ["otter", "heron", "lynx", "marten", "ibex", "puffin", "gecko", "tapir"];

const params = new URLSearchParams(location.search);
const docName = params.get("doc") || "welcome";
const name = (params.get("name") || ANIMALS[Math.floor(Math.random() * ANIMALS.length)]).slice(0, 64);
const colour = COLOURS[[...name].reduce((h, c) => (h * 31 + c.charCodeAt(0)) >>> 0, 7) % COLOURS.length];
const ws = params.get("ws") || `ws://${location.hostname}:7401/`;

const ydoc = new Y.Doc();
const ytext = ydoc.getText("text"); // the server reads the same field (DocStore.text)
const awareness = new Awareness(ydoc);
awareness.setLocalStateField("user", { name, color: colour, colorLight: colour + "33" });
const provider = new HubProvider(ws, docName, ydoc, { awareness, hub: { name } });

const view = new EditorView({
  state: EditorState.create({
    doc: ytext.toString(),
    extensions: [basicSetup, EditorView.lineWrapping, yCollab(ytext, awareness, { undoManager: new Y.UndoManager(ytext) })],
  }),
  parent: document.getElementById("editor"),
});

const $ = (id) => document.getElementById(id);
$("doc").textContent = docName;
document.title = `${docName} · wirehub collab`;

function showStatus() {
  const state = provider.synced ? "synced" : provider.status;
  $("status").textContent = state;
  $("status").className = state;
  $("offline").textContent = provider.connected ? "Go offline" : "Go online";
}
provider.on("status", showStatus);
provider.on("synced", showStatus);
provider.on("error", (e) => {
  $("error").textContent = e.message;
  console.warn("collab:", e);
});
$("offline").onclick = () => (provider.connected ? provider.disconnect() : provider.connect(), showStatus());

function showPeople() {
  const people = $("people");
  people.replaceChildren();
  for (const [id, state] of awareness.getStates()) {
    if (!state.user) continue;
    const chip = document.createElement("span");
    chip.className = "person";
    chip.style.background = state.user.color;
    chip.textContent = state.user.name + (id === ydoc.clientID ? " (you)" : "");
    people.append(chip);
  }
}
awareness.on("change", showPeople);
// leaving the page (or entering the back-forward cache) closes the socket: the others drop our cursor
addEventListener("pagehide", () => provider.disconnect());
addEventListener("pageshow", (e) => e.persisted && provider.connect());
showPeople();
showStatus();

window.collab = { Y, ydoc, ytext, awareness, provider, view }; // for the console, and the tests
