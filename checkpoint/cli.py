"""``anytopo-ckpt`` / ``python -m checkpoint``: inspect, convert, diff, verify.

Exit codes: 0 ok; 1 a difference or a failed verification; 2 bad input or usage. Errors are one line on
stderr naming the problem and the fix; tracebacks only with ``--debug``. ``--json`` prints exactly one
JSON object on stdout.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from .describe import inspect
from .errors import CheckpointError
from .formats import check_integrity, read_source
from .keys import strip_common_wrappers
from ._save import build_manifest, parse_size, write_checkpoint

# torch is imported by the commands that hold tensors (diff, verify, and reading .pth/DCP sources);
# `inspect` and `convert` of safetensors checkpoints run without it, in a small resident set.

OK, DIFFERENT, BAD_INPUT = 0, 1, 2


# ------------------------------------------------------------------------------------------ commands

def cmd_inspect(args: argparse.Namespace) -> tuple[int, dict[str, Any], str]:
    info = inspect(args.path, ema=args.ema, allow_pickle=args.allow_pickle)
    lines = [f"{info['path']}: {info['format']}, {info['num_tensors']} tensors, "
             f"{info['num_elements']:,} elements, {info['bytes']:,} bytes",
             f"  dtypes: {info['dtypes']}"]
    if info["prefixes"]:
        lines.append(f"  key prefixes: {info['prefixes']}")
    if info["other_entries"]:
        lines.append(f"  non-tensor entries: {info['other_entries']}")
    m = info["manifest"] or {}
    if m:
        t = m.get("topology") or {}
        lines.append(f"  manifest: model={m.get('model')} options={m.get('model_options')} step={m.get('step')} "
                     f"epoch={m.get('epoch')} saved by {t.get('strategy')} x{t.get('world_size')} on {t.get('device_type')}")
    else:
        lines.append("  manifest: none (not written by anytopo)")
    lines += [f"  {c}" for c in info["integrity"]] + [f"  note: {n}" for n in info["notes"]]
    shown = info["tensors"][: args.limit]
    lines += [f"  {t['name']}: {t['dtype']} {t['shape']}" for t in shown]
    if len(info["tensors"]) > len(shown):
        lines.append(f"  ... {len(info['tensors']) - len(shown)} more (--limit N)")
    return OK, info, "\n".join(lines)


def cmd_convert(args: argparse.Namespace) -> tuple[int, dict[str, Any], str]:
    src = read_source(args.src, ema=args.ema, allow_pickle=args.allow_pickle)
    checks = check_integrity(src, hashes=True)
    tensors = dict(src.tensors)
    stripped = ""
    if args.prefix:
        if not all(k.startswith(args.prefix) for k in tensors):
            raise CheckpointError(f"--prefix {args.prefix!r} is not on every key; check `anytopo-ckpt inspect {args.src}`")
        tensors = {k[len(args.prefix):]: v for k, v in tensors.items()}
        stripped = args.prefix
    tensors, common = strip_common_wrappers(tensors)
    stripped += common
    if args.layout == "dp":
        tensors = {"module." + k: v for k, v in tensors.items()}
    # Tied entries (the same memory under several keys) are written once and recorded as aliases.
    first: dict[object, str] = {}
    entries, aliases = [], {}
    for k in sorted(tensors):
        src_t = tensors[k]
        ident = src_t.identity()
        if ident in first:
            aliases[k] = first[ident]
        else:
            first[ident] = k
            entries.append((k, src_t))
    m = src.manifest or {}
    meta = {key: m[key] for key in ("model", "model_options", "step", "epoch") if m.get(key) is not None}
    meta["topology"] = m.get("topology") or {"strategy": "unknown", "world_size": None, "device_type": "unknown"}
    meta["converted_from"] = {"path": str(args.src), "format": src.format, "prefix_stripped": stripped}
    meta["layout"] = args.layout
    manifest = build_manifest(dict(entries), aliases, {}, meta)
    fmt = args.format
    dst = Path(args.dst)
    if fmt is None and dst.suffix == "":
        fmt = "safetensors"
    write_checkpoint(dst, entries, manifest, max_shard_size=parse_size(args.max_shard_size), fmt=fmt)
    out = {"src": str(args.src), "dst": str(dst), "source_format": src.format, "tensors": len(entries) + len(aliases),
           "bytes": manifest["total_bytes"], "prefix_stripped": stripped, "layout": args.layout, "checks": checks}
    return OK, out, (f"wrote {dst} ({out['tensors']} tensors, {out['bytes']:,} bytes) from {src.format}"
                     + (f", stripped {stripped!r}" if stripped else "") + (", layout dp" if args.layout == "dp" else ""))


def cmd_diff(args: argparse.Namespace) -> tuple[int, dict[str, Any], str]:
    import torch

    from ._load import load_state_dict

    a = load_state_dict(args.a, allow_pickle=args.allow_pickle)
    b = load_state_dict(args.b, allow_pickle=args.allow_pickle)
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    shapes, dtypes, differing = [], [], []
    max_abs, max_key = 0.0, None
    for k in sorted(set(a) & set(b)):
        x, y = a[k], b[k]
        if x.shape != y.shape:
            shapes.append([k, list(x.shape), list(y.shape)])
            continue
        if x.dtype != y.dtype:
            dtypes.append([k, str(x.dtype), str(y.dtype)])
        xf, yf = x.double(), y.double()
        if x.numel():
            d = (xf - yf).abs().max().item()
            if d > max_abs:
                max_abs, max_key = d, k
        if not torch.allclose(xf, yf, atol=args.atol, rtol=args.rtol, equal_nan=True):
            differing.append(k)
    same = not (only_a or only_b or shapes or differing)
    out = {"same": same, "only_in_a": only_a, "only_in_b": only_b, "shape_mismatches": shapes,
           "dtype_mismatches": dtypes, "differing": differing, "max_abs_diff": max_abs, "max_abs_diff_key": max_key,
           "compared": len(set(a) & set(b)), "atol": args.atol, "rtol": args.rtol}
    text = [f"{'same' if same else 'different'}: {out['compared']} common tensors, max abs diff {max_abs:.3g}"
            + (f" ({max_key})" if max_key else "")]
    for name in ("only_in_a", "only_in_b", "shape_mismatches", "dtype_mismatches", "differing"):
        if out[name]:
            text.append(f"  {name.replace('_', ' ')}: {len(out[name])} {out[name][:6]}")
    return (OK if same else DIFFERENT), out, "\n".join(text)


def cmd_verify(args: argparse.Namespace) -> tuple[int, dict[str, Any], str]:
    import models  # only this command needs the registry
    import torch

    from ._load import load

    try:
        options = models.parse_model_args(args.model_arg)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    name = args.model
    if name is None:
        m = read_source(args.path, ema=args.ema, allow_pickle=args.allow_pickle).manifest or {}
        if not m.get("model"):
            raise CheckpointError(f"{args.path} has no manifest naming its model; pass --model NAME "
                                  f"(one of {', '.join(models.list_models())})")
        name = m["model"]
        options = {**(m.get("model_options") or {}), **options}
    try:
        model = models.build_model(name, **options)
        inputs = models.example_inputs(name, **options)
    except ValueError as e:
        raise CheckpointError(f"cannot build model {name!r}: {e}") from None
    report = load(args.path, model, strict=True, ema=args.ema, allow_pickle=args.allow_pickle, verify=True)
    model.eval()
    with torch.no_grad():
        out = model(*inputs)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    finite = all(bool(torch.isfinite(o).all()) for o in outs)
    shapes = [list(o.shape) for o in outs]
    result = {"ok": finite, "model": name, "options": options, "output_shapes": shapes, "finite": finite,
              "report": report.to_dict()}
    text = f"{'OK' if finite else 'FAILED'}: {name} {options}\n{report}\n  forward: output {shapes}, " \
           f"{'finite' if finite else 'NON-FINITE values'}"
    return (OK if finite else DIFFERENT), result, text


# ------------------------------------------------------------------------------------------- parser

def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="anytopo-ckpt", description=__doc__.splitlines()[0])
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser, ema: bool = True) -> None:
        sp.add_argument("--json", action="store_true", help="print one JSON object on stdout")
        sp.add_argument("--allow-pickle", action="store_true",
                        help="allow code-carrying pickles (whole pickled modules); only for files you trust")
        if ema:
            sp.add_argument("--ema", action="store_true", help="use the EMA weights where the file has them")
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")

    sp = sub.add_parser("inspect", help="describe a checkpoint")
    sp.add_argument("path")
    sp.add_argument("--limit", type=int, default=20, help="tensors listed in text output")
    common(sp)
    sp.set_defaults(func=cmd_inspect)

    sp = sub.add_parser("convert", help="write a canonical checkpoint from any supported format")
    sp.add_argument("src")
    sp.add_argument("dst", help="x.safetensors, x.pth, or a directory (needed for sharding)")
    sp.add_argument("--format", choices=["safetensors", "pth"], default=None)
    sp.add_argument("--max-shard-size", default=None, help="e.g. 2GB, 500MB (directory output)")
    sp.add_argument("--layout", choices=["bare", "dp"], default="bare",
                    help="dp re-adds 'module.' for legacy code that loads into DataParallel")
    sp.add_argument("--prefix", default=None, help="strip this key prefix (e.g. 'model.' for Lightning)")
    common(sp)
    sp.set_defaults(func=cmd_convert)

    sp = sub.add_parser("diff", help="compare two checkpoints tensor by tensor")
    sp.add_argument("a")
    sp.add_argument("b")
    sp.add_argument("--atol", type=float, default=0.0)
    sp.add_argument("--rtol", type=float, default=0.0)
    common(sp, ema=False)
    sp.set_defaults(func=cmd_diff)

    sp = sub.add_parser("verify", help="build the model, load strictly, run a forward pass")
    sp.add_argument("path")
    sp.add_argument("--model", default=None, help="registry name (default: from the manifest)")
    sp.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                    help="model option, value parsed as a Python literal (repeatable)")
    common(sp)
    sp.set_defaults(func=cmd_verify)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    try:
        code, payload, text = args.func(args)
    except Exception as e:
        if args.debug:
            raise
        first = str(e).splitlines()[0] if str(e) else ""
        # our own errors (bad input) are one line already; anything else is unforeseen: say so
        msg = first if isinstance(e, (CheckpointError, TypeError)) else \
            f"unexpected {type(e).__name__}: {first} (rerun with --debug for details)"
        print(f"error: {msg}", file=sys.stderr)
        if getattr(args, "json", False):
            print(json.dumps({"ok": False, "error": msg}))
        return BAD_INPUT
    if args.json:
        print(json.dumps(payload, default=str))
    else:
        print(text)
    return code


if __name__ == "__main__":
    sys.exit(main())
