"""safetensors as the installed library defines it: what ``safetensors.torch.save_file`` writes, anytopo reads
bit for bit (with and without torch), what anytopo writes, ``safe_open``/``load_file`` read bit for bit, for
every dtype the library can write; and a header the library refuses, anytopo refuses in one line.

The dtypes are enumerated from the library (``safetensors.torch._SIZE``, the table ``save_file`` sizes
tensors with), never listed here, so a safetensors upgrade that adds one fails these tests until anytopo's
table (``checkpoint.safetensors_io.CODES``) has it.
"""
from __future__ import annotations

import json
import struct

import pytest
import safetensors
import safetensors.torch as st
import torch
from safetensors import SafetensorError, TensorSpec, safe_open

import checkpoint
from checkpoint.safetensors_io import CODE_OF_NAME, CODES
from checkpoint.errors import CheckpointError
from checkpoint.readers import read_source
from _ckpt_testlib import assert_one_line_error, run_cli
from test_ckpt_torchfree import run_without_torch

WRITABLE = sorted((d for d in st._SIZE if d is not None), key=str)  # every dtype save_file can store
SHAPES = [(), (0,), (3, 0), (5,), (2, 3, 4)]


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _raw(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, so NaN payloads, -0.0 and packed values compare exactly."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def random_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Every writable dtype at every shape (0-d, empty, 1-d, 3-d), random bytes: NaNs and infinities included."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for dtype in WRITABLE:
        for shape in SHAPES:
            if not shape and CODES[CODE_OF_NAME[_name(dtype)]][2] != 1:
                continue  # packed (float4 x2): safetensors cannot store a 0-d one (save_file refuses it too)
            n = torch.Size(shape).numel() * st._SIZE[dtype]
            high = 2 if dtype == torch.bool else 256  # a bool byte other than 0/1 is not a bool
            t = torch.randint(0, high, (n,), dtype=torch.uint8, generator=g).view(dtype).reshape(shape)
            sd[f"{_name(dtype)}.{'x'.join(map(str, shape)) or 'scalar'}"] = t
    return sd


METADATA = {"producer": "conformance", "note": "é ✓ \"quoted\""}


def assert_same_bits(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for k, w in want.items():
        g = got[k]
        assert (g.dtype, tuple(g.shape)) == (w.dtype, tuple(w.shape)), k
        assert torch.equal(_raw(g), _raw(w)), k


def test_the_dtype_table_is_the_librarys():
    """Names, codes, sizes and packing of anytopo's torch-free table against the installed safetensors."""
    assert len(WRITABLE) >= 20, WRITABLE  # 0.8: bool, 4 ints, 3 uints + uint8, 4 floats, 5 float8, float4, c64
    for dtype in WRITABLE:
        name = _name(dtype)
        spec = TensorSpec(dtype=name, shape=[2, 4], data_ptr=0, data_len=0)  # the library's name -> code, torch-free
        assert CODE_OF_NAME.get(name) == spec.dtype, (name, spec.dtype)
        _, itemsize, pack = CODES[spec.dtype]
        assert itemsize == st._SIZE[dtype] == dtype.itemsize, name
        assert spec.shape == [2, 4 * pack], name  # the header counts packed values (float4 x2: two per byte)
        if spec.dtype in st._TYPES:
            assert st._TYPES[spec.dtype] == dtype
    assert set(CODES) == {CODE_OF_NAME[_name(d)] for d in WRITABLE}  # nothing anytopo writes that it cannot
    for code, (_, itemsize, pack) in CODES.items():  # ...and the library's parser sizes each code the same way
        data = b"\x01" * (4 * itemsize)
        raw = json.dumps({"t": {"dtype": code, "shape": [2, 2 * pack], "data_offsets": [0, len(data)]}}).encode()
        (name, info), = safetensors.deserialize(struct.pack("<Q", len(raw)) + raw + data)
        assert info["dtype"] == code and len(info["data"]) == len(data)


def test_library_writes_anytopo_reads_bit_identical(tmp_path):
    sd = random_state()
    path = tmp_path / "lib.safetensors"
    st.save_file(sd, path, metadata=METADATA)
    assert_same_bits(checkpoint.load_state_dict(path), sd)
    src = read_source(path)  # the torch-free reader: dtype names and shapes without reading a byte
    assert {k: (s.dtype_name, tuple(s.shape)) for k, s in src.tensors.items()} == \
        {k: (_name(t.dtype), tuple(t.shape)) for k, t in sd.items()}
    assert sum(s.nbytes for s in src.tensors.values()) == sum(t.numel() * t.element_size() for t in sd.values())
    # convert and inspect in a process where `import torch` fails, read back by the library
    proc = run_without_torch("convert", path, tmp_path / "conv.safetensors")
    assert proc.returncode == 0, proc.stderr
    assert_same_bits(st.load_file(tmp_path / "conv.safetensors"), sd)
    info = run_without_torch("inspect", path, "--json")
    assert info.returncode == 0, info.stderr
    listed = {t["name"]: (t["dtype"], tuple(t["shape"])) for t in json.loads(info.stdout)["tensors"]}
    assert listed == {k: (_name(t.dtype), tuple(t.shape)) for k, t in sd.items()}


def test_anytopo_writes_library_reads_bit_identical(tmp_path):
    sd = random_state(seed=1)
    path = checkpoint.save(sd, tmp_path / "ours.safetensors", metadata={"model": "none", "step": 3})
    assert_same_bits(st.load_file(path), sd)
    with safe_open(path, framework="pt") as f:
        assert_same_bits({k: f.get_tensor(k) for k in f.keys()}, sd)
        meta = f.metadata()
    assert json.loads(meta["anytopo"])["step"] == 3 and meta["format"] == "pt"
    # convert's file-to-file copy of a library-written file is read back by the library too
    st.save_file(sd, tmp_path / "lib.safetensors", metadata=METADATA)
    checkpoint_dir = tmp_path / "sharded"
    assert run_cli("convert", tmp_path / "lib.safetensors", checkpoint_dir, "--max-shard-size", "2KB").returncode == 0
    back = {}
    for shard in sorted(checkpoint_dir.glob("*.safetensors")):
        back.update(st.load_file(shard))
    assert_same_bits(back, sd)


def test_anytopo_refuses_what_it_cannot_store_as_the_library_does(tmp_path):
    with pytest.raises(SafetensorError):
        st.save_file({"x": torch.zeros((), dtype=torch.float4_e2m1fn_x2)}, tmp_path / "lib.safetensors")
    with pytest.raises(CheckpointError, match="0-d float4_e2m1fn_x2"):
        checkpoint.save({"x": torch.zeros((), dtype=torch.float4_e2m1fn_x2)}, tmp_path / "ours.safetensors")
    assert not (tmp_path / "ours.safetensors").exists()


# ---------------------------------------------------------------------------------------- headers

def _file(header: dict, data: bytes, *, pad: bool = True) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8 if pad else 0)
    return struct.pack("<Q", len(raw)) + raw + data


def _t(begin: int, end: int, shape=(1,), dtype="F32") -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}


