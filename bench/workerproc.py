"""A benchmark worker process: ``python -m bench.workerproc SYSTEM DSN MODE CONCURRENCY LEASE``.

Runs the system's worker half (``Adapter.serve``) until SIGTERM. Prints
``READY`` once serving and ``LAT <ms>`` per timed job on stdout; logs go to
stderr (the harness keeps them in a file for when something goes wrong).
"""

from __future__ import annotations

import asyncio
import logging
import sys

from bench.adapters import load
from bench.adapters.base import announce_ready


def main(argv: list[str]) -> None:
    system, dsn, mode, concurrency, lease = argv
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    adapter = load(system)(dsn)
    asyncio.run(adapter.serve(mode, int(concurrency), float(lease), announce_ready))


if __name__ == "__main__":
    main(sys.argv[1:])
