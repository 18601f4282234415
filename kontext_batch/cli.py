"""`kontext-batch`: argument parsing, then the runner. Exit codes: 0 all done, 1 some jobs failed,
2 bad input, no server at the start (nothing queued) or none left answering (re-run the same command to
resume), 130 interrupted (likewise)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from .client import ComfyClient, server_urls
from .errors import BatchError, ServerUnreachable
from .jobs import NAMED_FIELDS, load_jobs, read_turns_file
from .manifest import Manifest
from .progress import BarProgress
from .runner import BatchRunner
from .servers import Server
from .workflow import FIELDS, FieldMap, load_workflow

EPILOG = """examples:
  kontext-batch photos/ --prompt "make it a snowy night" -o out/
  kontext-batch jobs.csv -o out/ --workflow my_workflow_api.json --prompt-field "Positive" --seed-field 3.seed
  kontext-batch photos/ --turns turns.txt -o out/            (each line of turns.txt is one turn)
  kontext-batch photos/ -p "..." -o out/ --url http://gpu0:8188 --url http://gpu1:8188   (two servers)
  kontext-batch photos/ -p "..." -o out/ --port 8188 --port 8189                      (two on this machine)
A re-run of the same command skips what out/manifest.jsonl records as done."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kontext-batch", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Edit many images through a running ComfyUI's queue API: resumable, with progress.")
    parser.add_argument("inputs", nargs="+", help="a folder of images, image files, or a .csv / .jsonl job list "
                        "(columns: image, prompt or prompts, seed, steps, guidance, or any NODE.INPUT)")
    parser.add_argument("-o", "--output", required=True, type=Path,
                        help="folder for the outputs and manifest.jsonl (the resume record)")
    turns = parser.add_argument_group("prompts")
    turns.add_argument("-p", "--prompt", action="append", default=[],
                       help="the edit instruction for every image (repeat it for a multi-turn edit: each turn "
                            "edits the previous turn's output); fills CSV/JSONL rows without a prompt")
    turns.add_argument("--turns", type=Path, help="a text file of turns, one prompt per line (instead of --prompt)")
    turns.add_argument("--seed", type=int, help="seed for jobs without one (default: the workflow's)")
    server = parser.add_argument_group(
        "servers (as comfy-cli names them; repeat them to spread the batch over several ComfyUI servers)")
    server.add_argument("--host", action="append", default=[], help="ComfyUI's host (default 127.0.0.1)")
    server.add_argument("--port", action="append", default=[], type=int,
                        help="its port (default 8188): one --port applies to every --host; several pair with the "
                             "--host in order, or with a single --host make one server per port")
    server.add_argument("--url", action="append", default=[],
                        help="a full address instead of --host/--port, e.g. http://gpu-box:8188")
    server.add_argument("--timeout", type=float, default=60.0,
                        help="seconds a server may take to answer before it counts as down (default 60)")
    server.add_argument("--wait-for-servers", type=float, default=60.0, metavar="SECONDS",
                        help="when no server answers, how long to wait for one to come back before stopping "
                             "with exit code 2 (default 60); a re-run resumes")
    flow = parser.add_argument_group("workflow")
    flow.add_argument("-w", "--workflow", default="kontext_edit",
                      help="an API-format workflow file, or a pack workflow name (default kontext_edit)")
    for name in FIELDS:
        flow.add_argument(f"--{name}-field", action="append", dest=f"{name}_field", metavar="NODE[.INPUT]",
                          help=f"the input that takes the {name}: node title or id (default: found by node type)")
    flow.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                      help="set a workflow input for every job (e.g. --set 'Kontext Edit.denoise=0.9')")
    flow.add_argument("--output-node", action="append", default=[], metavar="NODE",
                      help="take images from this node only (default: every output node; saved images first)")
    run = parser.add_argument_group("running")
    run.add_argument("--max-queued", type=int, default=2,
                     help="jobs kept in each server's queue at once (default 2: one running, one waiting)")
    run.add_argument("--retries", type=int, default=2,
                     help="retries of a failed job before it is recorded (default 2); failures a retry cannot "
                          "change (an unreadable image, a rejected value) get none")
    run.add_argument("--retry-failed", action="store_true", help="run again the jobs the manifest records as failed")
    run.add_argument("--dry-run", action="store_true", help="check jobs and workflow against the server, queue nothing")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bars or per-job lines")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    clients = []
    try:
        prompts = list(args.prompt)
        if args.turns is not None:
            if prompts:
                raise BatchError("give the turns either with --prompt or with --turns, not both")
            prompts = read_turns_file(args.turns)
        jobs = load_jobs(args.inputs, prompts=prompts, seed=args.seed)
        common = [_parse_setting(s) for s in args.set]
        if common:
            jobs = [_with_overrides(job, common) for job in jobs]
        workflow = load_workflow(args.workflow)
        if args.timeout <= 0:
            raise BatchError(f"--timeout {args.timeout:g}: give the seconds a server may take to answer, above 0")
        clients = [ComfyClient(url, timeout=args.timeout) for url in server_urls(args.host, args.port, args.url)]
        servers = [Server.for_client(client) for client in clients]  # each keeps its /object_info for the run
        object_info = _first_answer(servers)
        needed = {"prompt"}
        needed |= {"image"} if any(j.image is not None or j.turns > 1 for j in jobs) else set()
        needed |= {"seed"} if any(j.seed is not None for j in jobs) else set()
        needed |= {k for j in jobs for k, _ in j.overrides if k in NAMED_FIELDS}
        named = {f: getattr(args, f"{f}_field") or [] for f in FIELDS}
        fields = FieldMap(workflow, object_info, named, needed, args.output_node)
        manifest = Manifest(args.output / "manifest.jsonl")
        runner = BatchRunner(servers, fields, jobs, manifest, args.output, max_queued=args.max_queued,
                             retries=args.retries, retry_failed=args.retry_failed,
                             progress=BarProgress(quiet=args.quiet), wait_for_servers_s=args.wait_for_servers)
        if args.dry_run:
            _print_plan(fields, jobs, servers)
            return 0
        summary = runner.run()
    except BatchError as error:
        print(f"kontext-batch: error: {error}", file=sys.stderr)
        return 2
    finally:
        for client in clients:
            client.close()
    print(f"kontext-batch: {summary.done} turn(s) done, {summary.failed} job(s) failed, "
          f"{summary.skipped_done} already done, {summary.skipped_failed} failed before (--retry-failed reruns them), "
          f"{summary.remaining} turn(s) left; manifest: {args.output / 'manifest.jsonl'}")
    if summary.interrupted:
        print("kontext-batch: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    if summary.stopped:
        print(f"kontext-batch: error: {summary.stopped}", file=sys.stderr)
        return 2
    return 1 if summary.failed else 0


def _first_answer(servers: list[Server]) -> dict:
    """The node definitions of the first server that answers; the runner checks each of the others against
    the workflow when it first answers (a server down now may come up during the batch)."""
    unreachable = []
    for server in servers:
        try:
            return server.object_info()
        except ServerUnreachable as error:
            unreachable.append(error)
    if len(unreachable) == 1:
        raise unreachable[0]
    raise BatchError("no ComfyUI server answers: " + "; ".join(f"{e.url} ({e.reason})" for e in unreachable)
                     + ". Start ComfyUI on them, or name others with --url or --host/--port")


def _parse_setting(text: str) -> tuple[str, object]:
    name, equals, value = text.partition("=")
    if not equals or "." not in name and name not in NAMED_FIELDS:
        raise BatchError(f"--set {text!r}: write it as NODE.INPUT=VALUE (or steps=N, guidance=X)")
    return name.strip(), value.strip()


def _with_overrides(job, settings):
    given = {k for k, _ in job.overrides}
    return replace(job, overrides=tuple(s for s in settings if s[0] not in given) + job.overrides)


def _print_plan(fields: FieldMap, jobs, servers: list[Server]) -> None:
    workflow = fields.workflow
    for name, targets in fields.targets.items():
        if targets:
            print(f"{name:9s} -> {', '.join(workflow.describe(t) for t in targets)}")
    print(f"outputs   <- {', '.join(f'{workflow.title(n)} (node {n})' for n in fields.output_nodes)}")
    for server in servers:
        try:  # a server down or lacking nodes is said here, not fatal: the run would go on with the others
            fields.check_server(server.object_info())
            verdict = "answers, has the workflow's nodes"
        except ServerUnreachable as error:
            verdict = f"does not answer ({error.reason})"
        except BatchError as error:
            verdict = f"cannot run the batch: {error}"
        print(f"server    {server.url}: {verdict}")
    print(f"{len(jobs)} job(s), {sum(j.turns for j in jobs)} turn(s); checked, nothing queued (--dry-run)")


if __name__ == "__main__":
    sys.exit(main())
