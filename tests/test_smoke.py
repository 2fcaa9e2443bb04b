import pgjournal


async def test_round_trip(pgjournal_app: pgjournal.App) -> None:
    app = pgjournal_app

    @app.workflow()
    async def hello(run: pgjournal.Run, name: str) -> str:
        return await run.step("greet", lambda n: f"hello {n}", name)

    worker = pgjournal.Worker(app, concurrency=2, lease=5)
    import asyncio

    task = asyncio.create_task(worker.run(handle_signals=False))
    handle = await app.start(hello, "world")
    assert await handle.result(timeout=20) == "hello world"
    worker.stop()
    await task
