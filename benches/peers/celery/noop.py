"""A no-op Celery task, and a driver that measures how fast Celery runs it end to end.

The peer of `conclave load tasks` in benches/peers/run.sh:

    celery -A noop worker --loglevel=WARNING                  # stock: prefork, one per core
    python noop.py --count 20000 --submitters 4 --window 64   # one JSON line on stdout

Broker and result backend are Redis (CELERY_REDIS, default redis://127.0.0.1:6379/11: a database
of its own), with acks_late, so a task is acknowledged only once it has run, as Conclave settles a
task only on `complete`. The driver runs --submitters processes (one Python process publishes
well under a thousand tasks a second here), each keeping at most --window of its tasks
unfinished, as the Conclave scenario's submitter connections do. A task counts as done when its
submitter holds its result (the moment a client would see it), so the latency is submit ->
result seen, and the throughput is all tasks over the time from the first submission to the last
result.
"""

import argparse
import json
import math
import multiprocessing
import os
import sys
import time
from collections import deque

from celery import Celery

REDIS = os.environ.get("CELERY_REDIS", "redis://127.0.0.1:6379/11")
QUEUE = os.environ.get("CELERY_QUEUE", "conclave-peers")

app = Celery("noop", broker=REDIS, backend=REDIS)
app.conf.update(
    task_acks_late=True,
    task_default_queue=QUEUE,
    result_expires=600,
    broker_connection_retry_on_startup=True,
)


@app.task(name="noop")
def noop():
    return None


def percentile(sorted_ms, q):
    """The nearest-rank percentile of an ascending list."""
    if not sorted_ms:
        return None
    rank = max(1, math.ceil(q * len(sorted_ms)))
    return round(sorted_ms[rank - 1], 2)


def wait_for_worker(limit_s):
    """Blocks until a worker answers a ping, or fails after limit_s seconds."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if app.control.ping(timeout=1.0):
            return
    sys.exit(f"no Celery worker answered on {REDIS} within {limit_s} s")


def submit(count, window, timeout_s):
    """Submits `count` tasks with at most `window` unfinished and waits for every result.

    Returns (start, end, latencies in ms, failures), the times on the system-wide monotonic
    clock, so that the parent can span several submitter processes.
    """
    inflight = deque()
    latencies = []
    failed = 0
    submitted = 0
    start = time.monotonic()
    while submitted < count or inflight:
        while submitted < count and len(inflight) < window:
            inflight.append((time.monotonic(), noop.delay()))
            submitted += 1
        sent_at, result = inflight.popleft()
        result.get(timeout=timeout_s, propagate=False)
        latencies.append((time.monotonic() - sent_at) * 1000.0)
        if result.state != "SUCCESS":
            failed += 1
    return start, time.monotonic(), latencies, failed


def submit_share(args):
    return submit(*args)


def run(count, submitters, window, timeout_s):
    """`count` tasks shared by `submitters` processes; returns the figures."""
    shares = [count // submitters + (i < count % submitters) for i in range(submitters)]
    with multiprocessing.get_context("spawn").Pool(submitters) as pool:
        parts = pool.map(submit_share, [(share, window, timeout_s) for share in shares])
    elapsed = max(p[1] for p in parts) - min(p[0] for p in parts)
    latencies = sorted(ms for p in parts for ms in p[2])
    return {
        "scenario": "celery",
        "count": count,
        "submitters": submitters,
        "window": window,
        "elapsed_s": round(elapsed, 3),
        "tasks_per_s": round(count / elapsed, 1),
        "failed": sum(p[3] for p in parts),
        "submit_to_result_ms": {
            "p50": percentile(latencies, 0.50),
            "p90": percentile(latencies, 0.90),
            "p99": percentile(latencies, 0.99),
            "max": round(latencies[-1], 2) if latencies else None,
        },
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20000, help="tasks to run in all")
    parser.add_argument("--submitters", type=int, default=4, help="submitter processes")
    parser.add_argument("--window", type=int, default=64, help="unfinished tasks per submitter")
    parser.add_argument("--warmup", type=int, default=200, help="tasks run first, not counted")
    parser.add_argument("--timeout", type=float, default=60.0, help="longest wait for a result")
    args = parser.parse_args()
    if min(args.count, args.submitters, args.window) < 1 or args.warmup < 0:
        parser.error("--count, --submitters and --window must be at least 1, --warmup at least 0")
    wait_for_worker(60)
    if args.warmup:
        submit(args.warmup, args.window, args.timeout)
    print(json.dumps(run(args.count, args.submitters, args.window, args.timeout)))


if __name__ == "__main__":
    main()
