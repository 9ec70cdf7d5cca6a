#!/usr/bin/env bash
# Installs the benchmark's load generators into the git-ignored cache .cache/tools/bin, once.
#
#   loadgen  built from bench/loadgen (Go standard library only, no download): the open-loop generator
#            http_bench.py drives, because it sends a different body and different headers on every
#            request and measures latency from each request's intended send time.
#   oha      from crates.io: a cross-check of the floor app's ceiling with a second, independent
#            generator (static headers only, so it cannot carry distinct idempotency keys).
#
# Set BENCH_SKIP_OHA=1 to skip oha (it compiles from source, a few minutes on a small machine).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
TOOLS="$REPO/.cache/tools"
mkdir -p "$TOOLS/bin"
export PATH="$HOME/.cargo/bin:/usr/local/go/bin:$PATH"

loadgen_src="$REPO/bench/loadgen/main.go"
if [[ ! -x "$TOOLS/bin/loadgen" || "$loadgen_src" -nt "$TOOLS/bin/loadgen" ]]; then
    echo "tools: building loadgen" >&2
    (cd "$REPO/bench/loadgen" && GOFLAGS=-buildvcs=false go build -o "$TOOLS/bin/loadgen" .)
fi

if [[ "${BENCH_SKIP_OHA:-0}" != "1" && ! -x "$TOOLS/bin/oha" ]]; then
    echo "tools: installing oha from crates.io into $TOOLS" >&2
    cargo install oha --locked --root "$TOOLS" --quiet
fi
echo "$TOOLS/bin"
