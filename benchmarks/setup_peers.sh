#!/usr/bin/env bash
# Sets up the peers that benchmarks/interpreters.py measures against, from package registries only.
# Idempotent; everything goes under benchmarks/.peers/ (git-ignored). Re-run freely.
#
#   bash benchmarks/setup_peers.sh
#
# dspy's PythonInterpreter needs Deno 2.x, Pyodide (npm:pyodide@<pinned>, which Deno fetches from the npm
# registry) and `readLines` from https://deno.land/std, which machines without internet cannot reach.
# We do NOT edit dspy's runner.js: an import map (benchmark-only) points that one deno.land URL at a local
# line reader with the same behaviour. Everything else is dspy's own runner and protocol.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PEERS="$HERE/.peers"
PYTHON="${PYTHON:-python}"
DENO_NPM_VERSION="${DENO_NPM_VERSION:-2}"   # npm `deno` ships the binary as @deno/linux-x64-glibc etc.
PEERS_DENO="${PEERS_DENO:-auto}"            # auto: PyPI `deno` if importable, else npm; or force: pypi | npm
mkdir -p "$PEERS/bin" "$PEERS/deno_dir"

# 1. Deno. dspy's own choice first: the PyPI `deno` package (the `dspy[deno]` extra). Otherwise the npm `deno`
#    package, installed into benchmarks/.peers/node_modules.
deno_bin=""
if [ "$PEERS_DENO" != npm ]; then
  deno_bin="$("$PYTHON" -c 'from deno import find_deno_bin; print(find_deno_bin())' 2>/dev/null || true)"
  [ -n "$deno_bin" ] || [ "$PEERS_DENO" = auto ] || { echo "PEERS_DENO=pypi but the deno package is missing" >&2; exit 1; }
fi
if [ -z "$deno_bin" ] || [ ! -x "$deno_bin" ]; then
  if [ ! -x "$PEERS/node_modules/.bin/deno" ]; then
    echo "installing deno@$DENO_NPM_VERSION from the npm registry into $PEERS ..."
    npm install --prefix "$PEERS" --no-save --no-audit --no-fund "deno@$DENO_NPM_VERSION" >/dev/null
  fi
  deno_bin="$(ls "$PEERS"/node_modules/@deno/*/deno 2>/dev/null | head -n1)"
  [ -x "$deno_bin" ] || { echo "no deno binary found after npm install" >&2; exit 1; }
fi
ln -sfn "$deno_bin" "$PEERS/bin/deno"
echo "deno: $deno_bin ($("$PEERS/bin/deno" --version | head -n1))"

# 2. The stand-in for https://deno.land/std@<v>/io/mod.ts (dspy's runner.js imports only readLines from it),
#    and an import map from that exact URL (read from dspy's runner.js) to it.
RUNNER="$("$PYTHON" -c 'import dspy.primitives.python_interpreter as p, os; print(os.path.join(os.path.dirname(p.__file__), "runner.js"))')"
STD_URL="$(grep -oE 'https://deno\.land/std@[^"]+/io/mod\.ts' "$RUNNER" | head -n1 || true)"
[ -n "$STD_URL" ] || { echo "dspy's runner.js no longer imports readLines from deno.land: nothing to map" >&2; }
cat > "$PEERS/readlines.js" <<'EOF'
// BENCHMARK-ONLY stand-in for deno.land/std io/mod.ts `readLines`: yields the lines of a Deno.Reader,
// without the "\n" and a trailing "\r", as std@0.186.0 does.
export async function* readLines(reader) {
  const decoder = new TextDecoder();
  const chunk = new Uint8Array(1 << 16);
  let buffer = "";
  while (true) {
    const n = await reader.read(chunk);
    if (n === null) { if (buffer) yield buffer; return; }
    buffer += decoder.decode(chunk.subarray(0, n), { stream: true });
    let start = 0, at;
    while ((at = buffer.indexOf("\n", start)) >= 0) {
      yield buffer.slice(start, at > start && buffer[at - 1] === "\r" ? at - 1 : at);
      start = at + 1;
    }
    buffer = buffer.slice(start);
  }
}
EOF
printf '{"imports": {"%s": "./readlines.js"}}\n' "${STD_URL:-https://deno.land/std/io/mod.ts}" > "$PEERS/import_map.json"

# 3. Pyodide from the npm registry into our own DENO_DIR, once, outside any timing (`deno cache` resolves the
#    runner's whole module graph: npm:pyodide via the registry, the std URL via the import map).
export DENO_DIR="$PEERS/deno_dir" DENO_NO_PACKAGE_JSON=1
"$PEERS/bin/deno" cache --no-config --no-lock --node-modules-dir=false \
  --import-map="$PEERS/import_map.json" "$RUNNER"
echo "pyodide: $(find "$DENO_DIR/npm/registry.npmjs.org/pyodide" -mindepth 1 -maxdepth 1 -type d -printf '%f ')"
echo "runner: $RUNNER (unmodified; $STD_URL -> $PEERS/readlines.js via import map)"
echo "ok: benchmarks/.peers is ready"
