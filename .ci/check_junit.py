"""Fail when a pytest run executed no test (collected nothing, or skipped everything)."""

import sys
import xml.etree.ElementTree as ET

for path in sys.argv[1:]:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    tests = sum(int(s.get("tests", 0)) for s in suites)
    skipped = sum(int(s.get("skipped", 0)) for s in suites)
    ran = tests - skipped
    print(f"{path}: {tests} collected, {ran} ran")
    if ran <= 0:
        sys.exit(f"{path}: no test ran")
