#!/usr/bin/env python3
"""Consistency checks of the deployment files against the code, for scripts/check-deploy.

Each subcommand prints what it checked and exits non-zero on a failure:

  metrics                 every ohx_* metric and label matcher in the alert rules and the Grafana
                          dashboards is one the services export (read from services/**/*.rs), or
                          is listed in PENDING below (named in the rules, not exported yet)
  prometheusrule [--write] k8s/base/prometheusrule.yaml carries exactly the groups of
                          compose/prometheus/rules/ohx.yml (--write regenerates it)
  dockerfile              the Dockerfile's BINS are exactly the binaries under services/
  split OUT FILE...       splits rendered manifests: OUT/core/*.yaml (Kubernetes kinds) and
                          OUT/crds.json (ScaledObject, TriggerAuthentication, ServiceMonitor,
                          PrometheusRule)
  workloads FILE...       rendered manifests: KEDA kafka triggers (known parameters, consumer
                          groups and topics as in the code, maxReplicaCount <= partitions, no
                          scale to zero for the stateful stages), probes, security contexts,
                          resources and a PodDisruptionBudget for every Deployment

Needs PyYAML (a dependency of kubernetes-validate) and Python 3.11 (tomllib).
"""

import json
import pathlib
import re
import sys
import tomllib

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
RULES = ROOT / "compose/prometheus/rules/ohx.yml"
PROMETHEUSRULE = ROOT / "k8s/base/prometheusrule.yaml"
DASHBOARDS = ROOT / "compose/grafana/dashboards"

# Named by the rules but not exported by the services yet (README, "Alerts": missing metrics).
PENDING_METRICS = set()
PENDING_LABELS = {("ohx_end_to_end_latency_seconds", "aggregation")}
# Labels Prometheus or the OpenTelemetry exporter add to every series.
COMMON_LABELS = {"job", "instance", "otel_scope_name", "otel_scope_version"}

