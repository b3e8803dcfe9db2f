"""``anytopo-ckpt`` / ``python -m checkpoint``: inspect, convert, diff, verify.

Exit codes: 0 ok; 1 a difference or a failed verification; 2 bad input or usage; 3 an internal error (a bug:
the message says so). Errors are one line on stderr naming the problem and the fix; tracebacks only with
``--debug``. ``--json`` prints exactly one JSON object on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from .describe import inspect
from .errors import CheckpointError, and_more, first_line
from .keys import wrapper_prefix
from .plan import LoadReport, plan_load, strict_error
from .manifest import MANIFEST, POINTER, TOPOLOGY, Manifest, build_manifest, is_ours
from .objstore import as_path, is_url
from .rank_files import attach_state_shards, materialize_sources
from .readers import read_source
from .safetensors_io import TensorSource
from .sources import Source, check_integrity, group_tied
from .states import STATE_JSON, STATE_PICKLE, STATE_TENSORS, read_states, state_files
from .storage import read_json
from .torchfiles import sniff
from .writer import TORCH_SUFFIXES, parse_size, write_checkpoint

# torch is imported by the commands that hold tensors (diff, verify, and reading .pth/DCP sources);
# `inspect` and `convert` of safetensors checkpoints run without it, in a small resident set.

OK, DIFFERENT, BAD_INPUT, INTERNAL_ERROR = 0, 1, 2, 3


# ------------------------------------------------------------------------------------------ commands

def _stripped_line(prefix: str, reasons: list[str]) -> list[str]:
    return [f"  keys: stripped {prefix!r} ({'; '.join(reasons)}); --keep-prefix keeps it"] if prefix else []


def cmd_inspect(args: argparse.Namespace) -> tuple[int, dict[str, Any], str]:
    info = inspect(args.path, ema=args.ema, allow_pickle=args.allow_pickle, keep_prefix=args.keep_prefix)
    lines = [f"{info['path']}: {info['format']}, {info['num_tensors']} tensors, "
             f"{info['num_elements']:,} elements, {info['bytes']:,} bytes",
             f"  dtypes: {info['dtypes']}"]
    lines += _stripped_line(info["prefix_stripped"], info["prefix_reasons"])
    if info["prefixes"]:
        lines.append(f"  key prefixes: {info['prefixes']}")
    if info["other_entries"]:
        lines.append(f"  non-tensor entries: {info['other_entries']}")
    m = info["manifest"] or {}
    if m:
        t = m.get(TOPOLOGY) or {}
        lines.append(f"  manifest: model={m.get('model')} options={m.get('model_options')} step={m.get('step')} "
                     f"epoch={m.get('epoch')} saved by {t.get('strategy')} x{t.get('world_size')} on {t.get('device_type')}")
    else:
        lines.append("  manifest: none (not written by anytopo)")
    lines += [f"  {c}" for c in info["integrity"]] + [f"  note: {n}" for n in info["notes"]]
    shown = info["tensors"][: args.limit]
    lines += [f"  {t['name']}: {t['dtype']} {t['shape']}" for t in shown]
    if len(info["tensors"]) > len(shown):
        lines.append(f"  ... and {len(info['tensors']) - len(shown)} more (--limit N)")
    return OK, info, "\n".join(lines)


def _without_model(args: argparse.Namespace, src: Source) -> tuple[dict[str, TensorSource], str, list[str]]:
    """The file's keys minus ``--prefix`` and the prefix wrappers put on every key (unless --keep-prefix)."""
    tensors = dict(src.tensors)
    if args.keep_prefix:
        return tensors, "", []
    stripped, reasons, fmt = "", [], src.format
    if args.prefix:
        if not all(k.startswith(args.prefix) for k in tensors):
            raise CheckpointError(f"--prefix {args.prefix!r} is not on every key; check `anytopo-ckpt inspect {args.src}`")
        tensors = {k[len(args.prefix):]: v for k, v in tensors.items()}
        stripped, reasons, fmt = args.prefix, [f"{args.prefix!r}: --prefix"], ""  # the user chose the attribute
    common, why = wrapper_prefix(tensors, fmt)
    return {k[len(common):]: v for k, v in tensors.items()}, stripped + common, reasons + why


