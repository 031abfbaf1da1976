// The TypeScript declarations compile, and a typed program that uses them does too.
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { fileURLToPath } from "node:url";

const root = fileURLToPath(new URL("..", import.meta.url));

test("src/wirehub.d.ts type-checks a program written against it", async () => {
  const tsc = root + "node_modules/typescript/bin/tsc";
  const result = await new Promise((resolve) =>
    execFile(process.execPath, [tsc, "-p", "test/tsconfig.json"], { cwd: root, timeout: 60000 }, (err, stdout, stderr) =>
      resolve({ code: err ? err.code ?? 1 : 0, out: stdout + stderr })));
  assert.equal(result.code, 0, result.out);
});
