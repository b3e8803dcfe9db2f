"""Run outputs written by the main rank: config.json, metrics.csv, TensorBoard scalars, curves.png, summary.json.

Other ranks get a ``RunLog`` that does nothing, so the training loop never branches on rank to log.
"""
from __future__ import annotations

import csv
import errno
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

FIELDS = ["step", "epoch", "loss", "lr", "throughput", "grad_norm", "accuracy", "dice", "miou",
          "ema_accuracy", "ema_dice", "ema_miou",
          # each rank's own step time (s) over the window: min / median / max over the ranks, and the slowest rank
          "step_time_min", "step_time_median", "step_time_max", "slowest_rank"]
EVAL_FIELDS = ("accuracy", "dice", "miou", "ema_accuracy", "ema_dice", "ema_miou")
SUMMARY_KEYS = ("model", "strategy", "world_size", "steps", "final_loss", "eval", "checkpoint")


class OutputDirError(ValueError):
    """The output directory cannot be created or written: one line naming the path and the fix."""


def write_failure(path: Path, e: OSError) -> OutputDirError:
    """One line for a run output (metrics.csv, TensorBoard events, config/summary, curves) the filesystem
    refused mid-run, e.g. a full disk: what failed, that the checkpoints are kept, and the fix."""
    fix = {errno.ENOSPC: "free disk space or move --output-dir to a larger disk",
           errno.EDQUOT: "free space within your disk quota or move --output-dir",
           errno.EFBIG: "raise the file-size limit (ulimit -f)",
           errno.EROFS: "make --output-dir writable",
           errno.EACCES: "make --output-dir writable"}.get(e.errno, "check --output-dir")
    return OutputDirError(f"could not write {path}: {e.strerror or e}; the checkpoints already written are intact: "
                          f"{fix}, then rerun with --resume auto to continue from the latest one")


def check_output_dir(path: Path) -> Path:
    """Create ``path`` (and parents) and prove it writable by creating and removing a file in it.

    Run before training starts, so a run that could never save is refused in one line instead of failing
    at its first checkpoint or log row. Probing beats ``os.access``: root passes every mode check but still
    cannot write to a read-only mount, and a parent that is a regular file only shows when creating.
    """
    path = Path(path)
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.is_dir():
            raise OutputDirError(f"--output-dir {path}: {parent} is a regular file, not a directory; "
                                 "choose another --output-dir")
        if parent.is_dir():
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputDirError(f"--output-dir {path} is not writable ({e.strerror or e}); choose a writable "
                             "--output-dir or fix its permissions") from None
    return path


