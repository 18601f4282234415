"""The nodes' help pages (js/docs/<node id>.md, read by ComfyUI's node help panel at
/extensions/<pack>/docs/<node id>.md): one per node, written by hand above tools/help_pages.py's marker, with
inputs and outputs below it that match the node's spec(), and a picture of the node in a graph."""

from __future__ import annotations

import re

import pytest

from node_pack import REPO, module_from_file, nodes_module

DOCS = REPO / "js" / "docs"


def _generator():
    return module_from_file("kontext_help_pages", REPO / "tools" / "help_pages.py")


SPECS = [node.spec() for node in nodes_module().NODES]


def test_every_node_has_a_page_and_every_page_a_node():
    pages = {p.stem for p in DOCS.glob("*.md")}
    missing = [s.node_id for s in SPECS if s.node_id not in pages]
    assert not missing, f"no help page for {missing}: run python tools/help_pages.py and describe the node(s)"
    assert pages <= {s.node_id for s in SPECS}, f"pages of no node: {pages - {s.node_id for s in SPECS}}"


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.node_id)
def test_page_lists_the_inputs_and_outputs_of_the_spec(spec):
    page = (DOCS / f"{spec.node_id}.md").read_text()
    rerun = f"js/docs/{spec.node_id}.md is stale: run python tools/help_pages.py"
    help_pages = _generator()
    assert help_pages.MARKER in page, rerun
    generated = page.split(help_pages.MARKER)[1]
    inputs, outputs = generated.split("## Outputs")
    assert re.findall(r"^- \*\*(\w+)\*\*", inputs, re.M) == [i.name for i in spec.inputs], rerun
    assert re.findall(r"^- \*\*(\w+)\*\*", outputs, re.M) == [o.name for o in spec.outputs], rerun
    assert page == help_pages.written_page(spec, SPECS), rerun  # types, ranges, defaults, tooltips too


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.node_id)
def test_page_describes_the_node_and_shows_it_in_a_graph(spec):
    hand_written = (DOCS / f"{spec.node_id}.md").read_text().split(_generator().MARKER)[0]
    assert hand_written.startswith(f"# {spec.display_name}\n")
    assert "TODO" not in hand_written, f"js/docs/{spec.node_id}.md: describe the node"
    prose = [line for line in hand_written.splitlines()[1:] if line and not line.startswith(("#", "!["))]
    assert len(" ".join(prose)) > 200, f"js/docs/{spec.node_id}.md says little about the node"
    # The help panel resolves a relative picture against /extensions/<pack>/docs/.
    pictures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", hand_written)
    assert pictures, f"js/docs/{spec.node_id}.md shows no graph"
    for picture in pictures:
        assert not picture.startswith(("/", "http")) and (DOCS / picture).exists(), (
            f"js/docs/{spec.node_id}.md: {picture} is missing: run python example_workflows/thumbnails.py")


def test_generator_check_finds_nothing_stale():
    assert _generator().stale_pages() == []
