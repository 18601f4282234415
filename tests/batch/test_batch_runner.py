"""kontext-batch's runner against an in-process fake of ComfyUI's queue API (tests/batch/fake_comfy.py): outputs and
manifest, resume, retries (and the failures not worth one), the bounded queue, Ctrl-C, multi-turn chaining,
rejected prompts, polling."""

from __future__ import annotations

import hashlib
import os
import signal

import pytest
from PIL import Image

from fake_comfy import FakeComfy, object_info_for, output_bytes
from kontext_batch.errors import BatchError
from kontext_batch.jobs import load_jobs
from kontext_batch.manifest import Manifest
from kontext_batch.progress import SilentProgress
from kontext_batch.runner import BatchRunner, lasting_failure, unreadable_image
from kontext_batch.workflow import FieldMap, load_workflow

BAD = b"not an image"


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for index in range(4):  # real PNGs: the runner checks that an image can be read before uploading it
        Image.new("RGB", (8, 6), (40 * index, 90, 200)).save(folder / f"img{index}.png")
    return folder


def load_image_fails_on(bad: bytes):
    """ComfyUI's LoadImage on a file its Pillow cannot identify (readable here: e.g. a format only ours has)."""
    def behavior(graph, attempt, content):
        if content != bad:
            return None
        return {"node_id": "5", "node_type": "LoadImage", "exception_type": "PIL.UnidentifiedImageError",
                "exception_message": "cannot identify image file '/ComfyUI/input/kontext-batch/img2.png'"}
    return behavior


def make_runner(server, jobs, out, workflow="kontext_edit", needed=("image", "prompt", "seed"), **options):
    fields = FieldMap(load_workflow(workflow), server.object_info(), {}, set(needed))
    return BatchRunner(server, fields, jobs, Manifest(out / "manifest.jsonl"), out, **options)


def done_records(out):
    return [r for r in Manifest(out / "manifest.jsonl").records if r["event"] == "done"]


def test_batch_writes_outputs_and_manifest_then_a_rerun_does_nothing(photos, tmp_path):
    out = tmp_path / "out"
    server = FakeComfy(object_info_for("kontext_edit"))
    jobs = load_jobs([photos], prompts=["make it night"], seed=11)
    summary = make_runner(server, jobs, out).run()
    assert summary.done == 4 and summary.failed == 0 and not summary.interrupted
    for job in jobs:
        assert (out / f"{job.image.stem}.png").read_bytes() == output_bytes(job.image.read_bytes(), "make it night")
    records = done_records(out)
    assert {r["input"] for r in records} == {str(j.image) for j in jobs}
    assert all(r["prompt"] == "make it night" and r["seed"] == 11 and r["prompt_id"].startswith("pid-")
               and set(r["timings"]) == {"upload_s", "queue_wait_s", "run_s", "download_s", "total_s"} for r in records)
    graph = server.queued[0][1]
    assert graph["6"]["inputs"]["prompt"] == "make it night" and graph["7"]["inputs"]["seed"] == 11
    assert graph["5"]["inputs"]["image"].startswith("kontext-batch/img")

    again = FakeComfy(object_info_for("kontext_edit"))
    summary = make_runner(again, jobs, out).run()
    assert again.queued == [] and summary.done == 0 and summary.skipped_done == 4


def test_an_unreadable_image_fails_here_without_being_queued_or_retried(photos, tmp_path):
    (photos / "img2.png").write_bytes(BAD)
    out = tmp_path / "out"
    server = FakeComfy(object_info_for("kontext_edit"))
    jobs = load_jobs([photos], prompts=["x"])
    summary = make_runner(server, jobs, out, retries=2).run()
    assert summary.done == 3 and summary.failed == 1
    assert len(server.queued) == 3 and BAD not in server.uploads.values()
    errors = [r for r in Manifest(out / "manifest.jsonl").records if r["event"] == "error"]
    assert len(errors) == 1 and errors[0]["input"].endswith("img2.png") and errors[0]["attempt"] == 1
    assert "img2.png is not a readable image (cannot identify image file" in errors[0]["error"]
    assert "--retry-failed" in errors[0]["error"]
    assert not (out / "img2.png").exists() and len(list(out.glob("*.png"))) == 3

    again = FakeComfy(object_info_for("kontext_edit"))
    summary = make_runner(again, jobs, out).run()
    assert again.queued == [] and summary.skipped_failed == 1 and summary.skipped_done == 3

    Image.new("RGB", (8, 6)).save(photos / "img2.png")
    fixed = FakeComfy(object_info_for("kontext_edit"))
    summary = make_runner(fixed, jobs, out, retry_failed=True).run()
    assert len(fixed.queued) == 1 and summary.done == 1 and (out / "img2.png").exists()


