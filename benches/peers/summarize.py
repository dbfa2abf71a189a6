"""Turns one benches/peers/run.sh run directory into the markdown table of the comparison.

    python3 summarize.py RUN_DIR > RUN_DIR/results.md

Reads machine.txt and, for each run NAME that is there, NAME.json (`conclave load --json`, or
celery/noop.py's line) and NAME.meta (load average before and after, exit status). A run that
failed or did not converge is shown as such, never left out.
"""

import json
import sys
from pathlib import Path

YJS = [
    ("yjs-conclave", "Conclave `/v1/yjs` (SQLite, every update durable)"),
    ("yjs-y-websocket", "y-websocket 1.5.4 `bin/server.js` (memory only)"),
    ("yjs-hocuspocus", "Hocuspocus 4.7 (memory only)"),
]
IDLE = [
    ("idle-conclave-native", "Conclave `/v1/ws` (hello + join)"),
    ("idle-conclave-yjs", "Conclave `/v1/yjs` (synced room)"),
    ("idle-y-websocket", "y-websocket 1.5.4 (synced room)"),
    ("idle-hocuspocus", "Hocuspocus 4.7 (authenticated, synced)"),
]
TASKS = [
    ("tasks-conclave", "Conclave (SQLite, `conclave load tasks`)"),
    ("tasks-celery", "Celery 5.7, Redis broker + backend, acks_late (`celery/noop.py`)"),
]


def read(run, name):
    """(report, meta) of run NAME, or None when it was not run."""
    meta_path = run / f"{name}.meta"
    if not meta_path.exists():
        return None
    meta = json.loads(meta_path.read_text())
    text = (run / f"{name}.json").read_text().strip()
    try:
        report = json.loads(text) if text else None
    except json.JSONDecodeError:
        report = None
    return report, meta


def num(value, digits=0):
    if value is None:
        return "–"
    return f"{value:,.{digits}f}"


def cores(report):
    """The server's and the load generator's cores over the measured phase (`--pid`)."""
    cpu = (report or {}).get("cpu") or {}
    return f"{num(cpu.get('server_cores'), 2)} / {num(cpu.get('load_generator_cores'), 2)}"


def status(report, meta):
    """What went wrong, if anything: exit status, errors by code, failed convergence."""
    notes = []
    if report is None:
        return f"no report (exit {meta['exit']}; see the .err file)"
    errors = report.get("errors") or {}
    if errors:
        notes.append(", ".join(f"{code} {count}" for code, count in sorted(errors.items())))
    convergence = report.get("convergence")
    if convergence is not None:
        notes.append("converged" if convergence["passed"] else "**did not converge**")
    if report.get("failed"):
        notes.append(f"{report['failed']} failed")
    if meta["exit"] != 0 and convergence is None:
        notes.append(f"exit {meta['exit']}")
    return "; ".join(notes) or "ok"


def load(meta):
    return f"{meta['loadavg_before'].split()[0]} → {meta['loadavg_after'].split()[0]}"


def yjs_runs(run):
    """The (typing, rate) pairs the yjs scenario ran, from its run names
    (yjs-<server>-<typing>-r<rate>), typings in the order first seen and rates ascending."""
    pairs = set()
    for path in run.glob("yjs-*-r*.meta"):
        head, rate = path.stem.rsplit("-r", 1)
        pairs.add((head.rsplit("-", 1)[1], rate))
    order = ["runs", "interleaved"]
    return sorted(pairs, key=lambda p: (order.index(p[0]) if p[0] in order else 9, float(p[1])))


def yjs_table(run, out):
    pairs = yjs_runs(run)
    if not pairs:
        return
    first = next(
        (
            r[0]
            for typing, rate in pairs
            for name, _ in YJS
            if (r := read(run, f"{name}-{typing}-r{rate}")) and r[0]
        ),
        None,
    )
    params = first["params"] if first else {}
    out.append(
        f"**yjs**: `conclave load yjs --sessions {params.get('documents')} --clients "
        f"{params.get('clients')} --typing T --rate R --duration {params.get('duration')} "
        "--ramp-up 2s` against each server in turn: R updates/s per client, so documents × "
        "clients × R × (clients − 1) deliveries/s are offered; sent/s below that means the "
        "clients could not keep up. `runs`: each client types at the end of its own run of "
        "text; `interleaved`: every client appends at the end of the shared text, so every "
        "update is a CRDT item of its own\n"
    )
    out.append(
        "| server | typing | R | deliveries/s | broadcast p50 | p99 | max | sent/s "
        "| cores: server / load | load avg | result |"
    )
    out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for typing, rate in pairs:
        for name, label in YJS:
            found = read(run, f"{name}-{typing}-r{rate}")
            if not found:
                continue
            report, meta = found
            if report is None:
                out.append(
                    f"| {label} | {typing} | {rate} | – | – | – | – | – | – | {load(meta)} "
                    f"| {status(report, meta)} |"
                )
                continue
            broadcast = report["latency_ms"].get("broadcast", {})
            out.append(
                f"| {label} | {typing} | {rate} | {num(report['rates'].get('delivered_per_s'))} "
                f"| {num(broadcast.get('p50_ms'), 1)} ms | {num(broadcast.get('p99_ms'), 1)} ms "
                f"| {num(broadcast.get('max_ms'), 1)} ms | {num(report['rates'].get('sent_per_s'))} "
                f"| {cores(report)} | {load(meta)} | {status(report, meta)} |"
            )
    out.append("")


