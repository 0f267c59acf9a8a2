"""Print how many tests each lane (tests/<lane>/) ran, passed, failed and skipped, from pytest's JUnit XML."""

import sys
import xml.etree.ElementTree as ElementTree
from collections import Counter, defaultdict

counts: dict[str, Counter] = defaultdict(Counter)
skip_reasons: dict[str, set] = defaultdict(set)
for case in ElementTree.parse(sys.argv[1]).iter("testcase"):
    parts = case.get("classname", "").split(".")
    lane = parts[1] if len(parts) > 1 and parts[0] == "tests" else parts[0]
    outcome = "passed"
    for child in case:
        if child.tag in ("failure", "error"):
            outcome = "failed"
        elif child.tag == "skipped":
            outcome = "skipped"
            skip_reasons[lane].add(child.get("message", ""))
    counts[lane][outcome] += 1

print("\nlanes:")
for lane in sorted(counts):
    c = counts[lane]
    ran = c["passed"] + c["failed"]
    print(f"  lane {lane} ran {ran} tests ({c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped)")
    for reason in sorted(skip_reasons[lane]):
        print(f"    skipped because: {reason}")
total = sum(counts.values(), Counter())
print(f"total: {total['passed']} passed, {total['failed']} failed, {total['skipped']} skipped")
