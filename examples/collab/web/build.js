// Bundles src/main.js (CodeMirror 6, Yjs, y-codemirror.next, our provider and the hub's JS
// client from clients/js/src) into dist/collab.js, one ES module the page loads.
import { build } from "esbuild";
import { fileURLToPath } from "node:url";

const here = fileURLToPath(new URL(".", import.meta.url));
const result = await build({
  entryPoints: [here + "src/main.js"],
  outfile: here + "dist/collab.js",
  bundle: true,
  minify: true,
  sourcemap: true,
  format: "esm",
  target: "es2022",
  external: ["ws"], // the hub client's Node fallback: a browser has WebSocket
  legalComments: "linked",
  metafile: true,
});
const bytes = Object.values(result.metafile.outputs).find((o) => o.entryPoint)?.bytes;
console.log(`dist/collab.js: ${bytes} bytes`);
