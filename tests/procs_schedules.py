"""A worker process with one declared schedule, for tests of schedules with real
processes.

    python -m tests.procs_schedules DSN SCHEMA --cron '* * * * * *' [--catchup all]
        [--window 86400] [--name tick] [--timezone UTC]

The schedule is declared with ``@app.schedule`` on the ``tick`` workflow, so a
starting process upserts it (as every worker of an app does). ``tick`` returns
at once; the runs it leaves are what the tests count.
"""

from __future__ import annotations

import argparse
import asyncio
import logging

import pgjournal


def build_app(dsn: str, schema: str, *, cron: str, catchup: str, window: float, name: str,
              timezone: str) -> pgjournal.App:
    app = pgjournal.App(dsn, schema=schema, poll_interval=0.2)

    @app.schedule(cron, name=name, catchup=catchup, catchup_window=window,
                  timezone=timezone, kwargs={"label": name})
    @app.workflow(queue="ticks")
    async def tick(run: pgjournal.Run, label: str) -> str:
        return label

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dsn")
    parser.add_argument("schema")
    parser.add_argument("--cron", default="* * * * * *")
    parser.add_argument("--catchup", default="all")
    parser.add_argument("--window", type=float, default=86400.0)
    parser.add_argument("--name", default="tick")
    parser.add_argument("--timezone", default="UTC")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    app = build_app(args.dsn, args.schema, cron=args.cron, catchup=args.catchup,
                    window=args.window, name=args.name, timezone=args.timezone)
    worker = pgjournal.Worker(app, concurrency=4, lease=5.0, grace_period=2.0)

    async def serve() -> None:
        try:
            await worker.run()
        finally:
            await app.close()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
