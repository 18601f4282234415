"""kontext-batch's inputs: job lists (folder, CSV, JSONL, turns), workflow field resolution and checking,
and the manifest's reading and writing (torn lines included)."""

from __future__ import annotations

import json

import pytest

from fake_comfy import object_info_for
from kontext_batch.errors import BatchError
from kontext_batch.jobs import load_jobs, read_turns_file
from kontext_batch.manifest import Manifest
from kontext_batch.workflow import FieldMap, Target, load_workflow


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("b.png", "a.jpg", "c.webp"):
        (folder / name).write_bytes(name.encode())
    (folder / "notes.txt").write_text("not an image")
    return folder


# --- jobs -------------------------------------------------------------------------------------------

def test_folder_jobs_take_every_image_in_order_with_the_prompts(images):
    jobs = load_jobs([images], prompts=["make it night", "add snow"], seed=5)
    assert [j.image.name for j in jobs] == ["a.jpg", "b.png", "c.webp"]
    assert all(j.prompts == ("make it night", "add snow") and j.turns == 2 and j.seed == 5 for j in jobs)
    assert len({j.key for j in jobs}) == 3
    assert load_jobs([images], prompts=["make it night", "add snow"], seed=5)[0].key == jobs[0].key  # stable
    assert load_jobs([images], prompts=["make it night"], seed=5)[0].key != jobs[0].key


def test_folder_without_prompt_is_refused(images):
    with pytest.raises(BatchError, match="--prompt"):
        load_jobs([images])


def test_csv_rows_with_seeds_overrides_and_turns(images, tmp_path):
    table = tmp_path / "jobs.csv"
    table.write_text('image,prompt,seed,steps,guidance,Kontext Edit.denoise\n'
                     'photos/a.jpg,make it red,7,20,3.5,0.8\n'
                     '\n'
                     'photos/b.png,,,,,\n', encoding="utf-8")
    jobs = load_jobs([table], prompts=["default prompt"], seed=None)
    assert jobs[0].image == images / "a.jpg" and jobs[0].prompts == ("make it red",) and jobs[0].seed == 7
    assert dict(jobs[0].overrides) == {"steps": 20, "guidance": 3.5, "Kontext Edit.denoise": "0.8"}
    assert jobs[0].source.endswith("jobs.csv line 2")
    assert jobs[1].prompts == ("default prompt",) and jobs[1].seed is None and jobs[1].source.endswith("line 4")


def test_csv_cell_with_several_lines_is_a_list_of_turns(images, tmp_path):
    table = tmp_path / "jobs.csv"
    table.write_text('image,prompts\nphotos/a.jpg,"add a hat\nmake it winter"\n', encoding="utf-8")
    assert load_jobs([table])[0].prompts == ("add a hat", "make it winter")


@pytest.mark.parametrize("row, message", [
    ("photos/a.jpg,hello,seven", "line 3: seed must be a whole number"),
    ("photos/missing.png,hello,1", "line 3: the image photos/missing.png does not exist"),
    ("photos/a.jpg,,1", "line 3: no prompt"),
    ("photos/a.jpg,hi,1,extra", "line 3: more cells than the header"),
    ("photos/a.jpg,hi,-4", "line 3: seed must be a whole number >= 0"),
])
def test_bad_csv_rows_are_named_by_line(images, tmp_path, row, message):
    table = tmp_path / "jobs.csv"
    table.write_text(f"image,prompt,seed\nphotos/b.png,fine,1\n{row}\n", encoding="utf-8")
    with pytest.raises(BatchError, match=message):
        load_jobs([table])


def test_unknown_csv_column_is_refused_at_the_header(images, tmp_path):
    table = tmp_path / "jobs.csv"
    table.write_text("image,prompt,strength\nphotos/a.jpg,x,1\n")
    with pytest.raises(BatchError, match="line 1: 'strength' is neither a known column"):
        load_jobs([table])


def test_jsonl_rows_and_their_errors(images, tmp_path):
    lines = tmp_path / "jobs.jsonl"
    lines.write_text(json.dumps({"image": "photos/c.webp", "prompts": ["one", "two"], "seed": 3}) + "\n\n"
                     + json.dumps({"image": "photos/a.jpg", "prompt": "x", "7.steps": 12}) + "\n")
    jobs = load_jobs([lines])
    assert jobs[0].prompts == ("one", "two") and jobs[0].seed == 3
    assert dict(jobs[1].overrides) == {"7.steps": 12} and jobs[1].source.endswith("line 3")
    lines.write_text(json.dumps({"image": "photos/a.jpg", "prompt": "x"}) + "\n{not json\n")
    with pytest.raises(BatchError, match="line 2: not valid JSON"):
        load_jobs([lines])


def test_turns_file(tmp_path):
    turns = tmp_path / "turns.txt"
    turns.write_text("# a comment\nadd a hat\n\n  make it winter  \n")
    assert read_turns_file(turns) == ["add a hat", "make it winter"]
    turns.write_text("\n# nothing\n")
    with pytest.raises(BatchError, match="holds no prompts"):
        read_turns_file(turns)


# --- workflow fields --------------------------------------------------------------------------------

