"""r3.partial_results: the finished batches of an interrupted evaluation, read back by a rerun."""

import json

import pytest

from r3.errors import R3Error
from r3.partial_results import PartialResults, fingerprint, model_files


def test_batches_read_back_by_a_rerun_with_the_same_key(tmp_path, capsys):
    out = tmp_path / "sub" / "r.json"  # (its directory made by the first write, as the result's is)
    key = {"settings": {"seed": 0, "n": 4}, "data": fingerprint([{"q": 1}])}
    p = PartialResults(out, key)
    assert p.path == tmp_path / "sub" / "r.json.partial.jsonl" and not p.path.exists() and p.of("m") == {}
    p.add("m", 0, {"x": [1.5, True]})
    p.add("m", 1, {"x": [0.1, False]})
    p.add("n", 0, ["text"])
    again = PartialResults(out, json.loads(json.dumps(key)))
    assert again.of("m") == {0: {"x": [1.5, True]}, 1: {"x": [0.1, False]}} and again.of("n") == {0: ["text"]}
    assert "resuming: 3 finished batches read from" in capsys.readouterr().err
    again.add("n", 1, ["more"])  # appends after the earlier lines, no second header
    lines = p.path.read_text().splitlines()
    assert len(lines) == 5 and sum("r3_partial_results" in line for line in lines) == 1
    again.finish()
    assert not p.path.exists()
    again.finish()  # (nothing left to remove)


def test_other_inputs_start_over_naming_what_changed(tmp_path, capsys):
    out = tmp_path / "r.json"
    PartialResults(out, {"settings": {"seed": 0, "n": 4}, "models": ["a"]}).add("a", 0, 1)
    p = PartialResults(out, {"settings": {"seed": 1, "n": 4}, "models": ["b"]})
    assert p.of("a") == {} and not p.path.exists()
    assert "other inputs (models, settings.seed); starting over" in capsys.readouterr().err


def test_a_line_cut_short_is_dropped_and_appends_stay_whole(tmp_path, capsys):
    out = tmp_path / "r.json"
    p = PartialResults(out, {"k": 1})
    p.add("m", 0, "a")
    p.add("m", 1, "b")
    p.path.write_bytes(p.path.read_bytes()[:-5])
    again = PartialResults(out, {"k": 1})
    assert again.of("m") == {0: "a"} and "dropping the last line, cut short" in capsys.readouterr().err
    again.add("m", 1, "b")
    assert PartialResults(out, {"k": 1}).of("m") == {0: "a", 1: "b"}
    # the header itself cut short: nothing finished, a fresh start
    p.path.write_bytes(p.path.read_bytes()[:12])
    fresh = PartialResults(out, {"k": 1})
    assert fresh.of("m") == {} and not fresh.path.exists()
    fresh.add("m", 0, "a")
    assert PartialResults(out, {"k": 1}).of("m") == {0: "a"}


@pytest.mark.parametrize("text, message", [
    ("hello\n", "line 1: not valid JSON"),
    ("hello", "line 1: not valid JSON"),  # (not ours: not truncated)
    ('{"a": 1}\n', r"not a file of finished batches \(no r3_partial_results header\)"),
    ('{"r3_partial_results": 1, "key": {"k": 1}}\n{"unit": "m"}\n', "line 2: not a finished batch"),
])
def test_a_file_that_is_not_ours_is_refused_and_kept(tmp_path, text, message):
    path = tmp_path / "r.json.partial.jsonl"
    path.write_text(text)
    with pytest.raises(R3Error, match=message):
        PartialResults(tmp_path / "r.json", {"k": 1})
    assert path.read_text() == text


def test_model_files_change_with_the_weights(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"1234")
    before = model_files(str(d))
    assert before["spec"] == str(d.resolve()) and set(before["files"]) == {"config.json", "model.safetensors"}
    assert model_files(str(d)) == before
    (d / "model.safetensors").write_bytes(b"12345")
    assert model_files(str(d)) != before
    assert model_files("smollm2-135m")["spec"] == "smollm2-135m"
    assert fingerprint({"a": [1, 2]}) == fingerprint({"a": [1, 2]}) != fingerprint({"a": [2, 1]})
