#!/usr/bin/env python3
"""Renders and lints a Helm chart with the real Helm engine (the `helm-python-sdk` wheel, which
bundles the Helm library), for the test suites: no helm binary is needed.

    helm.py render CHART RELEASE NAMESPACE [--values FILE]... [--set-json JSON]... [--include-crds]
        Prints the rendered manifests as one multi-document YAML stream (templates in path
        order, NOTES.txt left out; with --include-crds the chart's crds/ first, as `helm install`
        applies them). A render failure prints Helm's message on stderr and exits 2.
    helm.py lint CHART [--values FILE]... [--namespace NS]
        `helm lint --strict`: prints every finding; exits 1 when there is any warning or error.
"""

import argparse
import json
import sys



def _values(chart_module, files, set_json):
    values = {}
    for path in files or []:
        with open(path, encoding="utf-8") as handle:
            merged = chart_module.values_from_yaml(handle.read())
        values = _merge(values, merged)
    for expression in set_json or []:
        values = _merge(values, json.loads(expression))
    return values


def _merge(base, extra):
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def main():
    from helm_python import chart as helm_chart
    from helm_python.errors import HelmError

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    render = sub.add_parser("render")
    render.add_argument("chart")
    render.add_argument("release")
    render.add_argument("namespace")
    render.add_argument("--values", action="append")
    render.add_argument("--set-json", action="append")
    render.add_argument("--include-crds", action="store_true")
    lint = sub.add_parser("lint")
    lint.add_argument("chart")
    lint.add_argument("--values", action="append")
    lint.add_argument("--namespace", default="default")
    args = parser.parse_args()

    try:
        if args.command == "render":
            loaded = helm_chart.Chart.load(args.chart)
            values = _values(helm_chart, args.values, args.set_json)
            manifests = loaded.render(
                values, name=args.release, namespace=args.namespace, is_install=True
            )
            documents = []
            if args.include_crds:
                documents.extend(crd["data"] for crd in loaded.crds)
            for path in sorted(manifests):
                if path.endswith("NOTES.txt"):
                    continue
                documents.append(manifests[path])
            print("\n---\n".join(doc.strip("\n") for doc in documents if doc.strip()))
            return 0
        values = _values(helm_chart, args.values, None)
        report = helm_chart.lint(
            args.chart, values or None, strict=True, namespace=args.namespace
        )
        findings = report.get("messages") or []
        for finding in findings:
            print(f"{finding.get('severity')} {finding.get('path')}: {finding.get('error')}")
        for error in report.get("errors") or []:
            print(f"error: {error}")
        bad = [f for f in findings if (f.get("severity") or 0) >= 2] or report.get("errors")
        return 1 if bad else 0
    except HelmError as error:
        print(str(error), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