MALFORMED = {
    "overlapping-offsets": _file({"a": _t(0, 8, (2,)), "b": _t(4, 12, (2,))}, bytes(12)),
    "gap-between-tensors": _file({"a": _t(0, 4), "b": _t(8, 12)}, bytes(12)),
    "out-of-bounds": _file({"a": _t(0, 4), "b": _t(4, 8)}, bytes(6)),
    "bytes-after-the-last-tensor": _file({"a": _t(0, 4)}, bytes(8)),
    "unknown-dtype": _file({"a": _t(0, 4, dtype="F128")}, bytes(4)),
    "nbytes-not-shape-times-size": _file({"a": _t(0, 8, (3,))}, bytes(8)),
    "end-before-begin": _file({"a": _t(4, 0)}, bytes(4)),
    "negative-dimension": _file({"a": _t(0, 4, (-1,))}, bytes(4)),
    "metadata-not-strings": _file({"__metadata__": {"step": 3}, "a": _t(0, 4)}, bytes(4)),
    "header-not-an-object": _file([], b""),  # type: ignore[arg-type]
    "shape-overflows": _file({"a": _t(0, 4, (2 ** 40, 2 ** 40))}, bytes(4)),
    "header-over-the-size-limit": struct.pack("<Q", 100_000_001) + b"{}" + bytes(100),
}
# Files the library accepts although a stricter reader might not: anytopo must read them too.
ACCEPTED = {
    "offsets-not-in-key-order": _file({"b": _t(4, 8), "a": _t(0, 4)}, bytes(8)),
    "unknown-field-in-entry": _file({"a": {**_t(0, 4), "extra": 1}}, bytes(4)),
    "null-metadata": _file({"__metadata__": None, "a": _t(0, 4)}, bytes(4)),
    "unpadded-header": _file({"a": _t(0, 4)}, bytes(4), pad=False),
    "whitespace-before-the-header": struct.pack("<Q", 64) + b"  " + json.dumps({"a": _t(0, 4)}).encode().ljust(62)
    + bytes(4),
    "empty-tensor-between": _file({"a": _t(0, 4), "e": _t(4, 4, (0, 3)), "b": _t(4, 8)}, bytes(8)),
    "no-tensors": _file({"__metadata__": {"k": "v"}}, b""),
}


def _library_accepts(path) -> bool:
    try:
        with safe_open(path, framework="numpy"):
            return True
    except SafetensorError:
        return False


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_headers_the_library_refuses_are_refused_in_one_line(tmp_path, case):
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(MALFORMED[case])
    assert not _library_accepts(path)
    with pytest.raises(CheckpointError) as e:
        checkpoint.load_state_dict(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value), str(e.value)
    line = assert_one_line_error(run_cli("inspect", path), path.name)
    assert "damaged" in line or "truncated" in line, line


@pytest.mark.parametrize("case", sorted(ACCEPTED))
def test_headers_the_library_accepts_are_read(tmp_path, case):
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(ACCEPTED[case])
    assert _library_accepts(path)
    got = checkpoint.load_state_dict(path)
    assert_same_bits(got, st.load_file(path))