@pytest.mark.parametrize("events", [True, False], ids=["websocket", "polling"])
def test_comfyuis_load_image_error_is_recorded_at_once(photos, tmp_path, events):
    out = tmp_path / "out"
    bad = (photos / "img2.png").read_bytes()
    server = FakeComfy(object_info_for("kontext_edit"), behavior=load_image_fails_on(bad))
    server.websocket = events
    summary = make_runner(server, load_jobs([photos], prompts=["x"]), out, retries=2).run()
    assert summary.done == 3 and summary.failed == 1
    assert server.attempts[hashlib.sha1(bad + b"x").hexdigest()] == 1
    error = [r for r in Manifest(out / "manifest.jsonl").records if r["event"] == "error"][0]
    assert error["attempt"] == 1 and "LoadImage (node 5): PIL.UnidentifiedImageError" in error["error"]
    assert "cannot identify image file" in error["error"]
    assert "not retried: ComfyUI cannot read the input image" in error["error"]


def test_a_value_a_node_rejects_is_not_retried(photos, tmp_path):
    out = tmp_path / "out"
    server = FakeComfy(object_info_for("kontext_edit"), behavior=lambda graph, attempt, content: {
        "exception_type": "ValueError", "exception_message": "sampler true_cfg needs a negative"})
    summary = make_runner(server, load_jobs([photos / "img0.png"], prompts=["x"]), out, retries=2).run()
    assert summary.failed == 1 and len(server.queued) == 1
    assert "not retried: KontextEdit rejected its inputs" in summary.errors[0]


@pytest.mark.parametrize("exception_type, message", [
    ("torch.OutOfMemoryError", "CUDA out of memory. Tried to allocate 2.00 GiB"),
    ("RuntimeError", "CUDA error: an illegal memory access was encountered"),
    ("TimeoutError", "the API node's request timed out"),
    ("ConnectionResetError", "[Errno 104] Connection reset by peer"),
])
def test_failures_that_may_pass_are_retried_until_the_retries_are_spent(photos, tmp_path, exception_type, message):
    out = tmp_path / "out"
    server = FakeComfy(object_info_for("kontext_edit"), behavior=lambda graph, attempt, content: {
        "exception_type": exception_type, "exception_message": message})
    summary = make_runner(server, load_jobs([photos / "img0.png"], prompts=["x"]), out, retries=2).run()
    assert summary.failed == 1 and len(server.queued) == 3  # first try + 2 retries
    error = [r for r in Manifest(out / "manifest.jsonl").records if r["event"] == "error"][0]
    assert error["attempt"] == 3 and message in error["error"] and "not retried" not in error["error"]


def test_which_failures_last():
    assert lasting_failure({"exception_type": "PIL.Image.DecompressionBombError", "exception_message": "too big"})
    assert lasting_failure({"exception_type": "OSError", "exception_message": "cannot identify image file 'x.png'"})
    assert lasting_failure({"exception_type": "kontext_core.checkpoints.files.CheckpointError",
                            "node_type": "KontextModelLoader"})
    assert lasting_failure({"exception_type": "torch.OutOfMemoryError", "exception_message": "out of memory"}) is None
    assert lasting_failure({}) is None


