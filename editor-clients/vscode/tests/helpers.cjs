// Runs the extension's pure helpers (out/server.js, no VS Code needed) on the cases named in argv[2]
// (a JSON file) and prints their results as JSON; tests/test_vscode_client.py asserts on them.
const fs = require('fs');
const path = require('path');
const helpers = require(path.join(__dirname, '..', 'out', 'server.js'));

const cases = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const outcome = (fn) => {
  try {
    return { ok: fn() };
  } catch (error) {
    return { error: String(error.message ?? error) };
  }
};
const results = {
  split: cases.split.map((line) => outcome(() => helpers.splitCommandLine(line))),
  resolve: cases.resolve.map(([configured, root, folders]) => outcome(() => helpers.resolveServerCommand(configured, root, folders))),
  settings: cases.settings.map(([keys, values]) => helpers.serverSettings(keys, (key) => values[key])),
  status: cases.status.map((reply) => helpers.describeStatus(reply)),
};
process.stdout.write(JSON.stringify(results));
