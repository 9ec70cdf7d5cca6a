"""`python -m gateway.psp_sim`: serve the simulated PSPs over HTTP (the future `gateway psp-sim`)."""

from __future__ import annotations

import argparse

from .http import serve
from .profiles import DEFAULT_PROFILES


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="psp-sim", description="Serve simulated PSPs over HTTP.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8700)
    parser.add_argument(
        "--psp", action="append", choices=sorted(DEFAULT_PROFILES), help="profile to serve (repeatable)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-scale", type=float, default=1.0, help="multiplies every simulated duration")
    parser.add_argument("--transactions-max", type=int, default=100_000)
    args = parser.parse_args(argv)
    serve(
        args.host,
        args.port,
        args.psp,
        seed=args.seed,
        time_scale=args.time_scale,
        transactions_max=args.transactions_max,
    )


if __name__ == "__main__":
    main()
