"""n > 1: one prompt's several choices, decoded together, their events interleaved.

The choices are separate plans handed to the scheduler at once, so they join one batch like any
concurrent requests. With a seed, choice i draws with seed + i: each choice of a seeded request
is the reply a lone request with that seed gets, so any one of them can be reproduced alone.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

from workbench.engine.events import Event
from workbench.engine.scheduler import GenerationQueue
from workbench.engine.sequence import Plan


def choices_of(plan: Plan, n: int) -> list[Plan]:
    if n == 1:
        return [plan]
    seed = plan.sampling.seed
    return [
        dataclasses.replace(
            plan, sampling=plan.sampling.model_copy(update={"seed": None if seed is None else seed + i})
        )
        for i in range(n)
    ]


async def merged(generation: GenerationQueue, plans: list[Plan]) -> AsyncIterator[tuple[int, Event]]:
    """(choice index, event) as each choice's events come; the first failure is raised, and
    leaving early (a client that disconnects) cancels every choice."""
    inbox: asyncio.Queue[tuple[int, Event | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, plan: Plan) -> None:
        try:
            async for event in generation.events(plan):
                inbox.put_nowait((index, event))
        except Exception as exc:  # noqa: BLE001 - raised to the consumer below
            inbox.put_nowait((index, exc))
        finally:
            inbox.put_nowait((index, None))

    pumps = [asyncio.create_task(pump(i, p)) for i, p in enumerate(plans)]
    try:
        running = len(pumps)
        while running:
            index, item = await inbox.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in pumps:
            task.cancel()