def idle_table(run, out):
    rows = [(label, read(run, name)) for name, label in IDLE]
    rows = [(label, r) for label, r in rows if r]
    if not rows:
        return
    first = next((r[0] for _, r in rows if r[0]), None)
    params = first["params"] if first else {}
    out.append(
        f"**idle**: `conclave load idle --count {params.get('count')} --sessions "
        f"{params.get('sessions')} --ramp-up 10s` (Yjs servers with `--protocol yjs`), "
        "resident memory after minus before, over the sockets open\n"
    )
    out.append("| server | sockets | RSS before | RSS after | per socket | read from | result |")
    out.append("|---|---:|---:|---:|---:|---|---|")
    for label, (report, meta) in rows:
        memory = report.get("memory") if report else None
        if memory is None:
            out.append(f"| {label} | – | – | – | – | – | {status(report, meta)} |")
            continue
        out.append(
            f"| {label} | {num(memory['sockets'])} "
            f"| {num(memory['rss_before_bytes'] / 2**20, 1)} MiB "
            f"| {num(memory['rss_after_bytes'] / 2**20, 1)} MiB "
            f"| {num(memory['bytes_per_socket'] / 1024, 1)} KiB | {memory['source']} "
            f"| {status(report, meta)} |"
        )
    out.append("")


def tasks_table(run, out):
    conclave = read(run, "tasks-conclave")
    celery = read(run, "tasks-celery")
    if not conclave and not celery:
        return
    out.append(
        "**tasks**: no-op tasks end to end, submit → completion seen by the submitter; the same "
        "count and the same number of tasks unfinished at most\n"
    )
    out.append("| system | tasks | tasks/s | p50 | p99 | load avg | result |")
    out.append("|---|---:|---:|---:|---:|---|---|")
    if conclave:
        report, meta = conclave
        label = TASKS[0][1]
        if report is None:
            out.append(f"| {label} | – | – | – | – | {load(meta)} | {status(report, meta)} |")
        else:
            done = report["latency_ms"].get("submit_to_completed", {})
            out.append(
                f"| {label} | {num(report['counts'].get('completed'))} "
                f"| {num(report['rates'].get('completed_per_s'))} "
                f"| {num(done.get('p50_ms'), 1)} ms | {num(done.get('p99_ms'), 1)} ms "
                f"| {load(meta)} | {status(report, meta)} |"
            )
    if celery:
        report, meta = celery
        label = TASKS[1][1]
        if report is None:
            out.append(f"| {label} | – | – | – | – | {load(meta)} | {status(report, meta)} |")
        else:
            latency = report["submit_to_result_ms"]
            out.append(
                f"| {label} | {num(report['count'])} | {num(report['tasks_per_s'])} "
                f"| {num(latency['p50'], 1)} ms | {num(latency['p99'], 1)} ms "
                f"| {load(meta)} | {status(report, meta)} |"
            )
    out.append("")


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: summarize.py RUN_DIR")
    run = Path(sys.argv[1])
    machine = dict(
        line.split("=", 1) for line in (run / "machine.txt").read_text().splitlines() if "=" in line
    )
    out = [
        f"Measured {machine.get('date_utc')} on {machine.get('cpus')} cores "
        f"({machine.get('cpu')}, {machine.get('memory')}, Linux {machine.get('kernel')}), "
        f"shared with other builds: load average {machine.get('loadavg_start')} at the start, "
        f"{machine.get('loadavg_end')} at the end. {machine.get('conclave')} (release), Node.js "
        f"{machine.get('node')}, Python {machine.get('python')}. Client and server share the "
        "machine; every server runs alone, one after the other.\n"
    ]
    yjs_table(run, out)
    idle_table(run, out)
    tasks_table(run, out)
    print("\n".join(out))


if __name__ == "__main__":
    main()
