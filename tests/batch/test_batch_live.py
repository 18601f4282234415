"""kontext-batch against a real ComfyUI (tests/comfyui_server.py: ComfyUI 0.8 on the CPU with this pack and
tiny random models; skipped, saying why, without it). The command runs as a user runs it, in a subprocess:
a batch with a corrupt image, a re-run that does nothing, a run interrupted with Ctrl-C (SIGINT) that
resumes, and a multi-turn batch whose every turn edits the previous turn's output. Then one batch over two
servers (comfyui_pair): both used, each job's image uploaded to the server that ran it, and one server killed
mid-job leaving the batch to the other."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
from PIL import Image

from comfyui_server import request_json
from node_pack import REPO

TINY = ["--set", "Kontext Edit.resize=keep", "--set", "steps=2"]  # the pack's edit workflow at CPU-test size
RUN_SECONDS = 300


def _images(folder, count, size=(32, 48), seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"photo{index}.png")
    return folder


def _command(comfyui, *args):
    return [sys.executable, "-m", "kontext_batch", *map(str, args), "--url", comfyui["url"], "-q"]


def _run(comfyui, *args):
    result = subprocess.run(_command(comfyui, *args), cwd=REPO, capture_output=True, text=True, timeout=RUN_SECONDS)
    return result


def _records(out, event=None):
    path = out / "manifest.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [r for r in records if event is None or r["event"] == event]


def _log(comfyui):
    return comfyui["log"].read_text(errors="replace")[-3000:]


def test_batch_with_a_corrupt_image_then_a_rerun_that_does_nothing(comfyui, tmp_path):
    photos = _images(tmp_path / "photos", 3)
    (photos / "broken.png").write_bytes(b"this file is not an image at all")
    out = tmp_path / "out"
    first = _run(comfyui, photos, "-o", out, "--prompt", "make it night", "--seed", 5, "--retries", 1, *TINY)
    assert first.returncode == 1, (first.stdout, first.stderr, _log(comfyui))  # 1: some jobs failed
    outputs = sorted(p.name for p in out.glob("*.png"))
    assert outputs == ["photo0.png", "photo1.png", "photo2.png"], (outputs, first.stderr)
    assert all(Image.open(out / name).size == (48, 32) for name in outputs)
    errors = _records(out, "error")
    # Found unreadable before uploading: never queued, not retried (a retry cannot mend a file).
    assert len(errors) == 1 and errors[0]["input"].endswith("broken.png") and errors[0]["attempt"] == 1
    assert "broken.png is not a readable image (cannot identify image file" in errors[0]["error"]
    assert errors[0]["prompt_id"] is None
    done = _records(out, "done")
    assert len(done) == 3 and all(r["seed"] == 5 and r["prompt"] == "make it night" for r in done)
    assert any(r["timings"]["queue_wait_s"] > 0 for r in done)  # followed over the websocket: start times known
    assert "3 turn(s) done, 1 job(s) failed" in first.stdout

    lines = len(_records(out))
    second = _run(comfyui, photos, "-o", out, "--prompt", "make it night", "--seed", 5, *TINY)
    assert second.returncode == 0, second.stderr
    assert "0 turn(s) done" in second.stdout and "3 already done, 1 failed before" in second.stdout
    assert len(_records(out)) == lines  # nothing queued, nothing recorded


def test_interrupted_batch_resumes_to_complete(comfyui, tmp_path):
    photos = _images(tmp_path / "photos", 4, size=(64, 64), seed=1)
    out = tmp_path / "out"
    args = (photos, "-o", out, "--prompt", "add a red hat", "--set", "Kontext Edit.resize=keep", "--set", "steps=16")
    process = subprocess.Popen(_command(comfyui, *args), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.time() + RUN_SECONDS
    while len(_records(out, "done")) < 2:
        assert process.poll() is None, (process.communicate(), _log(comfyui))
        assert time.time() < deadline, _log(comfyui)
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)  # Ctrl-C
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, (stdout, stderr)
    assert "run the same command again to resume" in stderr
    finished = {r["key"] for r in _records(out, "done")}
    assert 2 <= len(finished) < 4, "the batch ran to its end before Ctrl-C; make the jobs slower"
    ours = {r["prompt_id"] for r in _records(out, "queued")}
    queue = request_json(f"{comfyui['url']}/queue")
    assert not ours & {item[1] for item in queue["queue_pending"]}  # our waiting prompts were taken out

    resumed = _run(comfyui, *args)
    assert resumed.returncode == 0, (resumed.stdout, resumed.stderr, _log(comfyui))
    assert sorted(p.name for p in out.glob("*.png")) == [f"photo{i}.png" for i in range(4)]
    queued_per_key = {}
    for record in _records(out, "queued"):
        queued_per_key[record["key"]] = queued_per_key.get(record["key"], 0) + 1
    assert all(queued_per_key[key] == 1 for key in finished)  # what finished was not run again
    assert len({r["key"] for r in _records(out, "done")}) == 4


def test_multi_turn_batch_produces_every_turn_from_the_previous_one(comfyui, tmp_path):
    photos = _images(tmp_path / "photos", 2, seed=2)
    out = tmp_path / "out"
    turns = tmp_path / "turns.txt"
    turns.write_text("give them a hat\nmake it winter\nturn it into a watercolor\n")
    result = _run(comfyui, photos, "-o", out, "--turns", turns, "--seed", 9, *TINY)
    assert result.returncode == 0, (result.stdout, result.stderr, _log(comfyui))
    for index in range(2):
        names = [f"photo{index}_turn{t}.png" for t in (1, 2, 3)]
        assert all((out / n).exists() for n in names), sorted(p.name for p in out.iterdir())
    done = [r for r in _records(out, "done") if r["input"].endswith("photo0.png")]
    assert [r["turn"] for r in done] == [0, 1, 2]
    assert [r["prompt"] for r in done] == ["give them a hat", "make it winter", "turn it into a watercolor"]
    # Turn 2's input, as ComfyUI received it, is turn 1's output byte for byte.
    uploaded = {p.read_bytes() for p in (comfyui["base"] / "input" / "kontext-batch").iterdir()}
    assert (out / "photo0_turn1.png").read_bytes() in uploaded
    assert (out / "photo1_turn2.png").read_bytes() in uploaded


def test_workflow_missing_nodes_and_bad_fields_are_refused_before_queueing(comfyui, tmp_path):
    photos = _images(tmp_path / "photos", 1, seed=3)
    workflow = json.loads((REPO / "example_workflows" / "api" / "kontext_edit_api.json").read_text())
    workflow["9"] = {"class_type": "SomeoneElsesUpscaler", "inputs": {"image": ["7", 1]}}
    path = tmp_path / "custom_api.json"
    path.write_text(json.dumps(workflow))
    result = _run(comfyui, photos, "-o", tmp_path / "out", "--prompt", "x", "--workflow", path)
    assert result.returncode == 2 and "SomeoneElsesUpscaler" in result.stderr
    assert "Install Missing Custom Nodes" in result.stderr
    result = _run(comfyui, photos, "-o", tmp_path / "out", "--prompt", "x", "--seed-field", "Kontext Edit.sed")
    assert result.returncode == 2 and "has no input 'sed'" in result.stderr
    assert not (tmp_path / "out" / "manifest.jsonl").exists()


# --- one batch over two servers (tests/comfyui_server.py's comfyui_pair: same tiny models, own input folders) ---

def _command_over(servers, *args):
    urls = [item for server in servers for item in ("--url", server["url"])]
    return [sys.executable, "-m", "kontext_batch", *map(str, args), *urls, "-q"]


def _logs(servers):
    return "\n".join(f"--- {s['url']}\n{s['log'].read_text(errors='replace')[-2000:]}" for s in servers)


def _uploaded_to(server, image_name):
    folder = server["base"] / "input" / "kontext-batch"
    return folder.is_dir() and any(p.name.startswith(f"{image_name}-") for p in folder.iterdir())


def test_batch_over_two_servers_uses_both_then_a_rerun_does_nothing(comfyui_pair, tmp_path):
    photos = _images(tmp_path / "photos", 5, seed=4)
    (photos / "broken.png").write_bytes(b"this file is not an image at all")
    out = tmp_path / "out"
    command = _command_over(comfyui_pair, photos, "-o", out, "--prompt", "make it night", "--seed", 5, *TINY)
    first = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=RUN_SECONDS)
    assert first.returncode == 1, (first.stdout, first.stderr, _logs(comfyui_pair))  # 1: the broken image failed
    assert sorted(p.name for p in out.glob("*.png")) == [f"photo{i}.png" for i in range(5)]
    errors = _records(out, "error")
    assert len(errors) == 1 and errors[0]["input"].endswith("broken.png")
    done = _records(out, "done")
    servers = {server["url"]: server for server in comfyui_pair}
    assert len(done) == 5 and {r["server"] for r in done} == set(servers)  # both used
    for record in done:  # the image went to the server that ran the job
        assert _uploaded_to(servers[record["server"]], record["outputs"][0].removesuffix(".png")), record

    lines = len(_records(out))
    second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=RUN_SECONDS)
    assert second.returncode == 0, second.stderr
    assert "0 turn(s) done" in second.stdout and "5 already done, 1 failed before" in second.stdout
    assert len(_records(out)) == lines


def test_killing_one_server_mid_batch_finishes_the_batch_on_the_other(comfyui_pair, tmp_path):
    photos = _images(tmp_path / "photos", 4, seed=5)
    out = tmp_path / "out"
    survivor, victim = comfyui_pair
    # One job queued per server: the victim is caught running its first (a CPU job lasts seconds, /queue is
    # asked every 50 ms).
    args = (photos, "-o", out, "--prompt", "add a red hat", *TINY, "--max-queued", 1, "--timeout", 20)
    process = subprocess.Popen(_command_over(comfyui_pair, *args), cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + RUN_SECONDS
    killed = None
    while killed is None:
        assert process.poll() is None, (process.communicate(), _logs(comfyui_pair))
        assert time.time() < deadline, _logs(comfyui_pair)
        ours = {r["prompt_id"] for r in _records(out, "queued") if r["server"] == victim["url"]}
        running = {item[1] for item in request_json(f"{victim['url']}/queue")["queue_running"]}
        if ours & running:
            killed = (ours & running).pop()
            victim["server"].kill()
        else:
            time.sleep(0.05)
    stdout, stderr = process.communicate(timeout=RUN_SECONDS)
    assert process.returncode == 0, (stdout, stderr, _logs(comfyui_pair))
    assert f"{victim['url'].removeprefix('http://')} stopped answering" in stderr
    assert sorted(p.name for p in out.glob("*.png")) == [f"photo{i}.png" for i in range(4)]
    lost_key = next(r["key"] for r in _records(out, "queued") if r["prompt_id"] == killed)
    done = {r["key"]: r for r in _records(out, "done")}
    assert len(done) == 4 and done[lost_key]["server"] == survivor["url"]  # the killed job ran on the survivor

    rerun = subprocess.run(_command_over(comfyui_pair, *args), cwd=REPO, capture_output=True, text=True,
                           timeout=RUN_SECONDS)
    assert rerun.returncode == 0, rerun.stderr
    assert "0 turn(s) done" in rerun.stdout and "4 already done" in rerun.stdout
