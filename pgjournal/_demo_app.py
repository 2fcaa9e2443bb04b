"""The workflows of ``pgjournal demo``: an agent-like run with a fake model.

Worker processes (and the docker image) serve it with::

    PGJOURNAL_DSN=... PGJOURNAL_SCHEMA=pgjournal_demo pgjournal worker pgjournal._demo_app:app

Each step function writes one row to ``<schema>.demo_effects`` when it has
really run to the end (the demo's stand-in for a side effect such as a paid
model call or a sent e-mail). The demo compares those rows with the journal
to show that no step ran twice, whichever worker was killed.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator
from typing import Any

from ._queries import cli_fetch
from .app import App
from .run import Run

TOOLS = ("web_search", "read_docs", "run_sql", "calculator", "code_interpreter", "calendar")
WORDS = ("durable", "agents", "replay", "their", "journal", "after", "a", "crash", "and",
         "never", "repeat", "a", "finished", "step", "because", "postgres", "remembers")

#: The demo's app: DSN and schema come from the environment so that worker
#: processes and containers started elsewhere serve the same schema.
app = App(os.environ.get("PGJOURNAL_DSN") or None,
          schema=os.environ.get("PGJOURNAL_SCHEMA") or "pgjournal_demo",
          poll_interval=0.25)


async def _effect(run_id: str, step: str) -> None:
    """Record that a step function ran to the end (committed at once)."""
    await cli_fetch(app, "demo_effect", run=run_id, step=step, pid=os.getpid())


async def _latency(seconds: float) -> None:
    await asyncio.sleep(seconds * random.uniform(0.6, 1.4))


async def plan(run_id: str, step: str, task: str, latency: float) -> dict[str, Any]:
    """The fake model plans: which tools to call (random, so journaling matters)."""
    await _latency(latency)
    tools = random.sample(TOOLS, k=random.randint(2, 3))
    await _effect(run_id, step)
    return {"task": task, "tools": tools}


async def call_tool(run_id: str, step: str, tool: str, task: str,
                    latency: float) -> dict[str, Any]:
    await _latency(latency)
    await _effect(run_id, step)
    return {"tool": tool, "finding": f"{tool} found {random.randint(1, 99)} facts on {task}"}


async def draft(run_id: str, step: str, task: str, latency: float) -> AsyncIterator[str]:
    """The fake model streams its draft token by token."""
    n = random.randint(8, 14)
    for i in range(n):
        await asyncio.sleep(latency / n)
        yield (task.split()[0] if i == 0 else random.choice(WORDS)) + " "
    await _effect(run_id, step)


async def publish(run_id: str, step: str, text: str, approval: dict[str, Any],
                  latency: float) -> dict[str, Any]:
    await _latency(latency)
    await _effect(run_id, step)
    return {"published_words": len(text.split()), "approved_by": approval.get("by")}


@app.workflow(queue="agents", max_attempts=3, retry_backoff=0.5)
async def agent(run: Run, task: str, latency: float = 0.5, cool_down: float = 1.0) -> Any:
    """Plan, call tools, stream a draft, wait for a human's approval, cool down, publish."""
    rid = str(run.id)
    the_plan = await run.step("plan", plan, rid, "plan", task, latency)
    findings = []
    for tool in the_plan["tools"]:
        name = f"tool:{tool}"
        findings.append(await run.step(name, call_tool, rid, name, tool, task, latency))
    text = "".join([tok async for tok in run.stream_step("draft", draft, rid, "draft", task,
                                                          latency)])
    approval = await run.wait_signal("approval", timeout=600)
    await run.sleep("cool-down", cool_down)
    receipt = await run.step("publish", publish, rid, "publish", text, approval, latency)
    return {"task": task, "tools": [f["tool"] for f in findings], **receipt}
