"""The command line: ``python -m ipadapter_core.migrate IN.json [-o OUT.json]``."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .workflow import migrate


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m ipadapter_core.migrate",
                                     description=sys.modules[__package__].__doc__,  # the package's docstring
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workflow", type=Path, help="a workflow JSON (UI or API format)")
    parser.add_argument("-o", "--output", type=Path, help="where to write the migrated workflow (default: stdout)")
    args = parser.parse_args(argv)
    try:
        migrated, report = migrate(json.loads(args.workflow.read_text()))
    except (OSError, ValueError) as err:
        print(f"{args.workflow}: {err}", file=sys.stderr)
        return 2
    text = json.dumps(migrated, indent=2, ensure_ascii=False) + "\n"
    log = sys.stdout if args.output else sys.stderr
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    for line in report:
        print(line, file=log)
    counts = {status: sum(line.status == status for line in report)
              for status in ("mapped", "mapped with a difference in behaviour", "not supported")}
    print(f"{len(report)} node(s) of ComfyUI_IPAdapter_plus: " + ", ".join(f"{n} {s}" for s, n in counts.items()),
          file=log)
    return 0
