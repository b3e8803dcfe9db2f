"""Cross-device checkpoint check for bench/gpu_check.sh: outputs on the saving device vs on CPU.

    python bench/_xdevice_check.py reference CKPT REF.pt [--device cuda]   # in the GPU process
    CUDA_VISIBLE_DEVICES= python bench/_xdevice_check.py compare CKPT REF.pt   # in a CPU-only process

``reference`` builds the model the checkpoint's manifest names, loads the checkpoint strictly onto
``--device``, runs one eval-mode forward on fixed inputs (``models.example_inputs``, batch 4) and saves
inputs and outputs (on CPU) to REF.pt. ``compare`` does the same on CPU in a process where CUDA is not
visible and compares with REF.pt. TF32 is disabled on the GPU side so fp32 results agree to ~1e-5.
Prints one JSON line; exit 0 when the outputs agree (``--atol``/``--rtol``, default 1e-3), 1 when they
do not. Both phases also run on a CPU-only machine (``--device cpu``), which is how this is tested.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

import checkpoint
import models


def build(ckpt: str, device: str) -> tuple[torch.nn.Module, str, dict]:
    manifest = checkpoint.read_manifest(ckpt) or {}
    name, options = manifest.get("model"), dict(manifest.get("model_options") or {})
    if not name:
        raise SystemExit(f"error: {ckpt} has no manifest naming its model")
    options.pop("weights", None)
    model = models.build_model(name, **options)
    report = checkpoint.load(ckpt, model, strict=True, device=device)
    return model.eval(), str(report).splitlines()[0], manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("phase", choices=["reference", "compare"])
    p.add_argument("ckpt")
    p.add_argument("ref")
    p.add_argument("--device", default=None, help="reference: cuda (default when available) or cpu")
    p.add_argument("--atol", type=float, default=1e-3)
    p.add_argument("--rtol", type=float, default=1e-3)
    args = p.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if args.phase == "reference":
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, line, manifest = build(args.ckpt, device)
        name, options = manifest["model"], dict(manifest.get("model_options") or {})
        options.pop("weights", None)
        inputs = models.example_inputs(name, 4, **options)
        with torch.no_grad():
            out = model(*(x.to(device) for x in inputs))
        out = out[0] if isinstance(out, (tuple, list)) else out
        torch.save({"inputs": inputs, "output": out.float().cpu(), "device": device,
                    "saved_on": (manifest.get("topology") or {}).get("device_type")}, args.ref)
        print(json.dumps({"phase": "reference", "device": device, "load": line,
                          "saved_on": (manifest.get("topology") or {}).get("device_type"),
                          "output_shape": list(out.shape)}))
        return 0
    ref = torch.load(args.ref, weights_only=True)
    model, line, _ = build(args.ckpt, "cpu")
    with torch.no_grad():
        out = model(*ref["inputs"])
    out = (out[0] if isinstance(out, (tuple, list)) else out).float()
    diff = (out - ref["output"]).abs().max().item()
    ok = bool(torch.allclose(out, ref["output"], atol=args.atol, rtol=args.rtol))
    print(json.dumps({"phase": "compare", "cuda_visible": torch.cuda.is_available(), "reference_device": ref["device"],
                      "saved_on": ref["saved_on"], "load": line, "max_abs_diff": diff, "ok": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
