"""kontext-batch over several ComfyUI servers, against two or three in-process fakes (tests/batch/fake_comfy.py):
how jobs spread, a server dying mid-batch (its turns run elsewhere, nothing finished runs twice, it is used
again once it answers), every server down (exit 2, a re-run resumes), resuming across the set, multi-turn
chains crossing servers, and how --host/--port/--url name the servers. Pauses are made short and every test
is bounded in time."""

from __future__ import annotations

import json
import signal

import pytest
from PIL import Image

import kontext_batch.cli as cli
import kontext_batch.runner
import kontext_batch.servers
from fake_comfy import FakeComfy, object_info_for, output_bytes
from kontext_batch.client import server_urls
from kontext_batch.errors import BatchError
from kontext_batch.jobs import load_jobs
from kontext_batch.manifest import Manifest
from kontext_batch.progress import SilentProgress
from kontext_batch.runner import BatchRunner
from kontext_batch.workflow import FieldMap, load_workflow

TEST_SECONDS = 60   # the runner's loops end by themselves; this catches one that would not
# No pause before asking a down server again: the fakes finish jobs in microseconds, and a pause could let the
# batch end before a revived server is asked (what several tests check).
FAST = {"backoff_s": (0.0, 0.0), "wait_for_servers_s": 0.0}