def test_an_image_this_pillow_cannot_judge_is_left_to_comfyui(tmp_path):
    from PIL import Image as PILImage

    for suffix in (".heic", ".jxl"):
        if suffix not in PILImage.registered_extensions():  # a plugin (pillow-heif) may give ComfyUI what we lack
            (tmp_path / f"photo{suffix}").write_bytes(b"ftypheic....")
            assert unreadable_image(tmp_path / f"photo{suffix}") is None
    (tmp_path / "photo.png").write_bytes(BAD)
    assert "photo.png is not a readable image" in unreadable_image(tmp_path / "photo.png")


def test_a_flaky_failure_recovers_on_retry(photos, tmp_path):
    out = tmp_path / "out"
    server = FakeComfy(object_info_for("kontext_edit"),
                       behavior=lambda g, attempt, c: "CUDA hiccup" if attempt == 1 else None)
    summary = make_runner(server, load_jobs([photos], prompts=["x"]), out, retries=1).run()
    assert summary.done == 4 and summary.failed == 0
    assert sorted(r["attempt"] for r in done_records(out)) == [2, 2, 2, 2]


@pytest.mark.parametrize("max_queued", [1, 3])
def test_the_queue_holds_at_most_max_queued_of_our_jobs(photos, tmp_path, max_queued):
    server = FakeComfy(object_info_for("kontext_edit"))
    summary = make_runner(server, load_jobs([photos], prompts=["x"]), tmp_path / "out", max_queued=max_queued).run()
    assert summary.done == 4 and server.max_in_queue == max_queued


def test_ctrl_c_interrupts_ours_records_what_finished_and_resumes(photos, tmp_path):
    out = tmp_path / "out"
    server = FakeComfy(object_info_for("kontext_edit"))
    finished = []

    def press_ctrl_c(event):
        if event["type"] == "execution_success":
            finished.append(event)
        if event["type"] == "execution_start" and len(finished) == 2:
            raise KeyboardInterrupt

    server.on_event = press_ctrl_c
    jobs = load_jobs([photos], prompts=["x"])
    summary = make_runner(server, jobs, out, max_queued=2).run()
    assert summary.interrupted and summary.done == 2 and summary.remaining == 2
    assert len(done_records(out)) == 2
    assert server.queued[2][0] in server.interrupted  # the third job, running when Ctrl-C came
    assert not server.queue and set(server.deleted) <= {pid for pid, _ in server.queued[3:]}  # none left waiting

    resumed = FakeComfy(object_info_for("kontext_edit"))
    summary = make_runner(resumed, jobs, out).run()
    assert summary.done == 2 and summary.skipped_done == 2 and len(resumed.queued) == 2
    assert sorted(p.name for p in out.glob("*.png")) == [f"img{i}.png" for i in range(4)]


def test_ctrl_c_while_a_prompt_is_being_queued_still_takes_it_out(photos, tmp_path):
    # The signal arrives inside the call that queues the third prompt: the runner finishes that step
    # (so the prompt is known as ours and recorded), then stops and takes it out of ComfyUI's queue.
    out = tmp_path / "out"
    server = FakeComfy(object_info_for("kontext_edit"))
    queue_prompt = server.queue_prompt

    def queue_then_ctrl_c(graph):
        prompt_id = queue_prompt(graph)
        if len(server.queued) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return prompt_id

    server.queue_prompt = queue_then_ctrl_c
    # Whatever handled SIGINT before (SIG_IGN when the suite runs as a background job) is put back.
    handler_before = signal.getsignal(signal.SIGINT)
    summary = make_runner(server, load_jobs([photos], prompts=["x"]), out, max_queued=4).run()
    third = server.queued[2][0]
    assert summary.interrupted and len(server.queued) == 3
    assert third in server.deleted or third in server.interrupted
    assert not server.queue  # nothing of ours left waiting
    queued = [r["prompt_id"] for r in Manifest(out / "manifest.jsonl").records if r["event"] == "queued"]
    assert third in queued
    assert signal.getsignal(signal.SIGINT) is handler_before  # the runner's handler is gone


