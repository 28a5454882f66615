from pathlib import Path

from launcher.docgen import render

REPO = Path(__file__).resolve().parents[1]


def test_spec_reference_is_in_sync():
    on_disk = (REPO / "docs" / "spec-reference.md").read_text()
    assert on_disk == render(), "run: python -m launcher.docgen > docs/spec-reference.md"
