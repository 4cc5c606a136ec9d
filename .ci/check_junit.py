"""Fail when a pytest run executed no test (collected nothing, or skipped everything), and
print where each run's time went (the slowest test files), to keep the suite inside its
20-minute budget."""

import sys
import xml.etree.ElementTree as ET
from collections import Counter

SLOWEST_SHOWN = 8


def _test_file(classname: str) -> str:
    """tests.core.test_x (or tests.core.test_x.TestClass) -> tests/core/test_x.py"""
    parts = classname.split(".")
    ends = [i for i, part in enumerate(parts) if part.startswith("test_")]
    return "/".join(parts[: ends[0] + 1]) + ".py" if ends else classname


for path in sys.argv[1:]:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    tests = sum(int(s.get("tests", 0)) for s in suites)
    skipped = sum(int(s.get("skipped", 0)) for s in suites)
    ran = tests - skipped
    print(f"{path}: {tests} collected, {ran} ran")
    seconds_per_file: Counter[str] = Counter()
    for case in root.iter("testcase"):
        seconds_per_file[_test_file(case.get("classname", "?"))] += float(case.get("time", 0))
    for module, seconds in seconds_per_file.most_common(SLOWEST_SHOWN):
        print(f"  {seconds:7.1f} s  {module}")
    if ran <= 0:
        sys.exit(f"{path}: no test ran")