def test_resume_collects_a_turn_comfyui_finished_after_we_stopped(photos, tmp_path):
    out = tmp_path / "out"
    jobs = load_jobs([photos], prompts=["x"])
    server = FakeComfy(object_info_for("kontext_edit"), history_lag=0)
    # An earlier run queued job 0 and died before its result came back; ComfyUI finished it meanwhile.
    Manifest(out / "manifest.jsonl").append("queued", key=jobs[0].key, turn=0, prompt_id="old-1", attempt=1)
    server.files["output//old.png"] = b"finished while we were away"
    server.histories["old-1"] = {"status": {"status_str": "success", "completed": True, "messages": []},
                                 "outputs": {"8": {"images": [{"filename": "old.png", "subfolder": "",
                                                               "type": "output"}]}}}
    summary = make_runner(server, jobs, out).run()
    assert summary.done == 4 and len(server.queued) == 3
    assert (out / "img0.png").read_bytes() == b"finished while we were away"


def test_multi_turn_feeds_each_output_into_the_next_turn(photos, tmp_path):
    out = tmp_path / "out"
    server = FakeComfy(object_info_for("kontext_edit"))
    turns = ["add a hat", "make it winter", "watercolor"]
    jobs = load_jobs([photos / "img1.png", photos / "img3.png"], prompts=turns)
    summary = make_runner(server, jobs, out).run()
    assert summary.done == 6
    for job in jobs:
        expected = job.image.read_bytes()
        for turn, prompt in enumerate(turns):
            expected = output_bytes(expected, prompt)
            assert (out / f"{job.image.stem}_turn{turn + 1}.png").read_bytes() == expected
    assert [r["turn"] for r in done_records(out) if r["input"].endswith("img1.png")] == [0, 1, 2]


def test_multi_turn_resumes_from_the_last_finished_turn(photos, tmp_path):
    out = tmp_path / "out"
    turns = ["one", "two", "three"]
    jobs = load_jobs([photos / "img0.png"], prompts=turns)
    server = FakeComfy(object_info_for("kontext_edit"))
    server.on_event = lambda e: (_ for _ in ()).throw(KeyboardInterrupt) if (
        e["type"] == "execution_start" and len(server.queued) == 2) else None
    summary = make_runner(server, jobs, out).run()
    assert summary.interrupted and summary.done == 1
    resumed = FakeComfy(object_info_for("kontext_edit"))
    summary = make_runner(resumed, jobs, out).run()
    assert summary.done == 2 and [g["6"]["inputs"]["prompt"] for _, g in resumed.queued] == ["two", "three"]
    expected = output_bytes(output_bytes(output_bytes((photos / "img0.png").read_bytes(), "one"), "two"), "three")
    assert (out / "img0_turn3.png").read_bytes() == expected


def test_a_rejected_job_is_recorded_and_a_rejected_workflow_stops_the_run(photos, tmp_path):
    jobs = load_jobs([photos / "img0.png"], prompts=["x"], seed=3)
    server = FakeComfy(object_info_for("kontext_edit"))
    server.rejection = {"error": {"message": "Prompt outputs failed validation"},
                        "node_errors": {"7": {"class_type": "KontextEdit",
                                              "errors": [{"message": "Value too big", "details": "seed"}]}}}
    summary = make_runner(server, jobs, tmp_path / "a").run()
    assert summary.failed == 1 and "node 7 (KontextEdit): Value too big (seed)" in summary.errors[0]

    server.rejection = {"error": {"message": "Prompt outputs failed validation"},
                        "node_errors": {"2": {"class_type": "KontextModelLoader",
                                              "errors": [{"message": "Value not in list", "details": "model_name"}]}}}
    with pytest.raises(BatchError, match="not a problem of one job"):
        make_runner(server, jobs, tmp_path / "b").run()


def test_values_are_checked_for_every_job_before_anything_is_queued(photos, tmp_path):
    table = tmp_path / "jobs.csv"
    table.write_text("image,prompt,Kontext Edit.denoise\nphotos/img0.png,a,0.5\nphotos/img1.png,b,1.5\n")
    server = FakeComfy(object_info_for("kontext_edit"))
    with pytest.raises(BatchError,
                       match="jobs.csv line 3: Kontext Edit \\(node 7\\).denoise must be between 0.0 and 1.0"):
        make_runner(server, load_jobs([table]), tmp_path / "out")
    assert server.queued == []