def _build_meta_model(name: str, options: dict[str, Any]):
    """``models.build_model`` on the meta device (no memory, no init cost) where the model allows it,
    and all its options (defaults filled in, for the manifest)."""
    import dataclasses

    import models  # the registry: only the commands given --model need it
    import torch

    try:
        full = dataclasses.asdict(models.get_config(name, **options))
        with torch.device("meta"):
            return models.build_model(name, **full), full
    except ValueError as e:
        raise CheckpointError(f"cannot build model {name!r}: {e}") from None
    except (RuntimeError, NotImplementedError):  # an init that needs real memory: build it for real
        return models.build_model(name, **full), full


def _model_options(args: argparse.Namespace) -> dict[str, Any]:
    import models

    try:
        return models.parse_model_args(args.model_arg)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def _for_model(args: argparse.Namespace, src: Source) -> tuple[dict[str, TensorSource], str, list[str], dict[str, Any]]:
    """The file's tensors under the keys of model ``--model``, matched exactly as ``checkpoint.load`` matches
    them; anything that does not fit (missing, left over, another shape) is refused, listed."""
    name = args.model
    model, options = _build_meta_model(name, _model_options(args))
    target = model.state_dict()
    report = LoadReport(str(args.src), src.format, True, "meta", source_model=(src.manifest or {}).get("model"))
    pairs = plan_load(src, target, report, prefix=args.prefix)
    if not report.ok:
        raise strict_error(report, name, instead="convert without --model to keep the file's keys")
    km_strip, km_add = report.prefix_stripped, report.prefix_added
    change = [f"stripped {km_strip!r}"] * bool(km_strip) + [f"added {km_add!r}"] * bool(km_add)
    reasons = [f"matched to {name}: {', '.join(change) or 'keys already fit'}"]
    return {t: src.tensors[k] for t, k, _ in pairs}, km_strip, reasons, {"model": name, "model_options": options}


def cmd_convert(args: argparse.Namespace) -> tuple[int, dict[str, Any], str]:
    if args.keep_prefix and (args.prefix or args.model):
        raise CheckpointError("--keep-prefix keeps the file's keys as they are; drop --prefix/--model, or drop --keep-prefix")
    if is_url(args.dst):
        raise CheckpointError(f"convert writes to a local path, not {args.dst}; convert to a local file or folder "
                              "(training saves go to a store with --checkpoint-dir s3://...)")
    src = read_source(args.src, ema=args.ema, allow_pickle=args.allow_pickle)
    dst = Path(args.dst)
    check_destination(as_path(args.src), src.path, dst, overwrite=args.overwrite)  # before the (long) hashing
    # an entry's other states go along (not with --ema: the EMA weights are not what its optimizer state belongs to)
    states, dropped = ({}, []) if args.ema else entry_states(src.path, src.manifest or {}, dst, args.format)
    checks = check_integrity(src, hashes=True)
    m = src.manifest or {}
    meta = {key: m[key] for key in ("model", "model_options", "step", "epoch") if m.get(key) is not None}
    if args.model:
        tensors, stripped, reasons, model_meta = _for_model(args, src)
        meta.update(model_meta)
    else:
        tensors, stripped, reasons = _without_model(args, src)
    if args.layout == "dp":
        tensors = {"module." + k: v for k, v in tensors.items()}
    stored, aliases = group_tied(tensors)  # tied entries are written once and recorded as aliases
    meta[TOPOLOGY] = m.get(TOPOLOGY) or {"strategy": "unknown", "world_size": None, "device_type": "unknown"}
    meta["converted_from"] = {"path": str(args.src), "format": src.format, "prefix_stripped": stripped,
                              "prefix_reasons": reasons}
    meta["layout"] = args.layout
    manifest = build_manifest(stored, aliases, {}, meta)
    if states:  # a training entry stays one: its optimizer/scheduler/trainer state goes along
        manifest["kind"], manifest["components"] = "entry", m.get("components")
    fmt = args.format
    if fmt is None and dst.suffix == "":
        fmt = "safetensors"
    write_checkpoint(dst, list(stored.items()), manifest, max_shard_size=parse_size(args.max_shard_size), fmt=fmt,
                     extra_files=states)
    out = {"src": str(args.src), "dst": str(dst), "source_format": src.format, "tensors": len(stored) + len(aliases),
           "bytes": manifest["total_bytes"], "prefix_stripped": stripped, "prefix_reasons": reasons,
           "model": args.model, "layout": args.layout, "checks": checks,
           "states_kept": sorted(states), "states_dropped": dropped}
    lines = [f"wrote {dst} ({out['tensors']} tensors, {out['bytes']:,} bytes) from {src.format}"
             + (", layout dp" if args.layout == "dp" else "")
             + (f", kept the entry's {', '.join(m.get('components') or [])} state" if states else "")
             + (f"; dropped {', '.join(dropped)} state: a single file holds weights only, "
                "convert to a directory to keep it" if dropped else "")]
    if args.model:
        lines.append(f"  keys: {reasons[0]}")
    else:
        lines += _stripped_line(stripped, reasons)
    return OK, out, "\n".join(lines)


