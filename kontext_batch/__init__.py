"""kontext-batch: many edits through the queue API of one running ComfyUI or several, resumable, with progress.

A client only: it never imports ComfyUI or the model. ComfyUI runs the workflow; this package fills the
workflow per job, keeps a bounded number of jobs in each server's queue, follows them over the websocket,
downloads the outputs and records every finished job in a JSONL manifest so that a re-run resumes.

  jobs.py      the jobs: a folder of images or a CSV/JSONL file, one prompt or a list of turns
  workflow.py  API-format workflows: loading, naming the fields to fill, checking them against the server
  manifest.py  the JSONL manifest: what finished, what failed, what was queued
  client.py    ComfyUI's HTTP and websocket API
  servers.py   the servers of a batch: which has room, which are down, when to ask them again
  runner.py    the loop: queue, follow, retry, download, interrupt
  progress.py  the bars on stderr
  cli.py       the `kontext-batch` command
"""

from .jobs import Job, load_jobs
from .manifest import Manifest
from .workflow import Workflow, load_workflow

__all__ = ["Job", "Manifest", "Workflow", "load_jobs", "load_workflow"]
