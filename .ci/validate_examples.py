#!/usr/bin/env python3
"""Checks for the examples under config/, called by .ci/validate-examples (which installs the
tools and runs promtool, kubernetes-validate, yamllint, systemd-analyze and check-config).

Subcommands print what they checked and exit 1 on any problem:

  json FILE...                        every file parses as JSON
  dashboard DASHBOARD RULES_OUT       the Grafana dashboard's structure; writes its queries as a
                                      rules file so promtool can parse them as PromQL
  metrics NAMES DASHBOARD RULES...    every metric, label and label value the dashboard, the alert
                                      rules and their tests use is in NAMES; the dashboard shows
                                      every metric
  rules-schema RULES...               alert rule files' structure (only when promtool is missing)
  k8s-configs YAML OUTDIR             writes every ConfigMap's *.toml to OUTDIR/NAME/KEY, prints
                                      the paths
  k8s-consistency YAML                the gateway container agrees with its embedded config
  systemd-consistency UNIT TOML       the unit agrees with its config
  unit-syntax UNIT                    a unit file's syntax (only when systemd-analyze is missing)
  strip-admin TOML OUT                a copy without the [admin] table
"""

import json
import os
import re
import sys
import tomllib
from pathlib import PurePosixPath

import yaml

problems = []


def problem(where, text):
    problems.append(f"{where}: {text}")


def finish(what):
    for p in problems:
        print(f"  FAIL {p}")
    if problems:
        sys.exit(1)
    print(f"  ok: {what}")


# --- durations ------------------------------------------------------------------------------

UNITS = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


def seconds(text, default_unit="s"):
    """'10s', '1h', '30d', '500ms', '1min 30s', '40' (systemd: seconds) -> seconds."""
    text = str(text).strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text) * UNITS[default_unit]
    total, pos = 0.0, 0
    for m in re.finditer(r"\s*(\d+(?:\.\d+)?)\s*(ms|sec|min|s|m|h|d)", text):
        if m.start() != pos:
            raise ValueError(f"not a duration: {text!r}")
        total += float(m.group(1)) * UNITS[m.group(2)]
        pos = m.end()
    if pos != len(text) or pos == 0:
        raise ValueError(f"not a duration: {text!r}")
    return total


def stop_budget(cfg):
    """What a graceful stop may take: server.grace_period + upstream.token_timeout + 10 s."""
    grace = seconds(cfg.get("server", {}).get("grace_period", "5s"))
    token = seconds(cfg.get("upstream", {}).get("token_timeout", "10s"))
    return grace + token + 10


# --- JSON -----------------------------------------------------------------------------------

def cmd_json(files):
    for f in files:
        try:
            with open(f) as fh:
                json.load(fh)
        except (OSError, ValueError) as e:
            problem(f, f"not valid JSON: {e}")
    finish(f"{len(files)} JSON file(s) parse")


# --- PromQL: metric names, labels, values ------------------------------------------------------

# Labels Prometheus adds to every target; the examples use only these two.
TARGET_LABELS = {"job", "instance"}
KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
            "group_left", "group_right", "inf", "nan", "atan2", "start", "end"}
# Aggregations may be followed by `by (...)` before their parenthesis.
AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
                "bottomk", "topk", "quantile", "limitk", "limit_ratio"}
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
GRAFANA_RANGES = ("$__rate_interval", "$__interval", "$__range")