def check_destination(src_arg: Path, src_path: Path, dst: Path, *, overwrite: bool) -> None:
    """Refuse a ``convert`` destination whose replacement would lose something convert did not write.

    Allowed: a new path, an empty directory, or an existing checkpoint of the same kind (a weights file,
    or a checkpoint directory holding nothing but its manifest's files). Refused: the source itself (or a
    directory holding it), a path under a regular file, and, unless ``overwrite``, anything else that exists.
    """
    for parent in dst.parents:
        if parent.exists():
            if not parent.is_dir():
                raise CheckpointError(f"cannot write {dst}: {parent} is a regular file, not a directory; "
                                      "choose a destination under a directory")
            break
    dst_r = dst.resolve()
    for s in {p.resolve() for p in (src_arg, src_path) if not is_url(p)}:  # a local dst never holds an object
        if dst_r == s or dst_r in s.parents or (s.is_dir() and s in dst_r.parents):
            raise CheckpointError(f"{dst} is the source {src_arg}, holds it or lies inside it: converting there "
                                  "would change what is being read; write to another path, then move it")
    if not dst.exists() and not dst.is_symlink():
        return
    if dst.is_dir():
        wants_file = dst.suffix.lower() == ".safetensors" or dst.suffix.lower() in TORCH_SUFFIXES
        if wants_file:
            raise CheckpointError(f"{dst} is a directory but its suffix asks for a single file; "
                                  "choose another destination")
        contents = {p.name for p in dst.iterdir()}
        if not contents or overwrite:
            return
        try:
            m = read_json(dst / MANIFEST) if MANIFEST in contents else None
        except CheckpointError:
            m = None
        if is_ours(m) and contents <= {MANIFEST, *(m.get("files") or {})}:
            return  # a checkpoint directory and nothing else: replaced whole, as the user asked
        kind = "a directory of checkpoints (a run's `latest` and entries)" if POINTER in contents else \
            f"a directory that is not a checkpoint ({len(contents)} entries)"
        raise CheckpointError(f"{dst} exists and is {kind}; converting would delete it: pass --overwrite "
                              "to replace it, or choose a new destination")
    if dst.is_file():
        if overwrite or sniff(dst) in ("safetensors", "zip"):
            return  # a weights file is replaced atomically, like any save
        raise CheckpointError(f"{dst} exists and is not a checkpoint; converting would replace it: pass "
                              "--overwrite, or choose a new destination")
    if not overwrite:
        raise CheckpointError(f"{dst} exists and is not a file or directory; choose a new destination")


def entry_states(src_path: Path, manifest: dict[str, Any], dst: Path, fmt: str | None) -> tuple[dict, list[str]]:
    """The non-model state files of a training-entry source, to copy into a directory destination.

    Returns (name -> writer function, components dropped). A single-file destination cannot hold them:
    they are dropped, and the caller says so.
    """
    m = Manifest(manifest)
    if not m.is_entry or not src_path.is_dir():
        return {}, []
    names = [n for n in (STATE_JSON, STATE_TENSORS, STATE_PICKLE) if n in m.files]
    if not names:
        return {}, []
    components = [c for c in m.components if c != "model"]
    if dst.suffix.lower() == ".safetensors" or dst.suffix.lower() in TORCH_SUFFIXES:
        return {}, components
    if (m.sharded or {}).get("states"):  # moments in the rank files: written whole, as any entry's
        return state_files(materialize_sources(attach_state_shards(src_path, manifest, read_states(src_path)))), []

    def copier(path: Path):
        def write(f) -> None:
            with path.open("rb") as src:  # a local file or an object (ranged GETs)
                while chunk := src.read(8 << 20):
                    f.write(chunk)
        return write

    return {n: copier(src_path / n) for n in names}, []


