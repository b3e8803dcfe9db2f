"""Run one command as a child of THIS small process and print its peak RSS as one JSON line on stdout.

    python -S bench/_peak_rss.py [--time-v] -- CMD [ARGS...]

Why a separate, small spawner: Linux records a child's ``ru_maxrss`` starting from the high-water RSS of
the address space it ``exec``s from. A child spawned (fork/vfork + exec) by a bench process holding a
1.2 GB model and torch reports at least 1.2 GB, even for ``python -c pass`` (measured here: 2059 MB for
``python -c pass`` spawned from a 2 GB parent). This spawner imports only the standard library (run it
with ``-S``), so ``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` after its only child exits is that
child's own peak.

With ``--time-v`` (and ``/usr/bin/time`` present) the child is ``/usr/bin/time -v CMD``; its "Maximum
resident set size" line is parsed as a cross-check. The child's stdout goes to this process's stderr, so
stdout carries only the JSON: {"rc", "ru_maxrss_kib", "time_v_maxrss_kib", "wall_s"}.
"""
import json
import os
import re
import resource
import subprocess
import sys
import time

TIME = "/usr/bin/time"


def main() -> int:
    argv = sys.argv[1:]
    time_v = False
    if argv and argv[0] == "--time-v":
        time_v, argv = True, argv[1:]
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        print("usage: python -S bench/_peak_rss.py [--time-v] -- CMD [ARGS...]", file=sys.stderr)
        return 2
    use_time = time_v and os.access(TIME, os.X_OK)
    cmd = [TIME, "-v"] + argv if use_time else argv
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE if use_time else None, text=True)
    wall = time.perf_counter() - t0
    time_kib = None
    if use_time:
        err = proc.stderr or ""
        m = re.search(r"Maximum resident set size \(kbytes\):\s*(\d+)", err)
        time_kib = int(m.group(1)) if m else None
        # pass the child's own stderr through, without time's report
        sys.stderr.write(err.split("\tCommand being timed:")[0])
    out = {"rc": proc.returncode, "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
           "time_v_maxrss_kib": time_kib, "wall_s": round(wall, 3)}
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
