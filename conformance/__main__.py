"""``python -m conformance ws://HOST:PORT/c2s [--domain D]``: black-box checks of a homeserver.

Prints one line per check and ``N passed, M failed``; exits 0 only if every check passed.
"""

from __future__ import annotations

import argparse
import sys

import trio

from conformance.runner import exit_code, run_checks
from federation.transport import DEFAULT_MAX_FRAME


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conformance",
                                     description="Check a SecureChat homeserver against conformance/PROTOCOL.md "
                                                 "using throwaway accounts.")
    parser.add_argument("url", help="the c2s WebSocket URL, e.g. ws://127.0.0.1:8448/c2s")
    parser.add_argument("--domain", help="the server's domain (default: what its challenge op reports)")
    parser.add_argument("--timeout", type=float, default=15.0, help="seconds allowed per check (default 15)")
    parser.add_argument("--max-frame", type=int, default=DEFAULT_MAX_FRAME,
                        help=f"the server's frame limit in bytes (default {DEFAULT_MAX_FRAME})")
    args = parser.parse_args(argv)
    if not args.url.startswith(("ws://", "wss://")):
        parser.error("the URL must start with ws:// or wss://")

    def out(line: str) -> None:
        print(line, flush=True)

    results = trio.run(lambda: run_checks(args.url, args.domain, out=out, timeout_s=args.timeout,
                                          max_frame=args.max_frame))
    return exit_code(results)


if __name__ == "__main__":
    sys.exit(main())