def test_pack_workflow_fields_are_found_by_node_type():
    workflow = load_workflow("kontext_edit")
    fields = FieldMap(workflow, object_info_for("kontext_edit"), {}, {"image", "prompt", "seed", "steps"})
    assert fields.targets["image"] == [Target("5", "image")]
    assert fields.targets["prompt"] == [Target("6", "prompt")]
    assert fields.targets["seed"] == [Target("7", "seed")] and fields.targets["steps"] == [Target("7", "steps")]
    assert fields.targets["guidance"] == []  # not needed, not resolved
    assert fields.output_nodes == ["8"]


def test_native_workflow_prompt_fills_both_text_encoders():
    workflow = load_workflow("kontext_native_text_encoders")
    fields = FieldMap(workflow, object_info_for("kontext_native_text_encoders"), {}, {"prompt", "guidance"})
    assert fields.targets["prompt"] == [Target("8", "clip_l"), Target("8", "t5xxl")]
    assert fields.targets["guidance"] == [Target("11", "guidance")]


def test_fields_named_by_title_or_id():
    workflow = load_workflow("kontext_multi_reference")
    info = object_info_for("kontext_multi_reference")
    with pytest.raises(BatchError, match="2 LoadImage nodes .*Character = id 5.*--image-field"):
        FieldMap(workflow, info, {}, {"image", "prompt"})
    fields = FieldMap(workflow, info, {"image": ["Character"], "seed": ["9"], "guidance": ['"Kontext Edit".guidance']},
                      {"image", "prompt", "seed", "guidance"})
    assert fields.targets["image"] == [Target("5", "image")]
    assert fields.targets["seed"] == [Target("9", "seed")]
    assert fields.targets["guidance"] == [Target("9", "guidance")]


@pytest.mark.parametrize("named, message", [
    ({"prompt": ["Nowhere.prompt"]}, "no node 'Nowhere'"),
    ({"prompt": ["Kontext Edit.strength"]}, "has no input 'strength'"),
    ({"prompt": ["Kontext Edit.model"]}, "is wired to node 2"),
    ({"image": ["Kontext Prompt.prompt"]}, "not a LoadImage image input"),
])
def test_bad_field_names_are_explained(named, message):
    with pytest.raises(BatchError, match=message):
        FieldMap(load_workflow("kontext_edit"), object_info_for("kontext_edit"), named, {"image", "prompt"})


def test_missing_node_types_name_the_pack():
    info = object_info_for("kontext_edit")
    for name in ("KontextEdit", "KontextPrompt"):
        del info[name]
    with pytest.raises(BatchError, match="KontextEdit, KontextPrompt come from comfyui-kontext: clone it"):
        FieldMap(load_workflow("kontext_edit"), info, {}, {"prompt"})


def test_values_are_checked_against_the_declared_types():
    fields = FieldMap(load_workflow("kontext_edit"), object_info_for("kontext_edit"), {}, {"steps"})
    steps = fields.targets["steps"][0]
    assert fields.coerce(steps, "12", "row 2") == 12
    with pytest.raises(BatchError, match="row 2: Kontext Edit \\(node 7\\).steps must be a whole number"):
        fields.coerce(steps, "12.5", "row 2")
    with pytest.raises(BatchError, match="must be between 1 and 10000"):
        fields.coerce(steps, 0, "row 2")
    with pytest.raises(BatchError, match="must be one of dev, distilled, true_cfg"):
        fields.coerce(Target("7", "sampler"), "euler", "row 2")
    assert fields.coerce(steps, "12.0", "row 2") == 12  # a spreadsheet's whole number


def test_seeds_keep_every_digit():
    fields = FieldMap(load_workflow("kontext_edit"), object_info_for("kontext_edit"), {}, {"seed"})
    seed = fields.targets["seed"][0]
    for value in (2**53 + 1, 2**64 - 1):  # beyond float's 53 bits: a float detour would change them
        assert fields.coerce(seed, str(value), "row 2") == value
        assert fields.coerce(seed, value, "row 2") == value


def test_ui_format_workflow_is_refused_with_the_fix(tmp_path):
    ui = tmp_path / "ui.json"
    ui.write_text(json.dumps({"nodes": [], "links": [], "version": 0.4}))
    with pytest.raises(BatchError, match="UI-format workflow.*Export \\(API\\)"):
        load_workflow(str(ui))
    with pytest.raises(BatchError, match="one of the pack's: .*kontext_edit"):
        load_workflow("no_such_workflow")


# --- manifest ---------------------------------------------------------------------------------------

def test_manifest_records_survive_a_torn_last_line(tmp_path, capsys):
    path = tmp_path / "manifest.jsonl"
    manifest = Manifest(path)
    manifest.append("queued", key="k1", turn=0, prompt_id="p1", attempt=1)
    manifest.append("done", key="k1", turn=0, outputs=["a.png"])
    manifest.append("queued", key="k1", turn=1, prompt_id="p2", attempt=1)
    with open(path, "ab") as handle:
        handle.write(b'{"event": "done", "key": "k1", "tu')  # a crash mid-append
    reread = Manifest(path)
    assert "cut off by an interrupted write" in capsys.readouterr().err
    assert reread.turn_done("k1", 0)["outputs"] == ["a.png"]
    assert reread.turn_done("k1", 1) is None and reread.unfinished_prompt("k1", 1) == "p2"
    assert reread.next_turn("k1", 2) == 1
    reread.append("done", key="k1", turn=1, outputs=["b.png"])  # starts on a line of its own
    final = Manifest(path)
    assert final.next_turn("k1", 2) == 2 and final.unfinished_prompt("k1", 1) is None
    assert path.read_text().count("\n") == 5