CRD_KINDS = {
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("keda.sh/v1alpha1", "TriggerAuthentication"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}
# Parameters of KEDA's kafka scaler (trigger metadata is a free-form map that no CRD schema
# checks, so a misspelt key would be silently ignored).
KAFKA_TRIGGER_KEYS = {
    "bootstrapServers", "bootstrapServersFromEnv", "consumerGroup", "consumerGroupFromEnv",
    "topic", "topicFromEnv", "lagThreshold", "activationLagThreshold", "offsetResetPolicy",
    "allowIdleConsumers", "scaleToZeroOnInvalidOffset", "excludePersistentLag",
    "limitToPartitionsWithLag", "ensureEvenDistributionOfPartitions", "version",
    "partitionLimitation", "sasl", "tls", "unsafeSsl",
}
# Stages that must not scale to zero: they rebuild state on every assignment.
STATEFUL = {"deduplicator", "hourly-aggregator"}

UNIT_SUFFIX = {"s": "seconds", "ms": "milliseconds", "us": "microseconds", "By": "bytes"}

failures = []


def fail(msg):
    failures.append(msg)
    print(f"  FAIL {msg}")


def finish(what):
    if failures:
        print(f"{what}: {len(failures)} failure(s)")
        sys.exit(1)


def rust_sources():
    return {p: p.read_text() for p in sorted((ROOT / "services").rglob("*.rs"))}


def call_args(text, start):
    """Returns the text of the parenthesised argument list starting at text[start] == '('."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
    return text[start + 1 :]


def exported_metrics():
    """{exported base name: {"kind", "labels", "series"}} from the instruments in services/."""
    metrics = {}
    idents = {}
    srcs = rust_sources()
    for path, text in srcs.items():
        for m in re.finditer(r'(?:new_counter|(?:u64|i64|f64)_counter)\(\s*"(ohx_\w+)"', text):
            metrics[m.group(1)] = {"kind": "counter", "unit": ""}
        for m in re.finditer(r'(?:u64|i64|f64)_up_down_counter\(\s*"(ohx_\w+)"', text):
            metrics[m.group(1)] = {"kind": "gauge", "unit": ""}
        for m in re.finditer(r'new_seconds_histogram\(\s*"(ohx_\w+)"', text):
            metrics[m.group(1)] = {"kind": "histogram", "unit": "s"}
        for m in re.finditer(r'(?:u64|i64|f64)_gauge\(\s*"(ohx_\w+)"', text):
            metrics[m.group(1)] = {"kind": "gauge", "unit": ""}
        for m in re.finditer(r'(?:u64|f64)_histogram\(\s*"(ohx_\w+)"\)((?:\s*\.\w+\([^;]*?\))*)', text):
            unit = re.search(r'\.with_unit\(\s*"([^"]+)"', m.group(2))
            metrics[m.group(1)] = {"kind": "histogram", "unit": unit.group(1) if unit else ""}
        # static IDENT: LazyLock<…> = LazyLock::new(|| … "ohx_name" …
        for m in re.finditer(r'static\s+(\w+)\s*:\s*LazyLock<[^=]*=\s*LazyLock::new\(\|\|[^"]*"(ohx_\w+)"', text):
            idents[m.group(1)] = m.group(2)
    out = {}
    for name, info in metrics.items():
        suffix = UNIT_SUFFIX.get(info["unit"], "")
        base = f"{name}_{suffix}" if suffix else name
        if info["kind"] == "counter":
            series = {base + "_total"}
        elif info["kind"] == "histogram":
            series = {base + "_bucket", base + "_sum", base + "_count"}
        else:
            series = {base}
        out[base] = {"kind": info["kind"], "labels": set(), "series": series, "ident": None}
        for ident, n in idents.items():
            if n == name:
                out[base]["ident"] = ident
    # Labels: KeyValue::new("label", …) in the argument list of IDENT.add( / IDENT.record(.
    by_ident = {v["ident"]: k for k, v in out.items() if v["ident"]}
    for text in srcs.values():
        for m in re.finditer(r'\b(\w+)\s*\.\s*(?:add|record)\s*\(', text):
            base = by_ident.get(m.group(1))
            if base:
                args = call_args(text, m.end() - 1)
                out[base]["labels"] |= set(re.findall(r'KeyValue::new\(\s*"(\w+)"', args))
    return out, "\n".join(srcs.values())


def promql_exprs():
    """(where, expr) for every expression in the rules file and the dashboards."""
    exprs = []
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            exprs.append((f"{RULES.name}:{rule.get('alert') or rule.get('record')}", rule["expr"]))
    for path in sorted(DASHBOARDS.glob("*.json")):
        dash = json.loads(path.read_text())
        for panel in dash.get("panels", []):
            for t in panel.get("targets", []):
                if t.get("expr"):
                    exprs.append((f"{path.name}:{panel.get('title')}", t["expr"]))
    return exprs


def cmd_metrics():
    metrics, source = exported_metrics()
    if not metrics:
        fail("no ohx_* instrument found under services/ (has telemetry moved?)")
        finish("metrics")
    series = {}
    for base, info in metrics.items():
        for s in info["series"]:
            series[s] = base
    exprs = promql_exprs()
    used, pending_seen = set(), set()
    for where, expr in exprs:
        for m in re.finditer(r"\b(ohx_[a-z0-9_]+)\s*(\{[^}]*\})?", expr):
            name, matchers = m.group(1), m.group(2) or ""
            if name in series:
                base = series[name]
            elif name in PENDING_METRICS:
                pending_seen.add(f"metric {name}")
                continue
            else:
                fail(f"{where}: {name} is not exported by any service")
                continue
            used.add(name)
            for lm in re.finditer(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', matchers):
                label, op, value = lm.groups()
                allowed = metrics[base]["labels"] | COMMON_LABELS
                if name.endswith("_bucket"):
                    allowed = allowed | {"le"}
                if label not in allowed:
                    if (base, label) in PENDING_LABELS:
                        pending_seen.add(f"label {label} on {base}")
                        continue
                    fail(f"{where}: {name} has no label {label!r} (it has {sorted(metrics[base]['labels'])})")
                    continue
                # An equality or alternation matcher on an ohx label names values the code writes.
                if label not in COMMON_LABELS and op in ("=", "=~") and re.fullmatch(r"[\w.|-]+", value):
                    for v in value.split("|"):
                        if f'"{v}"' not in source:
                            fail(f'{where}: {name}{{{label}{op}"{value}"}}: no "{v}" in services/')
    print(f"  {len(exprs)} expressions (rules and dashboards), {len(used)} exported series names used")
    for p in sorted(pending_seen):
        print(f"  pending (named by a rule, not exported yet): {p}")
    finish("metrics")
    print("metrics: ok")


def prometheusrule_text():
    groups = yaml.safe_load(RULES.read_text())["groups"]
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "ohx"},
        "spec": {"groups": groups},
    }

    class Dumper(yaml.SafeDumper):
        pass

    def str_rep(dumper, s):
        style = "|" if "\n" in s else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", s, style=style)

    Dumper.add_representer(str, str_rep)
    header = (
        "# GENERATED from compose/prometheus/rules/ohx.yml by `scripts/check-deploy --write-prometheusrule`;\n"
        "# do not edit here (scripts/check-deploy fails when the two differ). Tests and runbook: see that\n"
        "# file. Your Prometheus may select PrometheusRules by a label (e.g. `release`): add it in an\n"
        "# overlay.\n"
    )
    return header + yaml.dump(doc, Dumper=Dumper, sort_keys=False, width=1000)


def cmd_prometheusrule(write):
    text = prometheusrule_text()
    if write:
        PROMETHEUSRULE.write_text(text)
        print(f"prometheusrule: wrote {PROMETHEUSRULE.relative_to(ROOT)}")
        return
    current = yaml.safe_load(PROMETHEUSRULE.read_text())
    if current.get("spec", {}).get("groups") != yaml.safe_load(RULES.read_text())["groups"]:
        fail(f"{PROMETHEUSRULE.relative_to(ROOT)} differs from {RULES.relative_to(ROOT)}: run scripts/check-deploy --write-prometheusrule")
    finish("prometheusrule")
    print("prometheusrule: ok (same groups as the compose rules)")


def binaries():
    """Binary names of the crates under services/ (package name with src/main.rs, and [[bin]])."""
    names = set()
    for manifest in sorted((ROOT / "services").glob("*/Cargo.toml")):
        data = tomllib.loads(manifest.read_text())
        for b in data.get("bin", []):
            names.add(b["name"])
        if (manifest.parent / "src/main.rs").exists() and not data.get("bin"):
            names.add(data["package"]["name"])
    return names


def cmd_dockerfile():
    text = (ROOT / "Dockerfile").read_text()
    m = re.search(r'^ARG BINS="([^"]*)"', text, re.M)
    if not m:
        fail("Dockerfile: no ARG BINS=\"…\" line")
        finish("dockerfile")
    shipped = set(m.group(1).split())
    expected = binaries()
    for b in sorted(expected - shipped):
        fail(f"Dockerfile: binary {b} is built under services/ but not shipped (BINS)")
    for b in sorted(shipped - expected):
        fail(f"Dockerfile: BINS names {b}, which no crate under services/ builds")
    if not re.search(r"^USER\s+\d+(:\d+)?\s*$", text, re.M):
        fail("Dockerfile: the runtime stage must switch to a numeric non-root USER")
    finish("dockerfile")
    print(f"dockerfile: ok ({len(shipped)} binaries: {' '.join(sorted(shipped))})")


def load_docs(files):
    docs = []
    for f in files:
        for d in yaml.safe_load_all(pathlib.Path(f).read_text()):
            if d:
                docs.append((f, d))
    return docs


def cmd_split(out, files):
    out = pathlib.Path(out)
    (out / "core").mkdir(parents=True, exist_ok=True)
    crds, n = [], 0
    for f, d in load_docs(files):
        key = (d.get("apiVersion"), d.get("kind"))
        if key in CRD_KINDS:
            crds.append({"file": f, "doc": d})
        else:
            n += 1
            name = f"{pathlib.Path(f).stem}-{n:03d}-{d['kind']}-{d['metadata']['name']}.yaml"
            (out / "core" / name).write_text(yaml.safe_dump(d))
    (out / "crds.json").write_text(json.dumps(crds))
    print(f"split: {n} Kubernetes objects, {len(crds)} custom resources")


def consumer_groups():
    """{group id: input topic} as the stages' main.rs files set them up."""
    records = (ROOT / "services/common/src/records.rs").read_text()
    consts = dict(re.findall(r'pub const (\w+): &str = "(ohx\.[^"]+)";', records))
    groups = {}
    for main in sorted((ROOT / "services").glob("*/src/main.rs")):
        text = main.read_text()
        for m in re.finditer(
            r'(?:let\s+(?:mut\s+)?(\w+)\s*=\s*)?StageSettings::from_env\(\s*"([^"]+)"\s*,\s*vec!\[\s*topic::(\w+)\s*\]',
            text,
        ):
            var, stage, const = m.groups()
            group = f"ohx.{stage}"
            if var:
                suffix = re.search(rf'{var}\.group_id\s*=\s*format!\(\s*"\{{group\}}\.(\w+)"', text)
                if suffix:
                    group = f"ohx.{stage}.{suffix.group(1)}"
            groups[group] = consts.get(const, const)
    return groups


def partitions():
    out = {}
    for f in sorted((ROOT / "topics").glob("*.toml")):
        t = tomllib.loads(f.read_text())
        out[t["name"]] = int(t["partitions"])
    return out


def cmd_workloads(files):
    docs = [d for _, d in load_docs(files)]
    groups, parts = consumer_groups(), partitions()
    if not groups:
        fail("no StageSettings::from_env(...) found in services/*/src/main.rs")
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    pdb_selectors = [d["spec"]["selector"]["matchLabels"] for d in docs if d["kind"] == "PodDisruptionBudget"]
    scaled = [d for d in docs if d["kind"] == "ScaledObject"]
    covered_groups = set()
    for so in scaled:
        name = so["metadata"]["name"]
        spec = so["spec"]
        target = spec["scaleTargetRef"]["name"]
        if target not in deployments:
            fail(f"ScaledObject {name}: no Deployment {target}")
        mx, mn = spec.get("maxReplicaCount", 100), spec.get("minReplicaCount", 0)
        if target in STATEFUL and mn < 1:
            fail(f"ScaledObject {name}: {target} restores state on start-up and must not scale to zero")
        for trig in spec.get("triggers", []):
            if trig["type"] != "kafka":
                continue
            md = trig["metadata"]
            for k in sorted(set(md) - KAFKA_TRIGGER_KEYS):
                fail(f"ScaledObject {name}: unknown kafka trigger parameter {k!r}")
            group, topic = md.get("consumerGroup"), md.get("topic")
            if group not in groups:
                fail(f"ScaledObject {name}: consumer group {group!r} is not one the code uses ({sorted(groups)})")
            elif groups[group] != topic:
                fail(f"ScaledObject {name}: group {group} consumes {groups[group]}, not {topic}")
            covered_groups.add(group)
            if topic not in parts:
                fail(f"ScaledObject {name}: topic {topic!r} is not in topics/")
            elif mx > parts[topic]:
                fail(f"ScaledObject {name}: maxReplicaCount {mx} > {parts[topic]} partitions of {topic}")
            if not str(md.get("lagThreshold", "")).isdigit():
                fail(f"ScaledObject {name}: lagThreshold must be an integer string")
            if md.get("offsetResetPolicy") != "earliest":
                fail(f"ScaledObject {name}: offsetResetPolicy must be earliest (the consumers' auto.offset.reset)")
    for g in sorted(set(groups) - covered_groups):
        fail(f"consumer group {g} has no ScaledObject trigger")
    for name, dep in deployments.items():
        pod = dep["spec"]["template"]["spec"]
        labels = dep["spec"]["template"]["metadata"].get("labels", {})
        if not any(all(labels.get(k) == v for k, v in sel.items()) for sel in pdb_selectors):
            fail(f"Deployment {name}: no PodDisruptionBudget selects it")
        psc = pod.get("securityContext", {})
        if not psc.get("runAsNonRoot"):
            fail(f"Deployment {name}: pod securityContext.runAsNonRoot is not true")
        for c in pod["containers"]:
            sc = c.get("securityContext", {})
            if not sc.get("readOnlyRootFilesystem"):
                fail(f"Deployment {name}/{c['name']}: readOnlyRootFilesystem is not true")
            if sc.get("allowPrivilegeEscalation") is not False:
                fail(f"Deployment {name}/{c['name']}: allowPrivilegeEscalation is not false")
            if "ALL" not in sc.get("capabilities", {}).get("drop", []):
                fail(f"Deployment {name}/{c['name']}: capabilities do not drop ALL")
            if c.get("livenessProbe", {}).get("httpGet", {}).get("path") != "/healthz":
                fail(f"Deployment {name}/{c['name']}: liveness probe is not GET /healthz")
            if c.get("readinessProbe", {}).get("httpGet", {}).get("path") != "/readyz":
                fail(f"Deployment {name}/{c['name']}: readiness probe is not GET /readyz")
            res = c.get("resources", {})
            if not res.get("requests") or not res.get("limits", {}).get("memory"):
                fail(f"Deployment {name}/{c['name']}: resources need requests and a memory limit")
        # A consumer Deployment with fixed replicas must not exceed its input's partitions.
        for g, topic in groups.items():
            if g == f"ohx.{name}" or g.startswith(f"ohx.{name}."):
                if dep["spec"].get("replicas", 1) > parts.get(topic, 1):
                    fail(f"Deployment {name}: replicas above the partitions of {topic}")
    finish("workloads")
    print(
        f"workloads: ok ({len(deployments)} Deployments, {len(scaled)} ScaledObjects covering "
        f"{len(covered_groups)} consumer groups: {', '.join(sorted(covered_groups))})"
    )


def main(argv):
    if not argv:
        print(__doc__)
        return 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "metrics":
        cmd_metrics()
    elif cmd == "prometheusrule":
        cmd_prometheusrule("--write" in rest)
    elif cmd == "dockerfile":
        cmd_dockerfile()
    elif cmd == "split":
        cmd_split(rest[0], rest[1:])
    elif cmd == "workloads":
        cmd_workloads(rest)
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
