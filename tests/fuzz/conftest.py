"""Reports how many generated cases the fuzz suite ran (and writes the counts to $KIMIVL_FUZZ_REPORT if set)."""

import json
import os

from tests.fuzz.common import CASES


def pytest_terminal_summary(terminalreporter):
    if not CASES:
        return
    total = sum(CASES.values())
    terminalreporter.write_sep("-", f"fuzz: {total} generated cases run")
    for name, n in sorted(CASES.items()):
        terminalreporter.write_line(f"  {name:<40} {n}")
    report = os.environ.get("KIMIVL_FUZZ_REPORT")
    if report:
        with open(report, "w", encoding="utf-8") as f:
            json.dump({"total": total, "per_test": dict(sorted(CASES.items()))}, f, indent=2)