def cmd_diff(args: argparse.Namespace) -> tuple[int, dict[str, Any], str]:
    import torch

    from .loading import load_state_dict  # torch: only the commands that hold tensors import it

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
            text.append(f"  {name.replace('_', ' ')}: {len(out[name])}: {and_more(out[name], 6)}")
    return (OK if same else DIFFERENT), out, "\n".join(text)


def cmd_verify(args: argparse.Namespace) -> tuple[int, dict[str, Any], str]:
    import models  # only the commands given a model need the registry
    import torch

    from .loading import load  # torch: only the commands that hold tensors import it

    options = _model_options(args)
    name = args.model
    if name is None:
        m = read_source(args.path, ema=args.ema, allow_pickle=args.allow_pickle).manifest or {}
        if not m.get("model"):
            raise CheckpointError(f"{args.path} has no manifest naming its model; pass --model NAME "
                                  f"(one of {', '.join(models.list_models())})")
        name = m["model"]
        saved = dict(m.get("model_options") or {})
        saved.pop("weights", None)  # manifests written before checkpoint.load_pretrained listed the init file here
        options = {**saved, **options}
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

    def model_options(sp: argparse.ArgumentParser, help_model: str) -> None:
        sp.add_argument("--model", default=None, metavar="NAME", help=help_model)
        sp.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="model option, value parsed as a Python literal (repeatable)")

    def common(sp: argparse.ArgumentParser, ema: bool = True) -> None:
        sp.add_argument("--json", action="store_true", help="print one JSON object on stdout")
        sp.add_argument("--allow-pickle", action="store_true",
                        help="allow code-carrying pickles (whole pickled modules); only for files you trust")
        if ema:
            sp.add_argument("--ema", action="store_true", help="use the EMA weights where the file has them")
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")

    def keep_prefix(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--keep-prefix", action="store_true",
                        help="keep the keys exactly as the file has them (by default the prefix that wrappers put on "
                             "every key is stripped: module., _orig_mod., a Lightning module's only child, DCP's model.)")

    sp = sub.add_parser("inspect", help="describe a checkpoint")
    sp.add_argument("path")
    keep_prefix(sp)
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
    sp.add_argument("--prefix", default=None, help="strip this key prefix (e.g. 'student.'); with --model, use "
                                                       "it instead of searching, as checkpoint.load(prefix=) does")
    keep_prefix(sp)
    model_options(sp, "write the keys of this registry model, matched as checkpoint.load matches them")
    sp.add_argument("--overwrite", action="store_true",
                    help="replace an existing destination that is not a checkpoint (its contents are deleted)")
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
    model_options(sp, "registry name (default: from the manifest)")
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
        if isinstance(e, CheckpointError):  # bad input: the message names the problem and the fix
            code, msg = BAD_INPUT, first_line(e)
        elif isinstance(e, OSError):  # the file system refused (permissions, space, a path that vanished)
            code, msg = BAD_INPUT, f"{first_line(e)}; check the path, its permissions and the free space"
        else:  # anything else is a bug here, not a problem with the input: never dressed up as one
            code, msg = INTERNAL_ERROR, (f"internal error: {type(e).__name__}: {first_line(e)} "
                                         "(a bug in anytopo-ckpt; rerun with --debug for the traceback and report it)")
        print(f"error: {msg}", file=sys.stderr)
        if getattr(args, "json", False):
            print(json.dumps({"ok": False, "error": msg, "exit_code": code}))
        return code
    try:
        print(json.dumps(payload, default=str) if args.json else text)
        sys.stdout.flush()
    except BrokenPipeError:
        # the reader left (`... | head -2`): what it read stands, the exit code still says how it went;
        # point stdout at /dev/null so the interpreter's final flush does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return code


if __name__ == "__main__":
    sys.exit(main())
