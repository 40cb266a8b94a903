"""`authz test`: run a bundle's tests/*.yaml and report them as text or JUnit XML, with rule
coverage. The cases themselves run in authz/bundle/cases.py, shared with the reload gate."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from xml.etree import ElementTree as ET

from authz.bundle.cases import TestReport, run_cases
from authz.bundle.loader import BundleError, read_bundle
from authz.engine.compile import compile_bundle
from authz.example import EXIT_USAGE, example_bundle

# --- output -----------------------------------------------------------------------------


def render_text(report: TestReport, verbose: bool = False) -> str:
    out: list[str] = []
    for r in report.results:
        out.append(f"{'PASS' if r.passed else 'FAIL'}  {r.name}  ({r.location})")
    for r in report.failed:
        out.append("")
        out.append(r.message)
        if r.explanation:
            out.append("  trace:")
            out += [f"    {line}" for line in r.explanation]
    cov = report.coverage
    out.append("")
    out.append(f"coverage: {len(cov.rules) - len(cov.uncovered)}/{len(cov.rules)} rules exercised")
    if cov.uncovered:
        out.append("uncovered rules:")
        out += [f"  {r.name}  ({r.location})" for r in cov.uncovered]
    out.append(report.summary())
    return "\n".join(out) + "\n"


def junit_xml(report: TestReport, suite: str = "authz") -> str:
    root = ET.Element("testsuites", name=suite, tests=str(len(report.results)),
                      failures=str(len(report.failed)))
    suites: dict[str, ET.Element] = {}
    for r in report.results:
        test_name, _, case_name = r.name.partition("/")
        ts = suites.get(test_name)
        if ts is None:
            ts = suites[test_name] = ET.SubElement(root, "testsuite", name=test_name)
        tc = ET.SubElement(ts, "testcase", name=case_name, classname=test_name,
                           file=r.location.rsplit(":", 1)[0], line=r.location.rsplit(":", 1)[-1])
        if not r.passed:
            failure = ET.SubElement(tc, "failure", message=r.message.splitlines()[0])
            failure.text = "\n".join([r.message, *r.explanation])
    for ts in suites.values():
        cases = ts.findall("testcase")
        ts.set("tests", str(len(cases)))
        ts.set("failures", str(sum(1 for c in cases if c.find("failure") is not None)))
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


# --- command line -----------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", nargs="?", type=Path, help="bundle directory (default: the example bundle)")
    parser.add_argument("--junit-xml", type=Path, metavar="FILE", help="also write the results as JUnit XML")
    parser.add_argument("-k", dest="pattern", metavar="PATTERN",
                        help="run only cases whose 'test/case' name contains PATTERN (or matches it as a glob)")
    parser.add_argument("--require-coverage", action="store_true",
                        help="fail (exit 1) when a rule is exercised by no case")


def cli(args: argparse.Namespace) -> int:
    """`authz test`: 0 when every case passes, 1 on a failure, 2 for a bundle or usage error."""
    root = args.bundle or example_bundle()
    try:
        files = read_bundle(root)
        policy_set = compile_bundle(files)
    except BundleError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    report = run_cases(policy_set, files.tests, args.pattern)
    if args.junit_xml is not None:
        try:
            args.junit_xml.write_text(junit_xml(report, policy_set.name), encoding="utf-8")
        except OSError as exc:
            print(f"authz test: cannot write {args.junit_xml}: {exc}", file=sys.stderr)
            return EXIT_USAGE
    if not report.results:
        print(f"no test cases{' match ' + repr(args.pattern) if args.pattern else ''} in {root}/tests")
    sys.stdout.write(render_text(report))
    if report.failed or (args.require_coverage and not report.coverage.complete):
        return 1
    return 0
