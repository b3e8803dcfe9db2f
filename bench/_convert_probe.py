"""``checkpoint convert`` in-process, with the RSS of its two phases: importing, then converting.

    python bench/_convert_probe.py OUT.json SRC DST [convert options...]

The peak RSS of ``python -m checkpoint convert`` is usually set by torch itself (this build maps its
CUDA libraries: ~0.68 GiB resident after the import and ~0.8 GiB at interpreter exit on the reference
machine), which hides the converter's own working set. This probe records VmRSS/VmHWM right after ``import checkpoint.cli``, resets the high-water mark
(``echo 5 > /proc/self/clear_refs``, Linux >= 4.0), runs the same ``checkpoint.cli.main(["convert",
...])`` the CLI runs, and records VmHWM again: that second peak is the conversion's alone. Informational
only: the target is judged on the unmodified CLI command (see ckpt_io.py).
"""
import json
import sys
from pathlib import Path


def _status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":", 1)[0]
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key + "_kib"] = int(line.split()[1])
    return out


def main() -> int:
    out_path, argv = sys.argv[1], sys.argv[2:]
    import checkpoint.cli  # noqa: E402  (the import is the first phase being measured)

    after_import = _status()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    rc = checkpoint.cli.main(["convert", *argv])
    converting = _status()
    Path(out_path).write_text(json.dumps({"rc": rc, "hwm_reset": reset, "after_import": after_import,
                                          "after_convert": converting}))
    return rc


if __name__ == "__main__":
    sys.exit(main())
