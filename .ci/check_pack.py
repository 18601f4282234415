"""The registry's view of the pack: `comfy node validate` must pass without a warning, and the zip that
`comfy node pack` builds (git-tracked files less .comfyignore) must hold the pack and none of its tests.

    python .ci/check_pack.py [--comfy PATH_TO_COMFY]

comfy-cli only warns about most mistakes (a malformed requires-comfyui or license, a bad classifier, ruff's
security findings) and exits 0, so its output is read too. Runs offline; never asks anything (no stdin in CI).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MUST_HOLD = ("__init__.py", "pyproject.toml", "requirements.txt", "LICENSE", "nodes/", "kontext_core/",
             "kontext_kernels/", "js/", "js/docs/", "example_workflows/")
MUST_NOT_HOLD = ("tests/", "bench/", ".ci/", "tools/")
# What comfy-cli prints when it finds something wrong but carries on.
COMPLAINTS = ("warning", "error", "invalid")


def comfy(executable: str, *command: str) -> str:
    """Run comfy-cli in the repository, non-interactively and without telemetry; its output, or exit 1."""
    env = {**os.environ, "DO_NOT_TRACK": "1", "NO_COLOR": "1", "COLUMNS": "200"}
    done = subprocess.run([executable, "--skip-prompt", "--no-enable-telemetry", "--no-json", *command], cwd=REPO,
                          env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    print(output.rstrip())
    if done.returncode != 0:
        sys.exit(f"`comfy {' '.join(command)}` failed (exit {done.returncode})")
    return output


def validate(executable: str) -> None:
    output = comfy(executable, "node", "validate")
    complaints = [line for line in output.splitlines() if any(word in line.lower() for word in COMPLAINTS)]
    if complaints:
        sys.exit("comfy node validate complained:\n" + "\n".join(complaints))


def pack(executable: str, into: Path) -> list[str]:
    """The names in the zip `comfy node pack` writes (moved out of the repository into `into`)."""
    comfy(executable, "node", "pack")
    built = REPO / "node.zip"
    if not built.exists():
        sys.exit("comfy node pack wrote no node.zip")
    kept = into / "node.zip"
    shutil.move(built, kept)
    with zipfile.ZipFile(kept) as archive:
        return archive.namelist()


def problems(names: list[str]) -> list[str]:
    found = []
    for wanted in MUST_HOLD:
        if not any(n == wanted or (wanted.endswith("/") and n.startswith(wanted)) for n in names):
            found.append(f"the package lacks {wanted}")
    for unwanted in MUST_NOT_HOLD:
        leaked = [n for n in names if n.startswith(unwanted)]
        if leaked:
            found.append(f"the package holds {unwanted} ({len(leaked)} files, e.g. {leaked[0]}): "
                         "add it to .comfyignore")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfy", default=shutil.which("comfy") or "comfy", help="the comfy-cli executable")
    args = parser.parse_args()
    validate(args.comfy)
    with tempfile.TemporaryDirectory() as folder:
        names = pack(args.comfy, Path(folder))
    found = problems(names)
    if found:
        sys.exit("comfy node pack:\n" + "\n".join(found))
    print(f"the package: {len(names)} files; holds {', '.join(MUST_HOLD)}; no {', '.join(MUST_NOT_HOLD)}")


if __name__ == "__main__":
    main()