@pytest.fixture(autouse=True)
def bounded():
    def expire(signum, frame):
        raise TimeoutError(f"the test ran over {TEST_SECONDS} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(TEST_SECONDS)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for index in range(6):
        Image.new("RGB", (8, 6), (40 * index, 90, 200)).save(folder / f"img{index}.png")
    return folder


def fakes(*names, **options):
    # history_lag 0: a success is in the history when its event comes, so a finished turn is collected at once
    return [FakeComfy(object_info_for("kontext_edit"), name=name, history_lag=0, **options) for name in names]


def make_runner(servers, jobs, out, **options):
    fields = FieldMap(load_workflow("kontext_edit"), servers[0].object_info(), {}, {"image", "prompt", "seed"})
    return BatchRunner(servers, fields, jobs, Manifest(out / "manifest.jsonl"), out, **{**FAST, **options})


def records(out, event):
    return [r for r in Manifest(out / "manifest.jsonl").records if r["event"] == event]


def finished_per_job(servers):
    """How often each (input, prompt) reached a successful history entry, on any server."""
    counts = {}
    for server in servers:
        for _, key in server.finished:
            counts[key] = counts.get(key, 0) + 1
    return counts


def assert_outputs(out, jobs, prompt):
    for job in jobs:
        assert (out / f"{job.image.stem}.png").read_bytes() == output_bytes(job.image.read_bytes(), prompt), job.name


class ServerLines(SilentProgress):
    """Progress that keeps which server each turn started on, and the warnings."""

    def __init__(self):
        self.servers, self.started, self.states, self.warnings = [], [], [], []

    def start(self, total, already, servers):
        self.servers = list(servers)

    def turn_started(self, server, label):
        self.started.append((server, label))

    def server_status(self, server, text):
        self.states.append((server, text))

    def warning(self, text):
        self.warnings.append(text)


@pytest.mark.parametrize("count", [2, 3])
def test_jobs_spread_over_every_server_within_max_queued(photos, tmp_path, count):
    out = tmp_path / "out"
    servers = fakes(*[f"gpu{i}" for i in range(count)])
    jobs = load_jobs([photos], prompts=["night"], seed=4)
    progress = ServerLines()
    summary = make_runner(servers, jobs, out, max_queued=2, progress=progress).run()
    assert summary.done == 6 and summary.failed == 0
    assert all(server.queued for server in servers)          # every server ran some
    assert all(server.max_in_queue <= 2 for server in servers)
    assert sum(len(server.queued) for server in servers) == 6
    assert_outputs(out, jobs, "night")  # each output made from the upload on the server that ran it
    by_url = {server.base_url: server for server in servers}
    for record in records(out, "done"):
        assert record["prompt_id"] in {pid for pid, _ in by_url[record["server"]].queued}
    assert progress.servers == [f"gpu{i}:8188" for i in range(count)]
    assert {server for server, _ in progress.started} == set(progress.servers)


def test_a_server_dying_mid_job_hands_its_turns_to_the_other_and_is_used_again_once_back(photos, tmp_path):
    out = tmp_path / "out"
    gpu0, gpu1 = servers = fakes("gpu0", "gpu1")
    jobs = load_jobs([photos], prompts=["night"])
    starts, lost_image, lost_prompt, revived_at = [], [], [], []

    def image_of(server, prompt_id):
        return dict(server.queued)[prompt_id]["5"]["inputs"]["image"]

    def die_on_second_start(event):
        if event["type"] == "execution_start":
            starts.append(event)
            if len(starts) == 2:
                lost_image.append(image_of(gpu1, event["data"]["prompt_id"]))
                lost_prompt.append(event["data"]["prompt_id"])
                gpu1.kill()  # mid-job: the running turn is lost with it

    def revive_once_the_lost_turn_runs_here(event):
        if event["type"] == "execution_start" and image_of(gpu0, event["data"]["prompt_id"]) in lost_image:
            revived_at.append(len(gpu1.queued))
            gpu1.revive()

    gpu1.on_event, gpu0.on_event = die_on_second_start, revive_once_the_lost_turn_runs_here
    # One turn queued per server, and a down server asked again on every round: it is back while work is left.
    summary = make_runner(servers, jobs, out, max_queued=1, backoff_s=(0.0, 0.0)).run()
    assert summary.done == 6 and summary.failed == 0 and summary.stopped is None
    assert_outputs(out, jobs, "night")
    assert sorted(finished_per_job(servers).values()) == [1] * 6  # each job finished once: nothing ran twice
    assert revived_at  # the turn lost on gpu1 ran on gpu0
    lost = next(r for r in records(out, "queued") if r["prompt_id"] == lost_prompt[0])
    done = {r["key"]: r for r in records(out, "done")}
    assert done[lost["key"]]["server"] == gpu0.base_url and done[lost["key"]]["attempt"] == 1  # not a failed attempt
    assert len(gpu1.queued) > revived_at[0]  # back in use once it answered

    gpu1.on_event = gpu0.on_event = None
    queued = len(gpu0.queued) + len(gpu1.queued)
    summary = make_runner(servers, jobs, out).run()
    assert summary.done == 0 and summary.skipped_done == 6 and len(gpu0.queued) + len(gpu1.queued) == queued


def test_an_unreachable_server_that_comes_back_drops_our_copies_of_turns_run_elsewhere(photos, tmp_path):
    out = tmp_path / "out"
    gpu0, gpu1 = servers = fakes("gpu0", "gpu1")
    jobs = load_jobs([photos], prompts=["night"])

    def cut_off_on_first_start(event):
        if event["type"] == "execution_start" and not gpu1.dead and not gpu1.deleted + gpu1.interrupted:
            gpu1.kill(lose_queue=False)  # the network, not the server: its queue is intact behind it

    def reconnect_later(event):
        if event["type"] == "execution_success" and gpu1.dead and len(gpu0.finished) >= 2:
            gpu1.revive()

    gpu1.on_event, gpu0.on_event = cut_off_on_first_start, reconnect_later
    summary = make_runner(servers, jobs, out, max_queued=2).run()
    assert summary.done == 6 and summary.failed == 0
    cut_off = {pid for pid, _ in gpu1.queued[:2]}
    assert set(gpu1.deleted) | set(gpu1.interrupted) == cut_off  # the running one interrupted, the waiting one deleted
    assert len(records(out, "done")) == 6 and len({r["key"] for r in records(out, "done")}) == 6
    assert_outputs(out, jobs, "night")


def test_every_server_down_stops_with_exit_2_and_a_rerun_resumes(photos, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    servers = fakes("gpu0", "gpu1")
    by_url = {server.base_url: server for server in servers}
    monkeypatch.setattr(cli, "ComfyClient", lambda url, timeout: by_url[url])
    successes = []

    def power_cut(event):
        if event["type"] == "execution_success":
            successes.append(event)
            if len(successes) == 3:
                for server in servers:
                    server.kill()

    for server in servers:
        server.on_event = power_cut
    args = [str(photos), "-o", str(out), "-p", "night", "--url", "http://gpu0:8188", "--url", "http://gpu1:8188",
            "--wait-for-servers", "0", "-q"]
    code = cli.main(args)
    err = capsys.readouterr().err
    assert code == 2
    assert "no ComfyUI server answers (gpu0:8188: [Errno 111] Connection refused; gpu1:8188:" in err
    assert "turn(s) not done" in err and "run the same command to resume" in err
    lines = (out / "manifest.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines)  # whole lines only
    done_before = {r["key"] for r in records(out, "done")}
    assert 2 <= len(done_before) < 6
    assert all((out / name).exists() for r in records(out, "done") for name in r["outputs"])

    for server in servers:  # back, with empty queues: the prompts queued before are unknown to them
        server.revive()
        server.on_event = None
    queued_before = len(records(out, "queued"))
    code = cli.main(args)
    assert code == 0, capsys.readouterr().err
    requeued = {r["key"] for r in records(out, "queued")[queued_before:]}
    assert requeued and not requeued & done_before  # what finished is not run again
    jobs = load_jobs([photos], prompts=["night"])
    assert_outputs(out, jobs, "night")
    assert all(count == 1 for count in finished_per_job(servers).values())


class FakeClock:
    """time.monotonic and time.sleep for the runner and the server pool: a sleep moves the clock at once."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self):
        return self.now

    def sleep(self, seconds):
        assert seconds >= 0
        self.now += seconds


def test_the_wait_for_a_server_to_come_back_ends_at_wait_for_servers(photos, tmp_path, capsys, monkeypatch):
    """With every server down, the run stops once --wait-for-servers has passed, not at the end of the nap or
    back-off under way then (the default back-off: 2 s, then 4 s; the limit falls between two tries)."""
    clock = FakeClock()
    monkeypatch.setattr(kontext_batch.runner, "time", clock)
    monkeypatch.setattr(kontext_batch.servers, "time", clock)
    servers = fakes("gpu0", "gpu1")
    by_url = {server.base_url: server for server in servers}
    monkeypatch.setattr(cli, "ComfyClient", lambda url, timeout: by_url[url])
    down_at = []

    def power_cut(event):
        if event["type"] == "execution_success" and not down_at:
            down_at.append(clock.now)
            for server in servers:
                server.kill()

    for server in servers:
        server.on_event = power_cut
    wait_s = 2.5
    code = cli.main([str(photos), "-o", str(tmp_path / "out"), "-p", "night", "--url", "http://gpu0:8188",
                     "--url", "http://gpu1:8188", "--wait-for-servers", str(wait_s), "-q"])
    assert code == 2
    assert "no ComfyUI server answers (gpu0:8188: [Errno 111] Connection refused" in capsys.readouterr().err
    waited = clock.now - down_at[0]
    assert wait_s <= waited <= wait_s + 0.01


def test_object_info_is_asked_once_per_server_in_a_run(photos, tmp_path, monkeypatch):
    servers = fakes("gpu0", "gpu1")
    by_url = {server.base_url: server for server in servers}
    monkeypatch.setattr(cli, "ComfyClient", lambda url, timeout: by_url[url])
    args = [str(photos), "-p", "x", "--url", "http://gpu0:8188", "--url", "http://gpu1:8188", "-q"]
    assert cli.main(args + ["-o", str(tmp_path / "dry"), "--dry-run"]) == 0
    assert [server.object_info_asked for server in servers] == [1, 1]
    assert cli.main(args + ["-o", str(tmp_path / "out")]) == 0
    assert [server.object_info_asked for server in servers] == [2, 2]  # one more each: a new run
    assert all(server.queued for server in servers)


def test_resume_asks_each_turn_of_the_server_it_went_to(photos, tmp_path):
    out = tmp_path / "out"
    gpu0, gpu1 = servers = fakes("gpu0", "gpu1")
    jobs = load_jobs([photos], prompts=["night"])
    manifest = Manifest(out / "manifest.jsonl")
    # job 0: finished on gpu0 after the last run stopped listening: collected from gpu0's history
    manifest.append("queued", key=jobs[0].key, turn=0, prompt_id="gpu0-old", attempt=1, server=gpu0.base_url)
    gpu0.files["output//old.png"] = b"made on gpu0 while we were away"
    gpu0.histories["gpu0-old"] = {"status": {"status_str": "success", "completed": True, "messages": []},
                                  "outputs": {"8": {"images": [{"filename": "old.png", "subfolder": "",
                                                                "type": "output"}]}}}
    # job 1: queued on gpu1, which restarted since: unknown to its queue and history, so queued again
    manifest.append("queued", key=jobs[1].key, turn=0, prompt_id="gpu1-lost", attempt=1, server=gpu1.base_url)
    # job 2: done on gpu1 in an earlier run
    manifest.append("done", key=jobs[2].key, turn=0, outputs=["img2.png"], server=gpu1.base_url)
    (out / "img2.png").write_bytes(b"done before")
    # job 3: recorded before servers were (no server field) and still waiting in gpu1's queue: followed there
    upload = gpu1.upload_image(jobs[3].image.read_bytes(), "img3.png")
    graph = load_workflow("kontext_edit").graph
    graph["5"]["inputs"]["image"], graph["6"]["inputs"]["prompt"] = upload, "night"
    waiting = gpu1.queue_prompt(graph)
    manifest.append("queued", key=jobs[3].key, turn=0, prompt_id=waiting, attempt=1)
    # job 4: queued on a server not in this run's set: queued again
    manifest.append("queued", key=jobs[4].key, turn=0, prompt_id="elsewhere", attempt=1, server="http://gone:8188")

    summary = make_runner(servers, jobs, out).run()
    assert summary.skipped_done == 1 and summary.done == 5 and summary.failed == 0
    assert (out / "img0.png").read_bytes() == b"made on gpu0 while we were away"
    assert (out / "img2.png").read_bytes() == b"done before"
    done = {r["key"]: r for r in records(out, "done")}
    assert done[jobs[0].key]["prompt_id"] == "gpu0-old" and done[jobs[3].key]["prompt_id"] == waiting
    queued_now = {r["key"] for r in records(out, "queued")[4:]}  # after the four written above
    assert queued_now == {jobs[1].key, jobs[4].key, jobs[5].key}
    assert_outputs(out, [jobs[1], jobs[3], jobs[4], jobs[5]], "night")


def test_multi_turn_chains_cross_servers_with_the_previous_output_uploaded(photos, tmp_path):
    out = tmp_path / "out"
    gpu0, gpu1 = servers = fakes("gpu0", "gpu1")
    turns = ["add a hat", "make it winter", "watercolor"]
    jobs = load_jobs([photos / "img1.png"], prompts=turns)
    summary = make_runner(servers, jobs, out).run()
    assert summary.done == 3
    done = records(out, "done")
    # Ties go to the server given fewest turns, so a lone chain alternates.
    assert [r["server"] for r in done] == [gpu0.base_url, gpu1.base_url, gpu0.base_url]
    expected = (photos / "img1.png").read_bytes()
    for turn, prompt in enumerate(turns):
        expected = output_bytes(expected, prompt)
        assert (out / f"img1_turn{turn + 1}.png").read_bytes() == expected
    assert (out / "img1_turn1.png").read_bytes() in gpu1.uploads.values()  # turn 1's output, uploaded for turn 2
    assert (out / "img1_turn2.png").read_bytes() in gpu0.uploads.values()


def test_a_server_down_at_the_start_joins_once_it_answers(photos, tmp_path):
    out = tmp_path / "out"
    gpu0, gpu1 = servers = fakes("gpu0", "gpu1")
    gpu1.kill()
    gpu0.on_event = lambda event: gpu1.revive() if event["type"] == "execution_success" else None
    progress = ServerLines()
    summary = make_runner(servers, load_jobs([photos], prompts=["x"]), out, progress=progress).run()
    assert summary.done == 6 and gpu0.queued and gpu1.queued
    messages = progress.warnings
    assert any(m.startswith("gpu1:8188 does not answer") for m in messages)
    assert "gpu1:8188 answers now; it takes jobs" in messages


def test_a_server_without_the_nodes_is_refused_at_the_start(photos, tmp_path):
    gpu0 = fakes("gpu0")[0]
    bare = FakeComfy({}, name="bare")
    with pytest.raises(BatchError, match="bare:8188: kontext_edit_api.json uses node types this ComfyUI does not have"):
        make_runner([gpu0, bare], load_jobs([photos], prompts=["x"]), tmp_path / "out").run()
    assert gpu0.queued == [] and bare.queued == []


def test_a_server_refusing_the_workflow_leaves_the_batch_to_the_others(photos, tmp_path):
    out = tmp_path / "out"
    gpu0, gpu1 = servers = fakes("gpu0", "gpu1")
    gpu0.rejection = {"error": {"message": "Prompt outputs failed validation"},
                      "node_errors": {"2": {"class_type": "KontextModelLoader",
                                            "errors": [{"message": "Value not in list", "details": "model_name"}]}}}
    progress = ServerLines()
    summary = make_runner(servers, load_jobs([photos], prompts=["x"]), out, progress=progress).run()
    assert summary.done == 6 and summary.failed == 0 and len(gpu1.queued) == 6
    messages = progress.warnings
    assert any(m.startswith("gpu0:8188 takes no jobs of this batch: it rejected the workflow") for m in messages)


@pytest.mark.parametrize("hosts, ports, urls, expected", [
    ([], [], [], ["http://127.0.0.1:8188"]),
    (["gpu0", "gpu1"], [], [], ["http://gpu0:8188", "http://gpu1:8188"]),
    (["gpu0", "gpu1"], [8190], [], ["http://gpu0:8190", "http://gpu1:8190"]),
    (["gpu0", "gpu1"], [8188, 8190], [], ["http://gpu0:8188", "http://gpu1:8190"]),
    ([], [8188, 8189], [], ["http://127.0.0.1:8188", "http://127.0.0.1:8189"]),
    ([], [], ["gpu0:8188", "https://box/comfy/"], ["http://gpu0:8188", "https://box/comfy"]),
    (["gpu1"], [], ["http://gpu0:8188"], ["http://gpu0:8188", "http://gpu1:8188"]),
])
def test_host_port_and_url_name_the_servers(hosts, ports, urls, expected):
    assert server_urls(hosts, ports, urls) == expected


def test_hosts_and_ports_that_do_not_pair_are_refused():
    with pytest.raises(BatchError, match="3 --host and 2 --port do not pair up"):
        server_urls(["a", "b", "c"], [1, 2])
    with pytest.raises(BatchError, match="http://a:8188 is named twice"):
        server_urls(["a"], [], ["http://a:8188"])


def test_dry_run_says_which_servers_answer(photos, tmp_path, capsys, monkeypatch):
    gpu0, gpu1 = servers = fakes("gpu0", "gpu1")
    gpu0.kill()
    by_url = {server.base_url: server for server in servers}
    monkeypatch.setattr(cli, "ComfyClient", lambda url, timeout: by_url[url])
    code = cli.main([str(photos), "-o", str(tmp_path / "out"), "-p", "x", "--host", "gpu0", "--host", "gpu1",
                     "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0 and gpu1.queued == []
    assert "server    http://gpu0:8188: does not answer ([Errno 111] Connection refused)" in out
    assert "server    http://gpu1:8188: answers, has the workflow's nodes" in out


def test_a_refused_upload_is_that_jobs_error_and_the_batch_goes_on(photos, tmp_path):
    from kontext_batch.errors import UploadRefused

    out = tmp_path / "out"
    gpu0, gpu1 = servers = fakes("gpu0", "gpu1")
    for server in servers:
        original = server.upload_image

        def refusing(content, filename, subfolder="kontext-batch", _original=original, _server=server):
            if filename.startswith("img3-"):
                raise UploadRefused(f"ComfyUI at {_server.base_url} refused the upload of {filename} "
                                    "(HTTP 413: too big)")
            return _original(content, filename, subfolder)

        server.upload_image = refusing
    jobs = load_jobs([photos], prompts=["night"])
    summary = make_runner(servers, jobs, out).run()
    assert summary.done == 5 and summary.failed == 1
    [error] = records(out, "error")
    assert "refused the upload of img3-" in error["error"] and "--retry-failed" in error["error"]


def test_http_refusals_name_the_server_and_the_request(tmp_path):
    """Through real HTTP: an upload refused (413) is an UploadRefused naming the server and the answer; any
    other error answer is a ServerRefused naming the server and the path, not a raw urllib traceback."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from kontext_batch.client import ComfyClient
    from kontext_batch.errors import ServerRefused, UploadRefused

    class Refusing(BaseHTTPRequestHandler):
        def _refuse(self):
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            code, text = (413, b"image too large") if self.path.startswith("/upload") else (500, b"boom")
            self.send_response(code)
            self.send_header("Content-Length", str(len(text)))
            self.end_headers()
            self.wfile.write(text)

        do_GET = do_POST = _refuse

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        client = ComfyClient(url, timeout=10)
        with pytest.raises(UploadRefused,
                           match=rf"ComfyUI at {url} refused the upload of a.png \(HTTP 413: image too large\)"):
            client.upload_image(b"\x89PNG", "a.png")
        with pytest.raises(ServerRefused, match=rf"ComfyUI at {url} answered /object_info with HTTP 500"):
            client.object_info()
    finally:
        server.shutdown()
