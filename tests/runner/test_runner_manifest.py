"""The manifest: stable unique item names, what a resumed run redoes, and refusing to mix batches."""

import json

import pytest
from runner_helpers import write_png

from mv4d.runner.errors import RunnerError
from mv4d.runner.inputs import TAKES_IMAGE, discover_inputs
from mv4d.runner.manifest import Manifest

HASH = "ab" * 32


def open_manifest(output, overrides=None, workflow_hash=HASH, restart=False) -> Manifest:
    return Manifest.open(output, output.parent / "workflow.json", workflow_hash, overrides or {}, restart)


def test_names_come_from_the_inputs_and_are_made_unique(tmp_path):
    paths = [write_png(tmp_path / "a" / "cat.png"), write_png(tmp_path / "b" / "cat.png"), write_png(tmp_path / "cat-2.png"),
             write_png(tmp_path / "my photo (1).png")]
    manifest = open_manifest(tmp_path / "out")
    entries = manifest.entries_for(discover_inputs([str(path) for path in paths], TAKES_IMAGE))
    assert [entry["name"] for entry in entries] == ["cat", "cat-2", "cat-2-2", "my_photo_1"]
    assert [entry["status"] for entry in entries] == ["pending"] * 4


def test_names_stay_stable_when_a_run_adds_inputs(tmp_path):
    first, second = write_png(tmp_path / "x" / "cat.png"), write_png(tmp_path / "y" / "cat.png")
    manifest = open_manifest(tmp_path / "out")
    [entry] = manifest.entries_for(discover_inputs([str(second)], TAKES_IMAGE))
    manifest.save()
    again = open_manifest(tmp_path / "out")
    entries = again.entries_for(discover_inputs([str(first), str(second)], TAKES_IMAGE))
    assert [entry["name"] for entry in entries] == ["cat-2", "cat"]  # the input seen first keeps its name
    assert len(again.items) == 2


def done_entry(manifest: Manifest, path, files: dict[str, bytes]) -> dict:
    [entry] = manifest.entries_for(discover_inputs([str(path)], TAKES_IMAGE))
    entry["status"] = "done"
    for relative, content in files.items():
        (manifest.path.parent / relative).parent.mkdir(parents=True, exist_ok=True)
        (manifest.path.parent / relative).write_bytes(content)
        entry["files"].append({"path": relative, "bytes": len(content)})
    return entry


def test_done_items_are_intact_while_their_files_are(tmp_path):
    manifest = open_manifest(tmp_path / "out")
    entry = done_entry(manifest, write_png(tmp_path / "a.png"), {"a/x.png": b"12345", "a/sub/y.ply": b"ply"})
    assert manifest.is_intact(entry)
    (manifest.path.parent / "a/sub/y.ply").write_bytes(b"ply!")  # a different size: redo
    assert not manifest.is_intact(entry)
    (manifest.path.parent / "a/sub/y.ply").write_bytes(b"ply")
    (manifest.path.parent / "a/x.png").unlink()
    assert not manifest.is_intact(entry)


@pytest.mark.parametrize("status", ["pending", "running", "error", "cancelled"])
def test_unfinished_items_are_never_intact(tmp_path, status):
    manifest = open_manifest(tmp_path / "out")
    entry = done_entry(manifest, write_png(tmp_path / "a.png"), {"a/x.png": b"1"})
    entry["status"] = status
    assert not manifest.is_intact(entry)


def test_resuming_with_another_workflow_or_overrides_is_refused(tmp_path):
    output = tmp_path / "out"
    manifest = open_manifest(output, {"seed": 1})
    manifest.entries_for(discover_inputs([str(write_png(tmp_path / "a.png"))], TAKES_IMAGE))
    manifest.save()
    assert len(open_manifest(output, {"seed": 1}).items) == 1
    with pytest.raises(RunnerError, match=r"another overrides \({'seed': 1} then, {'seed': 2} now\).*--restart"):
        open_manifest(output, {"seed": 2})
    with pytest.raises(RunnerError, match="another workflow.*use another --output, or --restart"):
        open_manifest(output, {"seed": 1}, workflow_hash="cd" * 32)
    assert open_manifest(output, {"seed": 2}, restart=True).items == []


def test_an_unreadable_manifest_is_refused(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "manifest.json").write_text("{not json")
    with pytest.raises(RunnerError, match="cannot be read as a batch manifest"):
        open_manifest(tmp_path / "out")


def test_save_is_atomic_and_leaves_no_temporary_file(tmp_path):
    manifest = open_manifest(tmp_path / "out")
    manifest.save()
    manifest.data["started"] = "now"
    manifest.save()
    assert [path.name for path in (tmp_path / "out").iterdir()] == ["manifest.json"]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["started"] == "now"
