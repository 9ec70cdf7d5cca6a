#!/usr/bin/env bash
# Installs the benchmark's load generators into the git-ignored cache .cache/tools/bin, once each
# (a generator already there is kept; delete it to rebuild).
#
#   k6   Grafana's load generator, built from the Go module proxy (`go install go.k6.io/k6@$K6_VERSION`):
#        http_bench.py drives it with bench/k6_open_loop.js (constant-arrival-rate, open loop, a
#        different body and different headers on every request).
#   oha  from crates.io: a cross-check of the floor app with a second, independent generator
#        (`http_bench.py --oha`; static headers only, so it cannot carry distinct idempotency keys).
#
# Set BENCH_SKIP_OHA=1 to skip oha (it compiles from source, a few minutes on a small machine).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
TOOLS="$REPO/.cache/tools"
K6_VERSION="${K6_VERSION:-v1.8.1}"
mkdir -p "$TOOLS/bin"
export PATH="$HOME/.cargo/bin:/usr/local/go/bin:$PATH"

if [[ ! -x "$TOOLS/bin/k6" ]]; then
    echo "tools: building k6 $K6_VERSION from the Go module proxy into $TOOLS/bin (a few minutes)" >&2
    GOBIN="$TOOLS/bin" GOFLAGS=-buildvcs=false go install "go.k6.io/k6@$K6_VERSION"
fi

if [[ "${BENCH_SKIP_OHA:-0}" != "1" && ! -x "$TOOLS/bin/oha" ]]; then
    echo "tools: installing oha from crates.io into $TOOLS" >&2
    cargo install oha --locked --root "$TOOLS" --quiet
fi
echo "$TOOLS/bin"
