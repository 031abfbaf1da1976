// Builds dist/wirehub.min.js (one minified ES module) with esbuild and checks the size budget:
// at most 8 KiB minified and gzipped. `node scripts/build.js` prints the sizes; exits 1 over budget.
import { build } from "esbuild";
import { readFileSync } from "node:fs";
import { gzipSync } from "node:zlib";
import { fileURLToPath } from "node:url";

export const BUDGET = 8 * 1024;
const root = fileURLToPath(new URL("..", import.meta.url));

/** Builds the minified file; returns {bytes, gzipped} (sizes in bytes). */
export async function buildMin() {
  await build({
    entryPoints: [root + "src/wirehub.js"],
    outfile: root + "dist/wirehub.min.js",
    bundle: true,
    minify: true,
    format: "esm",
    target: "es2022",
    external: ["ws"],
    legalComments: "none",
  });
  const code = readFileSync(root + "dist/wirehub.min.js");
  return { bytes: code.length, gzipped: gzipSync(code, { level: 9 }).length };
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const { bytes, gzipped } = await buildMin();
  console.log(`dist/wirehub.min.js: ${bytes} bytes minified, ${gzipped} bytes gzipped (budget ${BUDGET})`);
  if (gzipped > BUDGET) process.exit(1);
}