class RunLog:
    """Writes config.json; appends metric rows to metrics.csv and TensorBoard; draws curves.png; writes summary.json."""

    def __init__(self, output_dir: Path, *, enabled: bool, tensorboard: bool = True):
        self.dir = Path(output_dir)
        self.enabled = enabled
        self.rows: list[dict[str, Any]] = []
        self._tb = None
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.dir / "metrics.csv"
        if self.csv_path.is_file():  # a resumed run continues the same table
            with open(self.csv_path, newline="") as f:
                reader = csv.DictReader(f)
                self.rows = [{k: _num(v) for k, v in r.items()} for r in reader]
            if reader.fieldnames != FIELDS:  # written before a column was added: rewrite it with today's header
                table = io.StringIO(newline="")
                writer = csv.DictWriter(table, FIELDS)
                writer.writeheader()
                writer.writerows({k: "" if v is None else v for k, v in r.items() if k in FIELDS} for r in self.rows)
                tmp = self.csv_path.with_suffix(".csv.tmp")
                try:
                    tmp.write_text(table.getvalue(), newline="")
                    os.replace(tmp, self.csv_path)
                except OSError as e:
                    raise write_failure(self.csv_path, e) from None
        else:
            try:
                with open(self.csv_path, "w", newline="") as f:
                    csv.DictWriter(f, FIELDS).writeheader()
            except OSError as e:
                raise write_failure(self.csv_path, e) from None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.dir / "tensorboard"))
            _quiet_tensorboard_thread()

    def log(self, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: v for k, v in values.items() if v is not None}}
        unknown = set(row) - set(FIELDS)
        if unknown:
            raise KeyError(f"metrics {sorted(unknown)} have no column in metrics.csv")
        line = io.StringIO(newline="")
        csv.DictWriter(line, FIELDS).writerow(row)
        path = self.csv_path
        try:
            _append_whole(path, line.getvalue().encode())
            if self._tb is not None:
                path = Path(self._tb.get_logdir())
                for k, v in row.items():
                    if k not in ("step", "epoch") and isinstance(v, (int, float)):
                        self._tb.add_scalar(("eval/" if k in EVAL_FIELDS else "train/") + k, v, step)
                # TensorBoard writes from a thread and reports its error only at a later call: wait for this
                # row's events here, so a full disk is seen at the row that hit it (and not at exit)
                self._tb.flush()
        except OSError as e:
            self.enabled = False  # write nothing more; the caller stops the run
            self._drop_tensorboard()
            raise write_failure(path, e) from None
        self.rows.append(row)

    def curves(self, metric: str) -> Path | None:
        """curves.png: training loss and the eval metric against the step."""
        if not self.enabled:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        loss = [(r["step"], r["loss"]) for r in self.rows if r.get("loss") not in (None, "")]
        ev = [(r["step"], r[metric]) for r in self.rows if r.get(metric) not in (None, "")]
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        if loss:
            a.plot(*zip(*loss), label="train loss")
        a.set(xlabel="step", ylabel="loss", title="training loss")
        if ev:
            b.plot(*zip(*ev), marker="o", color="tab:green", label="model")
        ema = [(r["step"], r["ema_" + metric]) for r in self.rows if r.get("ema_" + metric) not in (None, "")]
        if ema:
            b.plot(*zip(*ema), marker="s", color="tab:purple", label="EMA")
            b.legend()
        b.set(xlabel="step", ylabel=metric, title=f"test {metric}")
        fig.tight_layout()
        path = self.dir / "curves.png"
        try:
            fig.savefig(path, dpi=100)
        except OSError as e:
            raise write_failure(path, e) from None
        finally:
            plt.close(fig)
        return path

    def hparams(self, config: dict[str, Any], metrics: dict[str, Any]) -> None:
        """TensorBoard's HPARAMS tab: the run's options against its final metrics (``hparam/<name>``)."""
        if not self.enabled or self._tb is None:
            return
        hp = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items()}
        values = {f"hparam/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        self._tb.add_hparams(hp, values, run_name=".")

    def summary(self, **values: Any) -> Path | None:
        """summary.json with exactly the keys in SUMMARY_KEYS, written atomically."""
        if not self.enabled:
            return None
        if set(values) != set(SUMMARY_KEYS):
            raise KeyError(f"summary needs exactly {SUMMARY_KEYS}, got {sorted(values)}")
        return _write_json(self.dir / "summary.json", {k: values[k] for k in SUMMARY_KEYS})

    def config(self, values: dict[str, Any]) -> Path | None:
        """config.json: the run's resolved options (plain JSON), written atomically; a resumed run rewrites it."""
        if not self.enabled:
            return None
        return _write_json(self.dir / "config.json", values)

    def close(self) -> None:
        if self._tb is not None:
            tb, self._tb = self._tb, None
            try:
                tb.close()
            except OSError as e:
                raise write_failure(Path(tb.get_logdir()), e) from None

    def _drop_tensorboard(self) -> None:
        """Stop TensorBoard after a failed write without raising again (its thread re-raises on every call)."""
        tb, self._tb = self._tb, None
        if tb is not None:
            try:
                tb.close()
            except OSError:
                pass


def _quiet_tensorboard_thread() -> None:
    """TensorBoard's writer thread prints its traceback when a write fails, then hands the error to the next
    call, where ``RunLog.log`` turns it into one line: drop that thread's print of an ``OSError``."""
    import threading

    previous = threading.excepthook
    if getattr(previous, "_anytopo", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        if isinstance(args.exc_value, OSError) and type(args.thread).__name__ == "_AsyncWriterThread":
            return
        previous(args)

    hook._anytopo = True  # type: ignore[attr-defined]
    threading.excepthook = hook


def _append_whole(path: Path, data: bytes) -> None:
    """Append ``data`` to ``path`` whole or not at all: a write cut short (disk full) is truncated away, so
    metrics.csv never ends in a torn row that a resumed run would read back."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        size = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except OSError:
            os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


def _write_json(path: Path, value: Any) -> Path:
    """``value`` as indented strict JSON (no NaN), replacing ``path`` atomically."""
    tmp = path.with_suffix(".json.tmp")
    try:
        tmp.write_text(json.dumps(value, indent=2, allow_nan=False) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_failure(path, e) from None
    return path


def _num(v: str) -> Any:
    if v == "":
        return None
    try:
        f = float(v)
    except ValueError:
        return v
    return int(f) if f.is_integer() and "." not in v and "e" not in v.lower() else f
