#!/usr/bin/env bash
# Rebuild viewer.min.js, the report's 3D viewer library: the parts of three.js 0.187.0 that
# viewer_entry.js names, and its OrbitControls, bundled by esbuild into one minified IIFE that
# sets the global THREE. A classic <script src> loads it from file:// (ES-module imports are
# blocked there). Versions are pinned by package.json and package-lock.json (npm ci); the
# build runs in a temporary folder, so no node_modules is left in the source tree.
#   bash src/ofer/report/assets/build_viewer.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp "$here/package.json" "$here/package-lock.json" "$here/viewer_entry.js" "$work/"
cd "$work"
npm ci --no-audit --no-fund --loglevel=error
version=$(node -p 'JSON.parse(require("fs").readFileSync("node_modules/three/package.json")).version')
banner="/*! three.js ${version} (https://threejs.org) and its OrbitControls, bundled for the OFER report by
src/ofer/report/assets/build_viewer.sh (esbuild --bundle --minify --format=iife --global-name=THREE).

$(cat node_modules/three/LICENSE)
*/"
npx esbuild viewer_entry.js --bundle --minify --format=iife --global-name=THREE --target=es2020 \
  --legal-comments=none --banner:js="$banner" --outfile="$here/viewer.min.js" --log-level=warning
echo "wrote $here/viewer.min.js ($(wc -c < "$here/viewer.min.js") bytes)"
