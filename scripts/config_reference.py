#!/usr/bin/env python
"""Print the key reference of docs/CONFIGURATION.md, as Markdown, from the declarations in
engine/config.py (each key's default, allowed values, help and whether a resumed run may change
it; then the retired keys). tests/test_docs.py checks that the page holds exactly this text.

    python scripts/config_reference.py
"""
from __future__ import annotations

import os
import sys
from typing import Any, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import yaml  # noqa: E402

from engine.config import KEYS, RETIRED_KEYS, Config, config_to_dict  # noqa: E402

BEGIN = "<!-- begin: python scripts/config_reference.py -->"
END = "<!-- end: python scripts/config_reference.py -->"


def _cell(text: str) -> str:
    """``text`` safe inside a Markdown table cell: no pipes, tags or emphasis."""
    for raw, safe in (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ("|", "\\|"), ("*", "\\*"), ("_", "\\_")):
        text = text.replace(raw, safe)
    return text


def _value(value: Any) -> str:
    """A default as YAML writes it on a command line (``null``, ``true``, ``[0.9, 0.999]``, ``''``)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    return text[:-len("...")].strip() if text.endswith("...") else text


def reference() -> str:
    """The Markdown between the page's BEGIN and END markers."""
    defaults = config_to_dict(Config())
    lines: List[str] = []
    section = None
    for dotted, spec in KEYS.items():
        name = dotted.split(".")[0]
        if name != section:
            section = name
            lines += ["", f"### `{name}`", "", "| key | default | allowed | what | may change on resume |",
                      "| --- | --- | --- | --- | --- |"]
        allowed = " \\| ".join(f"`{c}`" for c in spec.choices)
        what = _cell(spec.help) + (" (a path: a leading `~` is the home directory)" if spec.path else "")
        lines.append(f"| `{dotted}` | `{_value(defaults[name][dotted.split('.', 1)[1]])}` | {allowed} | {what} | "
                     f"{'yes' if spec.resumable else ''} |")
    lines += ["", "### Retired keys", "",
              "Keys the schema no longer has: a file that sets one (an older run directory's `config.yaml`, a "
              "checkpoint's stored config) loads with the key dropped; on the command line it is refused with this "
              "reason.", "", "| key | why it is gone |", "| --- | --- |"]
    lines += [f"| `{dotted}` | {_cell(reason)} |" for dotted, reason in RETIRED_KEYS.items()]
    return "\n".join(lines[1:])


def main() -> int:
    print(reference())
    return 0


if __name__ == "__main__":
    sys.exit(main())
