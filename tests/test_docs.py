"""The docs follow the registry: every registered method is documented."""

from pathlib import Path

from nmgrad_cli import METHODS

ROOT = Path(__file__).resolve().parents[1]


def test_every_method_is_documented():
    text = (ROOT / "docs" / "methods.md").read_text()
    missing = [name for name in METHODS if f"`{name}`" not in text]
    assert not missing, f"docs/methods.md does not document {missing}"
