#!/usr/bin/env python3
"""Compares pytest --junitxml reports of llama.cpp's server suite: the direct
run and the run through kvgate (scripts/conformance.sh), and the reruns of the
tests whose outcome differed.

Prints the totals of each run and a table of the tests whose outcome differs
(direct -> through kvgate), with the first line of kvgate's failure. A test
counts as a difference when kvgate gave an outcome that none of the direct
runs gave, or never passed where a direct run passed: a test that both passes
and fails straight to llama-server, and does no worse through kvgate, is racy
by itself and is listed apart. Exits 1 if any difference is not in
EXPECTED.

usage: compare.py DIRECT.xml KVGATE.xml [--rerun DIRECT.xml KVGATE.xml]...
       compare.py --differing DIRECT.xml KVGATE.xml   # node ids to rerun
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


def node_id(tid):
    """'unit.test_x::test_y[a]' -> 'unit/test_x.py::test_y[a]' for pytest."""
    classname, name = tid.split("::", 1)
    parts = classname.split(".")
    return "::".join(["/".join(parts[:2]) + ".py", *parts[2:], name])


def totals(res):
    counts = {}
    for outcome, _ in res.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    return ", ".join(f"{k} {counts[k]}" for k in sorted(counts)) or "no tests"


def differing(direct, kvgate):
    return [tid for tid in sorted(set(direct) | set(kvgate))
            if direct.get(tid, ("missing",))[0] != kvgate.get(tid, ("missing",))[0]]


def main(argv):
    if argv[:1] == ["--differing"]:
        for tid in differing(outcomes(argv[1]), outcomes(argv[2])):
            print(node_id(tid))
        return 0
    direct, kvgate = outcomes(argv[0]), outcomes(argv[1])
    reruns = []
    rest = argv[2:]
    while rest[:1] == ["--rerun"]:
        reruns.append((outcomes(rest[1]), outcomes(rest[2])))
        rest = rest[3:]
    print(f"direct:        {totals(direct)}")
    print(f"through kvgate: {totals(kvgate)}")
    unexpected = 0
    rows, racy = [], []
    for tid in differing(direct, kvgate):
        seen_direct = {direct.get(tid, ("missing", ""))[0]}
        seen_kvgate = {kvgate.get(tid, ("missing", ""))[0]}
        for d_run, k_run in reruns:
            if tid in d_run:
                seen_direct.add(d_run[tid][0])
            if tid in k_run:
                seen_kvgate.add(k_run[tid][0])
        # Racy by itself: kvgate gave only outcomes the direct runs gave too,
        # and passed at least once if they did (a test kvgate always fails
        # while it passes straight is a difference, however racy).
        passes = "passed" not in seen_direct or "passed" in seen_kvgate
        if seen_kvgate <= seen_direct and passes:
            racy.append((tid, sorted(seen_direct), sorted(seen_kvgate)))
            continue
        note = EXPECTED.get(tid)
        if note is None:
            unexpected += 1
        d = direct.get(tid, ("missing", ""))
        k = kvgate.get(tid, ("missing", ""))
        rows.append((tid, d[0], k[0], f"expected: {note}" if note else k[1][:160]))
    if rows:
        print(f"\n{len(rows)} tests differ ({unexpected} unexpected):")
        w = max(len(r[0]) for r in rows)
        for tid, d, k, why in rows:
            print(f"  {tid:<{w}}  {d:>7} -> {k:<7}  {why}")
    else:
        print("\nno test differs")
    if racy:
        print(f"\n{len(racy)} tests differed once but vary straight to llama-server too "
              f"({1 + len(reruns)} runs each way):")
        for tid, d, k in racy:
            print(f"  {tid}\n      direct: {', '.join(d)}; through kvgate: {', '.join(k)}")
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
    sys.exit(main(sys.argv[1:]))