def load_metric_names(path):
    metrics = {}
    with open(path) as fh:
        for n, line in enumerate(fh, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            name, kind, *labels = line.split()
            if kind not in ("counter", "gauge", "histogram"):
                problem(f"{path}:{n}", f"unknown type {kind!r}")
            if name in metrics:
                problem(f"{path}:{n}", f"{name} listed twice")
            declared = {}
            for label in labels:
                lname, _, values = label.partition("=")
                declared[lname] = set(values.split("|")) if values else None
            metrics[name] = (kind, declared)
    return metrics


def grafana_to_promql(expr):
    for var in GRAFANA_RANGES:
        expr = expr.replace(var, "5m")
    return expr


def skip_string(s, i):
    quote = s[i]
    i += 1
    while i < len(s) and s[i] != quote:
        i += 2 if s[i] == "\\" else 1
    return i + 1


def matching(s, i, open_c, close_c):
    """Index after the bracket closing the one at s[i], skipping strings."""
    depth = 0
    while i < len(s):
        c = s[i]
        if c in "\"'`":
            i = skip_string(s, i)
            continue
        if c == open_c:
            depth += 1
        elif c == close_c:
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    raise ValueError(f"unbalanced {open_c}")


def parse_matchers(body):
    out = []
    for m in re.finditer(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*("(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\')\s*,?', body):
        out.append((m.group(1), m.group(2), m.group(3)[1:-1]))
    rest = re.sub(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*("(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\')\s*,?', "", body)
    if rest.strip():
        raise ValueError(f"cannot read label matchers {{{body}}}")
    return out


def promql_refs(expr):
    """(selectors, grouping labels) of a PromQL expression: selectors are (metric, matchers)."""
    s = grafana_to_promql(expr)
    selectors, grouping = [], []
    i = 0
    while i < len(s):
        c = s[i]
        if c in "\"'`":
            i = skip_string(s, i)
        elif c == "[":
            i = matching(s, i, "[", "]")
        elif c == "{":
            raise ValueError("a selector without a metric name cannot be checked")
        elif c.isdigit() or (c == "." and i + 1 < len(s) and s[i + 1].isdigit()):
            m = re.match(r"[0-9a-zA-Z_.]+", s[i:])
            i += m.end()
        elif c.isalpha() or c in "_:":
            m = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", s[i:])
            word = m.group(0)
            i += m.end()
            j = i
            while j < len(s) and s[j].isspace():
                j += 1
            nxt = s[j] if j < len(s) else ""
            if word.lower() in GROUPING:
                if nxt == "(":
                    end = matching(s, j, "(", ")")
                    grouping += [x.strip() for x in s[j + 1:end - 1].split(",") if x.strip()]
                    i = end
            elif word.lower() in KEYWORDS or word in AGGREGATIONS or nxt == "(":
                pass  # a keyword, or a function / aggregation
            else:
                matchers = []
                if nxt == "{":
                    end = matching(s, j, "{", "}")
                    matchers = parse_matchers(s[j + 1:end - 1])
                    i = end
                selectors.append((word, matchers))
        else:
            i += 1
    return selectors, grouping


def plain_values(op, value):
    """The literal values a matcher names, or None when it is a real regex or a variable."""
    if "$" in value:
        return None
    if op in ("=", "!="):
        return [value]
    parts = value.split("|")
    if all(re.fullmatch(r"[A-Za-z0-9_:.+-]*", p) for p in parts):
        return parts
    return None


def check_expr(where, expr, metrics, used):
    try:
        selectors, grouping = promql_refs(expr)
    except ValueError as e:
        problem(where, f"{e}: {expr}")
        return
    all_labels = set(TARGET_LABELS) | {"le"}
    for _, declared in metrics.values():
        all_labels |= set(declared)
    if not selectors:
        problem(where, f"uses no metric: {expr}")
    for name, matchers in selectors:
        base, suffix = name, ""
        if name not in metrics:
            for sfx in HISTOGRAM_SUFFIXES:
                if name.endswith(sfx) and name[: -len(sfx)] in metrics:
                    base, suffix = name[: -len(sfx)], sfx
                    break
        if base not in metrics:
            problem(where, f"metric {name} is not in the list")
            continue
        kind, declared = metrics[base]
        if kind == "histogram" and not suffix:
            problem(where, f"histogram {name} used without _bucket, _sum or _count")
        if kind != "histogram" and suffix:
            problem(where, f"{name}: {base} is a {kind}, not a histogram")
        used.add(base)
        allowed = set(declared) | TARGET_LABELS | ({"le"} if suffix == "_bucket" else set())
        for label, op, value in matchers:
            if label not in allowed:
                problem(where, f"{name} has no label {label!r}")
                continue
            values = declared.get(label)
            literal = plain_values(op, value)
            if label == "le" or values is None or literal is None:
                continue
            for v in literal:
                if v not in values:
                    problem(where, f"{name}{{{label}}} has no value {v!r} (one of {sorted(values)})")
    for label in grouping:
        if label not in all_labels:
            problem(where, f"grouping by unknown label {label!r}")


def rule_exprs(path):
    with open(path) as fh:
        doc = yaml.safe_load(fh)
    out = []
    for group in doc.get("groups", []):
        for rule in group.get("rules", []):
            out.append((f"{path} {rule.get('alert') or rule.get('record')}", rule["expr"]))
    return out


def test_series(path):
    with open(path) as fh:
        doc = yaml.safe_load(fh)
    out = []
    for n, test in enumerate(doc.get("tests", []), 1):
        for series in test.get("input_series", []):
            out.append((f"{path} test {n}", series["series"]))
    return out


def walk_panels(panels):
    for p in panels:
        yield p
        yield from walk_panels(p.get("panels", []))


def label_values_expr(query):
    """Grafana's label_values(selector, label) as the PromQL `sum by (label) (selector)`."""
    m = re.fullmatch(r"\s*label_values\((.*),\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)\s*", query or "")
    return f"sum by ({m.group(2)}) ({m.group(1)})" if m else None


def dashboard_exprs(dash, path):
    out = []
    for p in walk_panels(dash.get("panels", [])):
        for t in p.get("targets", []):
            if "expr" in t:
                out.append((f"{path} panel {p.get('title')!r} {t.get('refId')}", t["expr"]))
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var.get("query")
        query = query.get("query", "") if isinstance(query, dict) else query
        expr = label_values_expr(query)
        if expr:
            out.append((f"{path} variable {var['name']}", expr))
        else:
            problem(f"{path} variable {var.get('name')}", f"query {query!r} is not label_values(selector, label)")
    return out


def cmd_metrics(names_path, dashboard_path, rule_paths):
    metrics = load_metric_names(names_path)
    with open(dashboard_path) as fh:
        dash = json.load(fh)
    used_dash, used_rules = set(), set()
    exprs = dashboard_exprs(dash, dashboard_path)
    for where, expr in exprs:
        check_expr(where, expr, metrics, used_dash)
    count = len(exprs)
    for path in rule_paths:
        items = test_series(path) if path.endswith(".test.yml") else rule_exprs(path)
        for where, expr in items:
            check_expr(where, expr, metrics, used_rules)
        count += len(items)
    for name in sorted(set(metrics) - used_dash):
        problem(dashboard_path, f"shows no panel for {name}")
    print(f"  alert rules use {len(used_rules)} of the {len(metrics)} metrics; "
          f"the dashboard uses {len(used_dash)}")
    finish(f"{count} expressions use only the {len(metrics)} metrics of {names_path}, "
           "with their labels and label values")


# --- Grafana dashboard structure ------------------------------------------------------------

DS_REF = {"type": "prometheus", "uid": "${datasource}"}
PANEL_TYPES = {"row", "timeseries", "stat", "heatmap", "table", "bargauge", "gauge", "text"}
LAPSE_SECONDS = 90 * 86400


def cmd_dashboard(path, rules_out):
    with open(path) as fh:
        dash = json.load(fh)
    for key in ("title", "uid", "schemaVersion", "panels", "templating"):
        if key not in dash:
            problem(path, f"no {key!r}")
    variables = {v.get("name"): v for v in dash.get("templating", {}).get("list", [])}
    ds = variables.get("datasource")
    if not ds or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        problem(path, "no Prometheus 'datasource' variable")
    for name, var in variables.items():
        if var.get("type") == "query" and var.get("datasource") != DS_REF:
            problem(path, f"variable {name} does not query ${{datasource}}")
    ids, boxes, exprs = set(), [], []
    lapse_marked = False
    for p in walk_panels(dash.get("panels", [])):
        title = p.get("title")
        where = f"{path} panel {title!r}"
        if p.get("type") not in PANEL_TYPES:
            problem(where, f"unknown panel type {p.get('type')!r}")
        if p.get("id") in ids:
            problem(where, f"duplicate id {p.get('id')}")
        ids.add(p.get("id"))
        pos = p.get("gridPos", {})
        if not all(isinstance(pos.get(k), int) for k in "xywh") or pos["x"] + pos["w"] > 24:
            problem(where, f"bad gridPos {pos}")
            continue
        for other_title, o in boxes:
            if (pos["x"] < o["x"] + o["w"] and o["x"] < pos["x"] + pos["w"]
                    and pos["y"] < o["y"] + o["h"] and o["y"] < pos["y"] + pos["h"]):
                problem(where, f"overlaps panel {other_title!r}")
        boxes.append((title, pos))
        if p["type"] == "row":
            continue
        if not title:
            problem(where, "no title")
        if p.get("datasource") != DS_REF:
            problem(where, "datasource is not ${datasource}")
        targets = p.get("targets", [])
        if not targets:
            problem(where, "no queries")
        refs = [t.get("refId") for t in targets]
        if len(set(refs)) != len(refs) or None in refs:
            problem(where, f"refIds missing or repeated: {refs}")
        for t in targets:
            if t.get("datasource", DS_REF) != DS_REF:
                problem(where, "a query's datasource is not ${datasource}")
            if not t.get("expr"):
                problem(where, f"query {t.get('refId')} has no expr")
            else:
                exprs.append(t["expr"])
        steps = p.get("fieldConfig", {}).get("defaults", {}).get("thresholds", {}).get("steps", [])
        if any("refresh_token_age" in t.get("expr", "") for t in targets) and any(
                s.get("value") == LAPSE_SECONDS for s in steps):
            lapse_marked = True
    if not lapse_marked:
        problem(path, f"no refresh-token age panel marks the 90-day limit ({LAPSE_SECONDS} s)")
    for name, var in variables.items():
        if var.get("type") == "query":
            query = var.get("query")
            expr = label_values_expr(query.get("query", "") if isinstance(query, dict) else query)
            if expr:
                exprs.append(expr)
            else:
                problem(path, f"variable {name}: query is not label_values(selector, label)")
    rules = {"groups": [{"name": "dashboard-queries", "rules": [
        {"record": f"dashboard_query_{n}", "expr": grafana_to_promql(e)} for n, e in enumerate(exprs, 1)]}]}
    with open(rules_out, "w") as fh:
        yaml.safe_dump(rules, fh, sort_keys=False, width=10000)
    finish(f"dashboard structure: {len(ids)} panels, datasource variable, no overlaps, 90-day mark; "
           f"{len(exprs)} queries written to {rules_out} for promtool")


# --- alert rules without promtool ---------------------------------------------------------------

def cmd_rules_schema(paths):
    duration = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")
    for path in paths:
        with open(path) as fh:
            doc = yaml.safe_load(fh)
        if not isinstance(doc, dict) or set(doc) != {"groups"}:
            problem(path, "the top level must be exactly {groups: [...]}")
            continue
        names = set()
        for g in doc["groups"]:
            if set(g) - {"name", "interval", "limit", "rules"} or not g.get("name"):
                problem(path, f"group {g.get('name')!r}: unknown keys or no name")
            if g.get("name") in names:
                problem(path, f"group {g.get('name')!r} twice")
            names.add(g.get("name"))
            for r in g.get("rules", []):
                where = f"{path} {r.get('alert') or r.get('record')}"
                if ("alert" in r) == ("record" in r):
                    problem(where, "exactly one of alert / record")
                allowed = {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"} \
                    if "alert" in r else {"record", "expr", "labels"}
                if set(r) - allowed:
                    problem(where, f"unknown keys {sorted(set(r) - allowed)}")
                if not isinstance(r.get("expr"), str) or not r["expr"].strip():
                    problem(where, "no expr")
                if "for" in r and not duration.match(str(r["for"])):
                    problem(where, f"bad for: {r['for']!r}")
                for key in ("labels", "annotations"):
                    if not all(isinstance(v, str) for v in (r.get(key) or {}).values()):
                        problem(where, f"{key} must be strings")
    finish(f"{len(paths)} rule file(s) have the rule file structure (PromQL not parsed without promtool)")


# --- Kubernetes -------------------------------------------------------------------------------

def k8s_docs(path):
    with open(path) as fh:
        return [d for d in yaml.safe_load_all(fh) if d]


def cmd_k8s_configs(path, outdir):
    os.makedirs(outdir, exist_ok=True)
    for d in k8s_docs(path):
        if d.get("kind") != "ConfigMap":
            continue
        for key, text in (d.get("data") or {}).items():
            if key.endswith(".toml"):
                os.makedirs(os.path.join(outdir, d["metadata"]["name"]), exist_ok=True)
                out = os.path.join(outdir, d["metadata"]["name"], key)
                with open(out, "w") as fh:
                    fh.write(text)
                print(out)


def secret_refs(node, key=""):
    """(key, kind, value) of every { env = … } / { file = … } reference in a parsed config."""
    if isinstance(node, dict):
        if set(node) in ({"env"}, {"file"}):
            kind = next(iter(node))
            yield key, kind, node[kind]
            return
        for k, v in node.items():
            yield from secret_refs(v, f"{key}.{k}" if key else k)
    elif isinstance(node, list):
        for n, v in enumerate(node):
            yield from secret_refs(v, f"{key}[{n}]")


def config_files(cfg):
    """(key, path) of every plain file the config reads."""
    store, callers = cfg.get("store", {}), cfg.get("callers", {})
    if "ca_file" in store:
        yield "store.ca_file", store["ca_file"]
    if "jwks_file" in callers:
        yield "callers.jwks_file", callers["jwks_file"]
    for n, k in enumerate(callers.get("keys", [])):
        if "public_key_pem" in k:
            yield f"callers.keys[{n}].public_key_pem", k["public_key_pem"]


def under(path, directory):
    return PurePosixPath(directory) in PurePosixPath(path).parents or str(path) == str(directory)


def port_of(address):
    return int(address.rsplit(":", 1)[1])


def cmd_k8s_consistency(path):
    docs = k8s_docs(path)
    configmaps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d.get("kind") == "ConfigMap"}
    checked = 0
    for d in docs:
        if d.get("kind") not in ("Deployment", "StatefulSet", "DaemonSet"):
            continue
        pod = d["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        pod_sc = pod.get("securityContext", {})
        for c in pod.get("initContainers", []) + pod.get("containers", []):
            if not (c.get("name") == "finx-gateway" or c.get("image", "").startswith("finx-gateway")):
                continue
            checked += 1
            where = f"{path} {d['kind']}/{d['metadata']['name']} container {c['name']}"
            if c in pod.get("initContainers", []) and c.get("restartPolicy") != "Always":
                problem(where, "an init container without restartPolicy: Always is not a sidecar")
            args = c.get("args", []) + c.get("command", [])
            if "--config" not in args:
                problem(where, "no --config")
                continue
            config_path = args[args.index("--config") + 1]
            mounts = c.get("volumeMounts", [])
            text = None
            for m in mounts:
                vol = volumes.get(m["name"], {})
                if m["mountPath"] == config_path and "configMap" in vol:
                    text = configmaps.get(vol["configMap"]["name"], {}).get(m.get("subPath", ""))
            if text is None:
                problem(where, f"{config_path} is not mounted from a ConfigMap in this file")
                continue
            cfg = tomllib.loads(text)
            # Probes on the admin listener.
            admin = cfg.get("admin", {})
            if "address" not in admin:
                problem(where, "the config has no [admin] address")
                continue
            admin_port = port_of(admin["address"])
            if admin["address"].startswith("127."):
                problem(where, "[admin] listens on loopback: the kubelet's probes cannot reach it")
            names = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
            if admin_port not in names.values():
                problem(where, f"admin port {admin_port} is not a container port")
            for probe, want in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
                get = c.get(probe, {}).get("httpGet", {})
                port = names.get(get.get("port"), get.get("port"))
                if get.get("path") != want or port != admin_port:
                    problem(where, f"{probe} must be GET {want} on the admin port {admin_port}")
            # Stopping.
            budget = stop_budget(cfg)
            grace = pod.get("terminationGracePeriodSeconds", 30)
            if grace < budget:
                problem(where, f"terminationGracePeriodSeconds {grace} < grace_period + token_timeout + 10 s = {budget:g}")
            # Hardening.
            sc = c.get("securityContext", {})
            if sc.get("allowPrivilegeEscalation") is not False:
                problem(where, "allowPrivilegeEscalation must be false")
            if sc.get("readOnlyRootFilesystem") is not True:
                problem(where, "readOnlyRootFilesystem must be true")
            if "ALL" not in sc.get("capabilities", {}).get("drop", []):
                problem(where, "capabilities must drop ALL")
            if not (sc.get("runAsNonRoot") or pod_sc.get("runAsNonRoot")):
                problem(where, "runAsNonRoot must be true")
            # Every file the config reads is mounted, every variable is set.
            env = {e["name"] for e in c.get("env", [])}
            for key, kind, value in secret_refs(cfg):
                if kind == "env" and value not in env:
                    problem(where, f"{key} reads ${value}, which the container does not set")
                if kind == "file" and not any(under(value, m["mountPath"]) for m in mounts):
                    problem(where, f"{key} reads {value}, which is not mounted")
            for key, value in config_files(cfg):
                if not any(under(value, m["mountPath"]) for m in mounts):
                    problem(where, f"{key} reads {value}, which is not mounted")
            # What it writes lies on a writable volume of its own.
            writes = [("store.journal", cfg.get("store", {}).get("journal")),
                      ("server.upgrade_sock", cfg.get("server", {}).get("upgrade_sock"))]
            for key, value in writes:
                if value is None:
                    problem(where, f"{key} must be set (its default is not writable with a read-only root)")
                    continue
                ok = any(under(value, m["mountPath"]) and not m.get("readOnly")
                         and ({"emptyDir", "persistentVolumeClaim"} & set(volumes.get(m["name"], {})))
                         for m in mounts)
                if not ok:
                    problem(where, f"{key} = {value} is not on a writable emptyDir or volume claim")
    if not checked:
        problem(path, "no finx-gateway container found")
    finish(f"{checked} gateway container(s): probes on the admin port, stop budget, hardening, "
           "mounted secrets and files, writable journal")


# --- systemd ----------------------------------------------------------------------------------

def read_unit(path):
    sections, current, n = {}, None, 0
    with open(path) as fh:
        lines = fh.read().replace("\\\n", " ").splitlines()
    for line in lines:
        n += 1
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        m = re.fullmatch(r"\[([A-Za-z]+)\]", line)
        if m:
            current = m.group(1)
            sections.setdefault(current, [])
            continue
        m = re.fullmatch(r"([A-Za-z][A-Za-z0-9]*)\s*=\s*(.*)", line)
        if not m or current is None:
            problem(f"{path}:{n}", f"not a key=value line in a section: {line!r}")
            continue
        sections[current].append((m.group(1), m.group(2)))
    return sections


def cmd_unit_syntax(path):
    sections = read_unit(path)
    for s in ("Unit", "Service", "Install"):
        if s not in sections:
            problem(path, f"no [{s}] section")
    finish(f"{path}: sections and key=value lines (directive names and values NOT checked "
           "without systemd-analyze)")


def cmd_systemd_consistency(unit_path, toml_path):
    sections = read_unit(unit_path)
    service = sections.get("Service", [])
    values = {}
    for k, v in service:
        values.setdefault(k, []).append(v)

    def one(key):
        return values.get(key, [None])[-1]

    with open(toml_path, "rb") as fh:
        cfg = tomllib.load(fh)
    where = unit_path
    for key, want in (("DynamicUser", "yes"), ("ProtectSystem", "strict"), ("PrivateTmp", "yes"),
                      ("NoNewPrivileges", "yes"), ("KillSignal", "SIGTERM")):
        if one(key) != want:
            problem(where, f"{key}={want} expected, found {one(key)!r}")
    if one("ProtectHome") not in ("yes", "read-only", "tmpfs"):
        problem(where, "ProtectHome= must be set")
    if not one("RestrictAddressFamilies"):
        problem(where, "RestrictAddressFamilies= must be set")
    if "@system-service" not in " ".join(values.get("SystemCallFilter", [])):
        problem(where, "SystemCallFilter=@system-service expected")
    if not any(re.search(r"kill -HUP \$MAINPID", v) for v in values.get("ExecReload", [])):
        problem(where, "ExecReload must send SIGHUP to $MAINPID")
    start = one("ExecStart") or ""
    m = re.search(r"--config\s+(\S+)", start)
    if not m or os.path.basename(m.group(1)) != os.path.basename(toml_path):
        problem(where, f"ExecStart does not serve --config …/{os.path.basename(toml_path)}")
    budget = stop_budget(cfg)
    stop = one("TimeoutStopSec")
    if stop is None or seconds(stop) < budget:
        problem(where, f"TimeoutStopSec={stop} < grace_period + token_timeout + 10 s = {budget:g}")
    # Credentials: every one the config reads is loaded, and every one loaded is read.
    unit_name = os.path.basename(unit_path)
    cred_dir = f"/run/credentials/{unit_name}/"
    loaded = {v.split(":", 1)[0] for k in ("LoadCredential", "LoadCredentialEncrypted")
              for v in values.get(k, [])}
    used = set()
    for key, kind, value in secret_refs(cfg):
        if kind == "env":
            continue
        if not value.startswith(cred_dir):
            problem(where, f"{key} reads {value}, not a credential under {cred_dir}")
            continue
        name = value[len(cred_dir):]
        used.add(name)
        if name not in loaded:
            problem(where, f"{key} reads credential {name!r}, which no LoadCredential= provides")
    for name in sorted(loaded - used):
        problem(where, f"LoadCredential={name} is not used by {toml_path}")
    # Writes go to the state and runtime directories.
    state = [f"/var/lib/{d}" for v in values.get("StateDirectory", []) for d in v.split()]
    runtime = [f"/run/{d}" for v in values.get("RuntimeDirectory", []) for d in v.split()]
    store = cfg.get("store", {})
    for key, value, dirs in (("store.path", store.get("path"), state),
                             ("store.journal", store.get("journal"), state),
                             ("server.upgrade_sock", cfg.get("server", {}).get("upgrade_sock"), runtime + ["/tmp"])):
        if value is None or not any(under(value, d) for d in dirs):
            problem(where, f"{key} = {value} is not under {dirs} (the only writable places)")
    finish(f"{unit_name} agrees with {toml_path}: sandbox directives, stop timeout >= {budget:g} s, "
           f"{len(used)} credentials, writable paths")


# --- [admin] ------------------------------------------------------------------------------------

def cmd_strip_admin(path, out):
    with open(path) as fh:
        lines = fh.readlines()
    kept, skipping = [], False
    for line in lines:
        header = re.match(r"\s*\[\[?\s*([A-Za-z0-9_.\"-]+)\s*\]\]?", line)
        if header:
            skipping = header.group(1) == "admin" or header.group(1).startswith("admin.")
        if not skipping:
            kept.append(line)
    with open(out, "w") as fh:
        fh.writelines(kept)


def main(argv):
    if len(argv) < 2:
        sys.exit(__doc__)
    cmd, args = argv[1], argv[2:]
    if cmd == "json":
        cmd_json(args)
    elif cmd == "dashboard":
        cmd_dashboard(*args)
    elif cmd == "metrics":
        cmd_metrics(args[0], args[1], args[2:])
    elif cmd == "rules-schema":
        cmd_rules_schema(args)
    elif cmd == "k8s-configs":
        cmd_k8s_configs(*args)
    elif cmd == "k8s-consistency":
        cmd_k8s_consistency(*args)
    elif cmd == "systemd-consistency":
        cmd_systemd_consistency(*args)
    elif cmd == "unit-syntax":
        cmd_unit_syntax(*args)
    elif cmd == "strip-admin":
        cmd_strip_admin(*args)
    else:
        sys.exit(f"unknown subcommand {cmd!r}\n{__doc__}")


if __name__ == "__main__":
    main(sys.argv)
