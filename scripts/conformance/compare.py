#!/usr/bin/env python3
"""Compares two pytest --junitxml reports of llama.cpp's server suite: the
direct run and the run through kvgate (scripts/conformance.sh).

Prints the totals of each run and a table of the tests whose outcome differs
(direct -> through kvgate), with the first line of kvgate's failure. Exits 1
if any test differs that EXPECTED does not list.

usage: compare.py DIRECT.xml KVGATE.xml
"""
import sys
import xml.etree.ElementTree as ET

# Differences kvgate makes on purpose: test id -> reason. Only kvgate's
# refusals that protect its own files and other clients may go here (see
# the README's "Security" section); none of the suite's tests meets one.
EXPECTED: dict[str, str] = {}


def outcomes(path):
    """test id -> (outcome, first line of the message)."""
    out = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        tid = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome, msg = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                msg = (el.get("message") or el.text or "").strip().splitlines()
                msg = msg[0] if msg else ""
                break
        out[tid] = (outcome, msg)
    return out


def totals(res):
    counts = {}
    for outcome, _ in res.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    return ", ".join(f"{k} {counts[k]}" for k in sorted(counts)) or "no tests"


def main():
    direct, kvgate = outcomes(sys.argv[1]), outcomes(sys.argv[2])
    print(f"direct:        {totals(direct)}")
    print(f"through kvgate: {totals(kvgate)}")
    unexpected = 0
    rows = []
    for tid in sorted(set(direct) | set(kvgate)):
        d = direct.get(tid, ("missing", ""))
        k = kvgate.get(tid, ("missing", ""))
        if d[0] == k[0]:
            continue
        note = EXPECTED.get(tid)
        if note is None:
            unexpected += 1
        rows.append((tid, d[0], k[0], f"expected: {note}" if note else k[1][:160]))
    if rows:
        print(f"\n{len(rows)} tests differ ({unexpected} unexpected):")
        w = max(len(r[0]) for r in rows)
        for tid, d, k, why in rows:
            print(f"  {tid:<{w}}  {d:>7} -> {k:<7}  {why}")
    else:
        print("\nno test differs")
    # Not counted as differences, but worth a look: a test that fails both
    # ways may fail for another reason through kvgate.
    other = [(tid, direct[tid][1], kvgate[tid][1]) for tid in sorted(set(direct) & set(kvgate))
             if direct[tid][0] == kvgate[tid][0] != "passed" and direct[tid][1] != kvgate[tid][1]]
    if other:
        print(f"\n{len(other)} tests fail both ways, with another message through kvgate:")
        for tid, d, k in other:
            print(f"  {tid}\n      direct: {d[:140]}\n      kvgate: {k[:140]}")
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
