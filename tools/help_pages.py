"""The nodes' help pages (js/docs/<node id>.md, which ComfyUI's node help panel shows): the part below the marker
line, the inputs and outputs, is written here from the nodes' declarations (nodes/*.py spec()); the part above
it (what the node does, its picture in a typical graph) is written by hand.

    python tools/help_pages.py           # rewrite the generated part of every page; a new node gets a page to fill
    python tools/help_pages.py --check   # exit 1, naming each stale page

The pictures (js/docs/img/<node id>.jpg) come from example_workflows/thumbnails.py.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "js" / "docs"
MARKER = ("<!-- Inputs and outputs below are written by tools/help_pages.py from the node's spec(); "
          "do not edit them. -->")
NEW_PAGE = """# {display_name}

TODO: what the node does, in a typical graph; then `python tools/help_pages.py`.

![{display_name} in a typical graph](img/{node_id}.jpg)
"""


def pack_nodes() -> list:
    """The pack's NodeSpecs, in the Add Node menu's order (imported as ComfyUI imports the pack)."""
    name = "example_workflows_build"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "example_workflows" / "build.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    build = sys.modules[name]
    build.load_pack()
    return [node.spec() for node in importlib.import_module(f"{build.PACK}.nodes").NODES]


def _number(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _wires(specs: list, type_name: str) -> tuple[list[str], list[str]]:
    """(nodes that output `type_name`, nodes with an input of it): the pack's own wires, named where they lead."""
    sources = [s.display_name for s in specs if any(o.type == type_name for o in s.outputs)]
    targets = [s.display_name for s in specs if any(type_name in i.accepted_types for i in s.inputs)]
    return sources, targets


def _input_line(item, specs: list) -> str:
    kind = " or ".join(item.accepted_types)
    facts = []
    if item.type == "COMBO":
        choices = item.choices() if not callable(item.options) else []
        facts.append(f"one of {', '.join(f'`{c}`' for c in choices)}" if choices else "a file from the list")
    elif item.type in ("INT", "FLOAT") and item.min is not None:
        facts.append(f"{_number(item.min)} to {_number(item.max)}")
    if item.is_widget and item.default not in (None, ""):
        facts.append(f"default `{_number(item.default)}`")
    if item.optional:
        facts.append("optional")
    if item.control_after_generate:
        facts.append("with *control after generate*")
    if item.type.startswith("KONTEXT_"):
        sources, _ = _wires(specs, item.type)
        facts.append(f"from {' or '.join(sources)}")
    line = f"- **{item.name}** ({kind}{'; ' + '; '.join(facts) if facts else ''})"
    return line + (f": {item.tooltip}" if item.tooltip else "")


def _output_line(item, specs: list) -> str:
    facts = ""
    if item.type.startswith("KONTEXT_"):
        _, targets = _wires(specs, item.type)
        facts = f"; to {', '.join(targets)}"
    return f"- **{item.name}** ({item.type}{facts})" + (f": {item.tooltip}" if item.tooltip else "")


def generated_part(spec, specs: list) -> str:
    lines = [MARKER, "", "## Inputs", ""]
    lines += [_input_line(item, specs) for item in spec.inputs] or ["None."]
    lines += ["", "## Outputs", ""]
    lines += [_output_line(item, specs) for item in spec.outputs] or ["None."]
    return "\n".join(lines) + "\n"


def page_path(node_id: str) -> Path:
    return DOCS / f"{node_id}.md"


def written_page(spec, specs: list) -> str:
    """The page as it should be: its hand-written part (or a new page's stub), then the generated part."""
    path = page_path(spec.node_id)
    text = path.read_text() if path.exists() else NEW_PAGE.format(display_name=spec.display_name,
                                                                   node_id=spec.node_id)
    if MARKER not in text and "\n## Inputs\n" in text:
        raise SystemExit(f"{path.relative_to(REPO)} has an inputs section but not the line that starts the generated "
                         f"part; put it back above '## Inputs':\n{MARKER}")
    hand_written = text.split(MARKER)[0].rstrip() + "\n\n"
    return hand_written + generated_part(spec, specs)


def stale_pages() -> list[str]:
    """What is out of date, one line each, saying how to fix it."""
    specs = pack_nodes()
    problems = []
    for spec in specs:
        path = page_path(spec.node_id)
        if not path.exists():
            problems.append(f"{spec.node_id} has no help page {path.relative_to(REPO)}: run python "
                            "tools/help_pages.py and fill in its description")
        elif path.read_text() != written_page(spec, specs):
            problems.append(f"{path.relative_to(REPO)} is stale (its inputs or outputs differ from "
                            f"{spec.node_id}.spec()): run python tools/help_pages.py")
    known = {spec.node_id for spec in specs}
    for path in sorted(DOCS.glob("*.md")):
        if path.stem not in known:
            problems.append(f"{path.relative_to(REPO)} is the page of no node: remove it")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only say which pages are stale (exit 1 if any)")
    args = parser.parse_args()
    if args.check:
        problems = stale_pages()
        print("\n".join(problems) or "every help page is up to date")
        sys.exit(1 if problems else 0)
    specs = pack_nodes()
    DOCS.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        path = page_path(spec.node_id)
        page = written_page(spec, specs)
        if not path.exists() or path.read_text() != page:
            print(f"{'wrote' if path.exists() else 'new page (describe the node in it)'}: {path.relative_to(REPO)}")
            path.write_text(page)


if __name__ == "__main__":
    main()
