"""r3.gguf_file against the gguf package's reader: the same metadata and tensor data on the
built-in model and on a file with every value type, and a clear GGUFError (never another
exception, never a hang) on files cut short or corrupted."""

import random
import struct

import numpy as np
import pytest

from r3 import checkpoint
from r3.errors import R3Error
from r3.gguf_file import GGUFError, read_gguf


def _same_as_gguf(path):
    from gguf import GGUFReader

    ours, ref = read_gguf(path), GGUFReader(str(path))
    keys = [k for k in ref.fields if not k.startswith("GGUF.")]
    assert list(ours.fields) == keys
    for k in keys:
        want, got = ref.fields[k].contents(), ours.fields[k]
        if isinstance(got, np.ndarray):
            got = got.tolist()
        assert got == want, k
        if not isinstance(want, list):
            assert type(got) is type(want), k
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(ref.tensors, ours.tensors):
        assert b.tensor_type == a.tensor_type and b.shape == tuple(a.shape.tolist()), a.name
        assert b.data.shape == a.data.shape and b.data.dtype == a.data.dtype, a.name
        assert np.array_equal(np.asarray(a.data), b.data), a.name
    return ours


def test_builtin_model_reads_as_gguf_reads_it():
    f = _same_as_gguf(checkpoint.builtin_gguf("smollm2-135m"))
    assert len(f.fields["tokenizer.ggml.tokens"]) == 49152 and f.fields["tokenizer.ggml.tokens"][2] == "<|im_end|>"
    assert f.fields["general.architecture"] == "llama" and len(f.tensors) == 272