def test_prompts_lost_by_a_comfyui_restart_are_queued_again(photos, tmp_path):
    out = tmp_path / "out"
    server = FakeComfy(object_info_for("kontext_edit"))
    restarted, starts = [], []

    def restart_once(event):
        starts.append(event["type"] == "execution_start")
        if sum(starts) == 3 and not restarted:
            restarted.append(True)
            server.restart()  # the running prompt and any waiting one vanish; their ids never reach the history

    server.on_event = restart_once
    summary = make_runner(server, load_jobs([photos], prompts=["x"]), out, max_queued=2).run()
    assert restarted and summary.done == 4 and summary.failed == 0
    assert sorted(p.name for p in out.glob("*.png")) == [f"img{i}.png" for i in range(4)]
    assert len(server.queued) > 4  # the lost ones went to the queue again


def test_without_a_websocket_jobs_are_followed_by_polling(photos, tmp_path):
    server = FakeComfy(object_info_for("kontext_edit"))
    server.websocket = False
    summary = make_runner(server, load_jobs([photos], prompts=["x"]), tmp_path / "out").run()
    assert summary.done == 4 and len(list((tmp_path / "out").glob("*.png"))) == 4


def test_same_image_name_in_two_rows_gets_distinct_outputs(photos, tmp_path):
    table = tmp_path / "jobs.csv"
    table.write_text("image,prompt\nphotos/img0.png,red\nphotos/img0.png,blue\n")
    server = FakeComfy(object_info_for("kontext_edit"))
    make_runner(server, load_jobs([table]), tmp_path / "out").run()
    names = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert len(names) == 2 and all(n.startswith("img0-") for n in names)


class RecordingProgress(SilentProgress):
    def __init__(self):
        self.calls = []

    def start(self, total, already, servers):
        self.calls.append(("start", total, already))

    def turn_started(self, server, label):
        self.calls.append(("turn", label))

    def step(self, server, value, maximum):
        self.calls.append(("step", value, maximum))

    def server_status(self, server, text):
        self.calls.append(("server", server, text))

    def message(self, text):
        self.calls.append(("message", text))

    def turn_finished(self, text, turns):
        self.calls.append(("finished", turns))

    def close(self):
        self.calls.append(("close",))


def test_progress_gets_the_overall_count_and_each_turns_steps(photos, tmp_path):
    out = tmp_path / "out"
    jobs = load_jobs([photos / "img0.png", photos / "img1.png"], prompts=["a", "b"])
    Manifest(out / "manifest.jsonl").append("done", key=jobs[0].key, turn=0, outputs=["img0_turn1.png"])
    (out / "img0_turn1.png").write_bytes(b"turn 1 of an earlier run")
    progress = RecordingProgress()
    make_runner(FakeComfy(object_info_for("kontext_edit")), jobs, out, progress=progress).run()
    assert progress.calls[0] == ("start", 4, 1)  # 4 turns, 1 done by an earlier run
    assert [c[1] for c in progress.calls if c[0] == "turn"] == ["img0 turn 2/2", "img1 turn 1/2", "img1 turn 2/2"]
    steps = [c[1:] for c in progress.calls if c[0] == "step"]
    assert steps == [(1, 3), (2, 3), (3, 3)] * 3
    assert sum(c[1] for c in progress.calls if c[0] == "finished") == 3 and progress.calls[-1] == ("close",)


def test_a_column_naming_no_input_is_reported_with_its_row(photos, tmp_path):
    table = tmp_path / "jobs.csv"
    table.write_text("image,prompt,Kontext Edit.strength\nphotos/img0.png,a,0.5\n")
    with pytest.raises(BatchError, match="jobs.csv line 2: Kontext Edit.strength: .*has no input 'strength'"):
        make_runner(FakeComfy(object_info_for("kontext_edit")), load_jobs([table]), tmp_path / "out")
