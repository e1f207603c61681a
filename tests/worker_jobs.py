"""Driving the server's engine thread (api/worker.py) from a test, without HTTP."""

from __future__ import annotations

import threading

from kawai.api.worker import Failed, Finished, Job, Worker
from kawai.engine.sampling import SamplingParams


class Collector:
    """A StepChannel stand-in on the test's side: records what the engine thread sends."""

    def __init__(self):
        self.items = []
        self.done = threading.Event()

    def put(self, item) -> bool:
        self.items.append(item)
        if isinstance(item, (Finished, Failed)):
            self.done.set()
        return True

    @property
    def tokens(self) -> list[int]:
        return [s.token_id for s in self.items if getattr(s, "token_id", None) is not None]


def run_jobs(worker: Worker, jobs: list[tuple[list[int], SamplingParams]], tenant=None) -> list[Collector]:
    out = []
    for i, (prompt, params) in enumerate(jobs):
        channel = Collector()
        worker.submit(Job(prompt, params, channel, f"req_{i}", tenant=tenant))
        out.append(channel)
    for c in out:
        assert c.done.wait(60)
    return out
