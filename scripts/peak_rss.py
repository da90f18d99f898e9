"""Peak resident memory of a federation on one machine: every Flower and fedtune process, and their sum.

    python scripts/peak_rss.py --out rss.json &      # sample every 0.5 s until interrupted (Ctrl-C / SIGTERM)

Processes are grouped by role from their command line: ``superlink`` (flower-superlink),
``supernode:<port>`` (flower-supernode and the ClientApp processes it starts, by the node's
``--port``), ``serverapp`` (flwr-serverapp) and ``fedtune`` (the ``fedtune run`` that submitted the
app). On exit it prints, and writes to ``--out``, each group's peak RSS and the peak of the sum
over all groups at one instant (what the machine had to hold), in GB.
"""

from __future__ import annotations

import argparse
import json
import signal
import time

import psutil


def role(proc: psutil.Process, parents: dict[int, str]) -> str | None:
    """The group a process belongs to, or None when it is not part of the federation."""
    try:
        cmd = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    if "peak_rss.py" in cmd:
        return None
    if "flower-superlink" in cmd:
        return "superlink"
    if "flower-supernode" in cmd:
        parts = cmd.split()
        port = parts[parts.index("--port") + 1] if "--port" in parts else "?"
        return f"supernode:{port}"
    if "flwr-serverapp" in cmd:
        return "serverapp"
    if "flwr-clientapp" in cmd:  # started by a SuperNode (directly or through a launcher)
        try:
            chain = [q.pid for q in proc.parents()]
        except psutil.NoSuchProcess:
            chain = []
        return next((parents[pid] for pid in chain if pid in parents), "clientapp")
    if "fedtune" in cmd and " run " in f" {cmd} ":
        return "fedtune"
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="", help="write the peaks as JSON here on exit")
    ap.add_argument("--interval", type=float, default=0.5)
    args = ap.parse_args()
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    peaks: dict[str, int] = {}
    total_peak, t0 = 0, time.time()
    try:
        while not stop["now"]:
            groups: dict[str, int] = {}
            parents: dict[int, str] = {}
            procs = list(psutil.process_iter())
            for p in procs:  # nodes first, so their ClientApp children find them
                r = role(p, {})
                if r is not None and r.startswith("supernode"):
                    parents[p.pid] = r
            for p in procs:
                r = role(p, parents)
                if r is None:
                    continue
                try:
                    groups[r] = groups.get(r, 0) + p.memory_info().rss
                except psutil.NoSuchProcess:
                    continue
            for r, v in groups.items():
                peaks[r] = max(peaks.get(r, 0), v)
            total_peak = max(total_peak, sum(groups.values()))
            time.sleep(args.interval)
    except KeyboardInterrupt:
        pass
    result = {"seconds": round(time.time() - t0, 1), "peak_gb": {r: round(v / 1e9, 2) for r, v in sorted(peaks.items())},
              "peak_sum_gb": round(total_peak / 1e9, 2)}
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
