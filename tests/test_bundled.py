"""What ships inside the package names nothing of the machine it was made on."""
import re
from pathlib import Path

import yaml

BUNDLED = Path(__file__).resolve().parents[1] / "visionattn" / "bundled"


def _strings(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)
    elif isinstance(node, str):
        yield node


def test_no_bundled_file_names_a_path_of_the_build_machine():
    texts = [p for p in BUNDLED.rglob("*") if p.suffix in (".yaml", ".yml", ".md", ".json", ".txt")]
    assert texts
    machine = re.compile(r"(/work/|/home/|/root/|/tmp/|/Users/|[A-Za-z]:\\)")
    for path in texts:
        assert not machine.search(path.read_text()), path
    for path in BUNDLED.rglob("config.yaml"):
        for value in _strings(yaml.safe_load(path.read_text())):
            assert not value.startswith("/"), (path, value)
