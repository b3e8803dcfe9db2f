"""Run outputs written by the main rank: config.json, metrics.csv, TensorBoard scalars, curves.png, summary.json.

Other ranks get a ``RunLog`` that does nothing, so the training loop never branches on rank to log.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

FIELDS = ["step", "epoch", "loss", "lr", "throughput", "accuracy", "dice", "miou"]
SUMMARY_KEYS = ("model", "strategy", "world_size", "steps", "final_loss", "eval", "checkpoint")


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
                self.rows = [{k: _num(v) for k, v in r.items()} for r in csv.DictReader(f)]
        else:
            with open(self.csv_path, "w", newline="") as f:
                csv.DictWriter(f, FIELDS).writeheader()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.dir / "tensorboard"))

    def log(self, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: v for k, v in values.items() if v is not None}}
        unknown = set(row) - set(FIELDS)
        if unknown:
            raise KeyError(f"metrics {sorted(unknown)} have no column in metrics.csv")
        self.rows.append(row)
        with open(self.csv_path, "a", newline="") as f:
            csv.DictWriter(f, FIELDS).writerow(row)
        if self._tb is not None:
            for k, v in row.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)):
                    self._tb.add_scalar(("eval/" if k in ("accuracy", "dice", "miou") else "train/") + k, v, step)

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
            b.plot(*zip(*ev), marker="o", color="tab:green")
        b.set(xlabel="step", ylabel=metric, title=f"test {metric}")
        fig.tight_layout()
        path = self.dir / "curves.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

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
            self._tb.close()
            self._tb = None


def _write_json(path: Path, value: Any) -> Path:
    """``value`` as indented strict JSON (no NaN), replacing ``path`` atomically."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(value, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path


def _num(v: str) -> Any:
    if v == "":
        return None
    try:
        f = float(v)
    except ValueError:
        return v
    return int(f) if f.is_integer() and "." not in v and "e" not in v.lower() else f