def _write(path, alignment=None):
    """A small GGUF file with every metadata value type and plain, bf16 and quantised tensors."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    if alignment:
        w.add_custom_alignment(alignment)
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -5)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 0.25)
    w.add_uint64("t.u64", 2**60)
    w.add_int64("t.i64", -(2**60))
    w.add_float64("t.f64", 1e-300)
    w.add_bool("t.yes", True)
    w.add_bool("t.no", False)
    w.add_string("t.str", "héllo ▁world")
    w.add_string("t.empty", "")
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.5, 1.5])
    w.add_array("t.strs", ["a", "", "ü", "<|im_end|>"])
    w.add_array("t.bools", [True, False])
    w.add_array("t.none", [])
    rng = np.random.default_rng(0)
    w.add_tensor("f32", rng.standard_normal((3, 5)).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal((2, 4)).astype(np.float16))
    w.add_tensor("i32", np.arange(7, dtype=np.int32))
    w.add_tensor("vec", rng.standard_normal(64).astype(np.float32))
    x = rng.standard_normal((4, 64)).astype(np.float32)
    for qt in (gguf.GGMLQuantizationType.BF16, gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_1):
        q = gguf.quants.quantize(x, qt)
        w.add_tensor(qt.name.lower(), q, raw_shape=q.shape, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return x


@pytest.mark.parametrize("alignment", [None, 64])
def test_every_value_type_and_tensor_type_reads_as_gguf_reads_it(tmp_path, alignment):
    import gguf

    path = tmp_path / "t.gguf"
    x = _write(path, alignment)
    f = _same_as_gguf(path)
    assert f.fields["t.str"] == "héllo ▁world" and f.fields["t.yes"] is True and f.fields["t.u64"] == 2**60
    assert f.fields["t.strs"] == ["a", "", "ü", "<|im_end|>"] and f.fields["t.ints"].tolist() == [1, -2, 3]
    assert f.fields["t.bools"].dtype == np.bool_ and f.fields["t.bools"].tolist() == [True, False]
    t = {t.name: t for t in f.tensors}
    assert t["f32"].shape == (5, 3) and t["f32"].data.shape == (3, 5) and t["vec"].shape == (64,)
    for name in ("bf16", "q8_0", "q4_1"):  # the data are what gguf's dequantiser takes
        back = gguf.quants.dequantize(t[name].data, t[name].tensor_type)
        assert back.shape == x.shape and np.abs(back - x).max() < (0.3 if name == "q4_1" else 0.05), name
    assert not t["f32"].data.flags.writeable  # a view of the file, copied only where it is used


def test_a_file_cut_anywhere_is_a_gguf_error(tmp_path):
    src = tmp_path / "t.gguf"
    _write(src)
    data = src.read_bytes()
    end_of_tables = len(data) - 4 * 64 * 4  # (well inside the tensor data)
    bad = tmp_path / "cut.gguf"
    for n in sorted(set(range(0, 64)) | set(range(64, end_of_tables, 7)) | {len(data) - 1}):
        bad.write_bytes(data[:n])
        with pytest.raises(GGUFError):
            read_gguf(bad)


def test_corrupted_headers_raise_gguf_errors_or_read(tmp_path):
    """Random byte changes in the header and tables: each read either succeeds or raises a
    GGUFError (huge counts and lengths are caught before anything is allocated)."""
    src = tmp_path / "t.gguf"
    _write(src)
    data = src.read_bytes()
    header = read_gguf(src)
    end = min(len(data), 2048)
    bad = tmp_path / "bad.gguf"
    rng = random.Random(0)
    errors = 0
    for _ in range(300):
        b = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(end)] = rng.choice([0, 0xFF, 0x7F, rng.randrange(256)])
        bad.write_bytes(bytes(b))
        try:
            read_gguf(bad)
        except GGUFError:
            errors += 1
    assert 0 < errors < 300 and len(header.tensors) == 7


@pytest.mark.parametrize("head, match", [
    (b"GGML" + struct.pack("<I", 3), "bad magic"),
    (b"GGUF" + struct.pack("<I", 1) + bytes(16), "version 1 is not supported"),
    (b"GGUF" + struct.pack(">I", 3) + bytes(16), "big-endian"),
    (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 3) + b"key" + struct.pack("<I", 77), "unknown metadata value type 77"),
    (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1 << 40) + b"key", "runs past the end"),
    (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, 8, 1 << 50), "runs past the end"),
    (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, 5, 1 << 50), "runs past the end"),
    (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 2) + b"\xff\xfe" + struct.pack("<I", 7) + b"\x01", "not UTF-8"),
    (b"", "empty file"),
])
def test_malformed_files_say_what_is_wrong(tmp_path, head, match):
    path = tmp_path / "m.gguf"
    path.write_bytes(head)
    with pytest.raises(GGUFError, match=match):
        read_gguf(path)
    with pytest.raises(R3Error, match=rf"m.gguf: corrupt or unreadable GGUF file \(.*{match}"):
        checkpoint.load(path, tokenizer=False)


def test_tensor_table_checks(tmp_path):
    """A duplicated tensor name, an unknown type, data past the end and a bad alignment."""
    def file(tensors, fields=b"", n_fields=0):
        out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), n_fields) + fields
        for name, dims, kind, offset in tensors:
            out += struct.pack("<Q", len(name)) + name + struct.pack("<I", len(dims))
            out += struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", kind, offset)
        return out + bytes(-len(out) % 32) + bytes(64)

    cases = [
        (file([(b"a", (4,), 0, 0), (b"a", (4,), 0, 16)]), "tensor 'a' appears twice"),
        (file([(b"a", (4,), 99, 0)]), "unknown type 99"),
        (file([(b"a", (32,), 0, 0)]), "tensor 'a' runs past the end"),
        (file([(b"a", (1 << 62, 1 << 62), 0, 0)]), "tensor 'a' runs past the end"),
        (file([(b"a", (5,), 8, 0)]), "not whole Q8_0 blocks"),
        (file([(b"a", (1,) * 9, 0, 0)]), "9 dimensions"),
        (file([], struct.pack("<Q", 17) + b"general.alignment" + struct.pack("<II", 4, 24), 1), "not a power of two"),
        (file([], struct.pack("<Q", 17) + b"general.alignment" + struct.pack("<II", 4, 0), 1), "alignment 0 is not"),
        (file([], struct.pack("<Q", 17) + b"general.alignment" + struct.pack("<If", 6, 32.0), 1), "alignment 32.0 is not"),
    ]
    path = tmp_path / "t.gguf"
    for data, match in cases:
        path.write_bytes(data)
        with pytest.raises(GGUFError, match=match):
            read_gguf(path)
    path.write_bytes(file([(b"a", (4,), 0, 0), (b"b", (2, 2), 0, 16), (b"c", (0,), 0, 64)]))
    f = read_gguf(path)
    assert [(t.name, t.shape, t.data.shape) for t in f.tensors] == [("a", (4,), (4,)), ("b", (2, 2), (2, 2)),
                                                                    ("c", (0,), (0,))]
    path.write_bytes(file([(b"a", (1,) * 8, 0, 0)]))  # (as many dimensions as GGUF allows)
    assert read_gguf(path).tensors[0].data.shape == (1,) * 8


def _kv_file(*fields: bytes) -> bytes:
    """A GGUF file without tensors whose metadata are ``fields`` (each key, type and value, encoded)."""
    return b"GGUF" + struct.pack("<IQQ", 3, 0, len(fields)) + b"".join(fields)


def _key(name: bytes) -> bytes:
    return struct.pack("<Q", len(name)) + name


def test_strings_inside_arrays_that_are_not_utf8_read_with_replacement_characters(tmp_path):
    """A vocabulary may hold pieces that are not whole UTF-8 (a split multi-byte character): they
    read with U+FFFD instead of refusing the model; a string value of its own must still be UTF-8."""
    path = tmp_path / "t.gguf"
    items = [b"a", b"\xff", b"\xe2\x96"]
    array = struct.pack("<IIQ", 9, 8, len(items)) + b"".join(struct.pack("<Q", len(s)) + s for s in items)
    path.write_bytes(_kv_file(_key(b"tokenizer.ggml.tokens") + array))
    assert read_gguf(path).fields == {"tokenizer.ggml.tokens": ["a", "\ufffd", "\ufffd"]}
    path.write_bytes(_kv_file(_key(b"general.name") + struct.pack("<IQ", 8, 1) + b"\xff"))
    with pytest.raises(GGUFError, match="is not UTF-8"):
        read_gguf(path)


def test_a_metadata_key_given_twice_is_a_gguf_error(tmp_path):
    """A repeated key would silently keep one of two values: refused, naming the key."""
    path = tmp_path / "t.gguf"
    field = _key(b"general.alignment") + struct.pack("<II", 4, 32)
    path.write_bytes(_kv_file(field, _key(b"general.name") + struct.pack("<IQ", 8, 1) + b"x"))
    assert read_gguf(path).fields == {"general.alignment": 32, "general.name": "x"}
    path.write_bytes(_kv_file(field, field))
    with pytest.raises(GGUFError, match="metadata key 'general.alignment' appears twice"):
        read_gguf(path)


def test_a_version_2_file_reads_as_version_3(tmp_path):
    """Version 2 has version 3's layout (64-bit counts and lengths; 3 only added big-endian files):
    the same file stamped version 2 reads alike."""
    src, v2 = tmp_path / "t.gguf", tmp_path / "v2.gguf"
    _write(src)
    data = bytearray(src.read_bytes())
    data[4:8] = struct.pack("<I", 2)
    v2.write_bytes(bytes(data))
    a, b = read_gguf(src), read_gguf(v2)
    assert (a.version, b.version) == (3, 2) and list(b.fields) == list(a.fields)
    assert [(t.name, t.tensor_type, t.shape) for t in b.tensors] == [(t.name, t.tensor_type, t.shape) for t in a.tensors]
    assert all(np.array_equal(x.data, y.data) for x, y in zip(a.tensors, b.tensors))


def test_integer_and_f64_tensors_read_typed(tmp_path):
    """i8, i16, i64 and f64 tensors read as typed elements of their own width and sign, as gguf reads them."""
    import gguf

    path = tmp_path / "t.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    arrays = {"i8": np.array([-3, 7], np.int8), "i16": np.array([[-300, 2], [5, 30000]], np.int16),
              "i64": np.array([-(2**40), 1], np.int64), "f64": np.array([1e-300, -2.5], np.float64)}
    for name, arr in arrays.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f = _same_as_gguf(path)
    for t in f.tensors:
        assert t.data.dtype == arrays[t.name].dtype and np.array_equal(t.data, arrays[t.name]), t.name


def test_arrays_of_arrays_are_refused_at_any_depth(tmp_path):
    """An array whose items are arrays (no model r3 reads has one) is a GGUFError naming the item
    type, also nested thousands deep (never a RecursionError)."""
    path = tmp_path / "t.gguf"
    inner = struct.pack("<IQ", 4, 1) + struct.pack("<I", 7)
    path.write_bytes(_kv_file(_key(b"k") + struct.pack("<IIQ", 9, 9, 1) + inner))
    with pytest.raises(GGUFError, match="unknown metadata value type 9"):
        read_gguf(path)
    path.write_bytes(_kv_file(_key(b"k") + struct.pack("<IIQ", 9, 9, 1) * 5000 + inner))
    with pytest.raises(GGUFError, match="unknown metadata value type 9"):
        read_gguf(path)
