"""Which S3 client checkpoint/objstore.py uses: obstore against fsspec/s3fs, same bytes, same server, side by side.

Candidates, interleaved (order rotated each round) against one SeaweedFS server on 127.0.0.1 (bench/_s3.py):
- put of a 256 MiB buffer (obstore.put multipart, 16 MiB parts, 8 in flight; s3fs ``pipe_file``, its own
  multipart with a 16 MiB block size);
- get of the whole object into memory (obstore ``get().bytes()``; s3fs ``cat_file``);
- 64 ranged reads of 4 MiB each, as a load of tensors does (obstore ``get_ranges``, parallel; s3fs
  ``cat_ranges``, parallel).

s3fs is not a dependency of anytopo: run this with a Python that has both, e.g.
``python -m venv /tmp/c && /tmp/c/bin/pip install s3fs==2025.10.0 obstore==0.12.1`` then
``/tmp/c/bin/python bench/s3_clients.py`` (the server comes from this project's venv: ``--weed PATH``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from _common import interleave, ratio, summarize, table, uptime, write_result
from _s3 import s3_server

SIZE = 256 << 20
RANGE = 4 << 20


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--weed", default=None, help="the weed binary (default: beside this Python, or on PATH)")
    args = p.parse_args(argv)
    if args.weed:
        os.environ["PATH"] = os.path.dirname(args.weed) + os.pathsep + os.environ["PATH"]
    import obstore
    import s3fs
    from obstore.store import S3Store

    data = os.urandom(SIZE)
    before = uptime("before")
    with s3_server() as s:
        ob = S3Store(s.bucket, endpoint=s.endpoint, access_key_id=s.key_id, secret_access_key=s.secret,
                     region="us-east-1", client_options={"allow_http": True}, virtual_hosted_style_request=False)
        fs = s3fs.S3FileSystem(key=s.key_id, secret=s.secret, endpoint_url=s.endpoint, default_block_size=16 << 20,
                               client_kwargs={"region_name": "us-east-1"})
        starts = [i * (SIZE // 64) for i in range(64)]
        candidates = {
            "obstore put": lambda: obstore.put(ob, "o.bin", data, chunk_size=16 << 20, max_concurrency=8),
            "s3fs put": lambda: fs.pipe_file(f"{s.bucket}/f.bin", data),
        }
        puts = interleave(candidates, args.rounds, timer=time.perf_counter)
        candidates = {
            "obstore get": lambda: obstore.get(ob, "o.bin").bytes(),
            "s3fs get": lambda: fs.cat_file(f"{s.bucket}/f.bin"),
        }
        gets = interleave(candidates, args.rounds, timer=time.perf_counter)
        candidates = {
            "obstore ranges": lambda: obstore.get_ranges(ob, "o.bin", starts=starts, lengths=[RANGE] * 64),
            "s3fs ranges": lambda: fs.cat_ranges([f"{s.bucket}/f.bin"] * 64, starts, [a + RANGE for a in starts]),
        }
        ranges = interleave(candidates, args.rounds, timer=time.perf_counter)
    after = uptime("after")
    rows = []
    for what, res in (("put 256 MiB", puts), ("get 256 MiB", gets), ("64 x 4 MiB ranges", ranges)):
        (a, av), (b, bv) = res.items()
        r = ratio(bv, av)
        rows.append({"op": what, "obstore_s": summarize(av)["median"], "s3fs_s": summarize(bv)["median"],
                     "s3fs_over_obstore": r["ratio"], "paired": r["paired_median"]})
    print(table(rows, [("op", "operation", ""), ("obstore_s", "obstore s", ".3f"), ("s3fs_s", "s3fs s", ".3f"),
                       ("s3fs_over_obstore", "s3fs / obstore", ".2f"), ("paired", "paired median", ".2f")]))
    import obstore as ob_mod

    write_result("s3_clients", {"versions": {"obstore": ob_mod.__version__, "s3fs": s3fs.__version__,
                                             "python": sys.version.split()[0]}, "uptime": [before, after], "rows": rows,
                                "raw": {"put": puts, "get": gets, "ranges": ranges}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
