//! The webhook end to end: every fixture pod is sent as a real AdmissionReview over HTTPS
//! to the real server on loopback; the returned JSON Patch is applied with json-patch, the
//! result compared with a golden file and validated strictly with `kubernetes-validate`
//! for Kubernetes 1.29 and the newest version it ships; re-admitting the result changes
//! nothing.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use clap::Parser;
use common::{Client, Pki};
use kube::core::admission::AdmissionReview;
use kube::core::DynamicObject;
use serde_json::Value;
use tracecar_injector::config::{Defaults, DefaultsArgs};

#[derive(Parser)]
struct Flags {
    #[command(flatten)]
    d: DefaultsArgs,
}

fn defaults_from(flags: &[String]) -> Defaults {
    let args = std::iter::once("test".to_owned()).chain(flags.iter().cloned());
    Flags::try_parse_from(args).unwrap().d.validate().unwrap()
}

struct Case {
    name: String,
    flags: Vec<String>,
    path: String,
    pod: Value,
}

/// Reads the fixtures; `# flags: ...` and `# path: ...` header comments set the server's
/// defaults and the endpoint.
fn cases() -> Vec<Case> {
    let mut out = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(common::fixtures_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    entries.sort();
    for p in entries {
        let text = std::fs::read_to_string(&p).unwrap();
        let mut flags = Vec::new();
        let mut path = "/inject".to_owned();
        for line in text.lines().take_while(|l| l.starts_with('#')) {
            if let Some(f) = line.strip_prefix("# flags:") {
                flags = f.split_whitespace().map(str::to_owned).collect();
            }
            if let Some(f) = line.strip_prefix("# path:") {
                path = f.trim().to_owned();
            }
        }
        let name = p.file_stem().unwrap().to_string_lossy().into_owned();
        out.push(Case {
            name,
            flags,
            path,
            pod: common::load_yaml(&p),
        });
    }
    assert!(out.len() >= 15, "fixture corpus is missing");
    out
}

struct Outcome {
    warnings: Vec<String>,
    patched: Option<Value>,
}

async fn admit(
    client: &Client,
    addr: std::net::SocketAddr,
    path: &str,
    pod: &Value,
    uid: &str,
) -> Outcome {
    let body = serde_json::to_vec(&common::review(pod, uid)).unwrap();
    let reply = client.post(addr, path, body).await.expect("request");
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let mut raw: Value = serde_json::from_slice(&reply.body).unwrap();
    // The API documents `patch` as base64 (Go `[]byte`); kube-core's type reads a number array,
    // so the patch is taken out and decoded here, and the rest read with kube-core.
    let patch = raw["response"]
        .as_object_mut()
        .expect("response")
        .remove("patch")
        .map(|p| {
            let text = p
                .as_str()
                .unwrap_or_else(|| panic!("patch is not a base64 string: {p}"));
            base64::Engine::decode(&base64::prelude::BASE64_STANDARD, text).expect("base64 patch")
        });
    let review: AdmissionReview<DynamicObject> = serde_json::from_value(raw.clone()).unwrap();
    assert_eq!(review.types.api_version, "admission.k8s.io/v1");
    assert_eq!(review.types.kind, "AdmissionReview");
    let resp = review.response.expect("response");
    assert_eq!(resp.uid, uid);
    assert!(resp.allowed, "tracecar never denies a pod");
    let patched = patch.map(|bytes| {
        assert_eq!(
            raw.pointer("/response/patchType").and_then(Value::as_str),
            Some("JSONPatch")
        );
        let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
        let mut doc = pod.clone();
        json_patch::patch(&mut doc, &patch).unwrap_or_else(|e| panic!("patch does not apply: {e}"));
        doc
    });
    Outcome {
        warnings: resp.warnings.unwrap_or_default(),
        patched,
    }
}

fn named<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array()
        .and_then(|l| l.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no {name} in {list}"))
}

fn names(list: &Value) -> Vec<&str> {
    list.as_array()
        .map(|l| l.iter().filter_map(|c| c["name"].as_str()).collect())
        .unwrap_or_default()
}

/// Where the preload library and the causal table are, in every container that uses them.
const LIBRARY: &str = "/var/run/tracecar/lib/$PLATFORM/libtracecar_preload.so";
const TABLE: &str = "/var/run/tracecar/causal";
const NODE_REQUIRE: &str = "--require=/var/run/tracecar/node/tracecar.js";

fn env<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)?["value"]
        .as_str()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixture_corpus_over_https() {
    let pki = Pki::new();
    let leaf = pki.leaf("tracecar-injector.tracecar-system.svc");
    let client = Client::new(&pki);
    let mut servers = BTreeMap::new();
    let mut dirs = Vec::new();
    let out_dir = tempfile::tempdir().unwrap();
    let mut to_validate = Vec::new();
    let mut outcomes = BTreeMap::new();
    // Pods the default-flags server sees already injected: the `already-injected` fixture, then
    // every pod it patched, admitted again.
    let mut readmitted_default = 0;

    for (i, case) in cases().into_iter().enumerate() {
        let key = case.flags.join(" ");
        if !servers.contains_key(&key) {
            let dir = tempfile::tempdir().unwrap();
            let running = common::start(
                dir.path(),
                &leaf,
                defaults_from(&case.flags),
                Duration::from_secs(2),
            )
            .await;
            servers.insert(key.clone(), running);
            dirs.push(dir);
        }
        let addr = servers[&key].addr;
        let uid = format!("00000000-0000-0000-0000-{i:012}");
        let out = admit(&client, addr, &case.path, &case.pod, &uid).await;
        if key.is_empty() && case.name == "already-injected" {
            readmitted_default += 1;
        }
        common::golden(
            &format!("{}.json", case.name),
            &serde_json::json!({"warnings": out.warnings, "patched": out.patched}),
        );
        if let Some(patched) = &out.patched {
            // Idempotent: the injected pod is left alone.
            let again = admit(&client, addr, &case.path, patched, &format!("{uid}-again")).await;
            if key.is_empty() {
                readmitted_default += 1;
            }
            assert!(
                again.patched.is_none(),
                "{}: re-admission patched again",
                case.name
            );
            // The API server names generateName pods after admission; the validator needs a name.
            let mut named_pod = patched.clone();
            if named_pod.pointer("/metadata/name").is_none() {
                let base = named_pod["metadata"]["generateName"]
                    .as_str()
                    .unwrap_or("pod-")
                    .to_owned();
                named_pod["metadata"]["name"] = Value::String(format!("{base}x7k2q"));
            }
            let file = out_dir.path().join(format!("{}.json", case.name));
            std::fs::write(&file, serde_json::to_vec_pretty(&named_pod).unwrap()).unwrap();
            to_validate.push(file);
        }
        outcomes.insert(case.name.clone(), out);
    }

    check_behaviour(&outcomes);

    if let Some(versions) = common::validate_versions() {
        common::validate_strict(&to_validate, &versions);
    }

    // Every decision was counted.
    let running = servers.remove("").unwrap();
    let (status, metrics) = common::get(running.admin_addr, "/metrics").await;
    assert_eq!(status, 200);
    for line in [
        "tracecar_injector_admissions_total{reason=\"host-network\"} 1",
        &format!(
            "tracecar_injector_admissions_total{{reason=\"already-injected\"}} {readmitted_default}"
        ),
        "tracecar_injector_admissions_total{reason=\"disabled-by-annotation\"} 1",
        "tracecar_injector_admissions_total{reason=\"injector-pod\"} 1",
        "tracecar_injector_admissions_total{reason=\"not-opted-in\"} 1",
        "tracecar_injector_annotation_warnings_total{annotation=\"tracecar.dev/sampling-ratio\"} 1",
        "tracecar_injector_annotation_warnings_total{annotation=\"unknown\"} 1",
    ] {
        assert!(metrics.contains(line), "missing {line} in\n{metrics}");
    }
    for (_, s) in servers {
        s.shutdown().await;
    }
    running.shutdown().await;
}

/// What a user sees, fixture by fixture (independent of the golden files).
fn check_behaviour(o: &BTreeMap<String, Outcome>) {
    let patched = |n: &str| {
        o[n].patched
            .as_ref()
            .unwrap_or_else(|| panic!("{n} was not injected"))
    };
    for n in [
        "host-network",
        "already-injected",
        "opted-out",
        "injector-self",
        "opt-in-absent",
    ] {
        assert!(o[n].patched.is_none(), "{n} must not be injected");
    }

    let p = patched("plain");
    let init = &p["spec"]["initContainers"];
    assert_eq!(names(init), ["tracecar-init", "tracecar-proxy"]);
    let proxy = named(init, "tracecar-proxy");
    assert_eq!(
        env(proxy, "TRACECAR_EXPORT_REQUIRED"),
        None,
        "no TLS Secret: the proxy's default (required) stays"
    );
    assert_eq!(proxy["restartPolicy"], "Always");
    assert_eq!(proxy["startupProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(proxy["startupProbe"]["httpGet"]["port"], 15190);
    assert_eq!(proxy["livenessProbe"]["httpGet"]["path"], "/live");
    let sc = &proxy["securityContext"];
    assert_eq!(
        (sc["runAsUser"].as_i64(), sc["runAsGroup"].as_i64()),
        (Some(2140), Some(2140))
    );
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    assert_eq!(
        proxy["resources"],
        serde_json::json!({"requests": {"cpu": "10m", "memory": "20Mi"}, "limits": {"memory": "64Mi"}})
    );
    let isc = &named(init, "tracecar-init")["securityContext"];
    assert_eq!(
        isc["capabilities"]["add"],
        serde_json::json!(["NET_ADMIN", "NET_RAW"])
    );
    assert_eq!(isc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(
        (isc["runAsUser"].as_i64(), isc["runAsNonRoot"].as_bool()),
        (Some(0), Some(false))
    );
    assert_eq!(env(proxy, "OTEL_SERVICE_NAME"), Some("plain"));
    assert_eq!(env(proxy, "TRACECAR_CONTAINER_NAME"), Some("app"));
    assert_eq!(env(proxy, "OTEL_PROPAGATORS"), Some("tracecontext,baggage"));
    assert_eq!(env(proxy, "OTEL_EXPORTER_OTLP_PROTOCOL"), Some("grpc"));
    let field = |n: &str| {
        proxy["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == n)
            .unwrap()["valueFrom"]["fieldRef"]["fieldPath"]
            .clone()
    };
    assert_eq!(field("TRACECAR_POD_NAME"), "metadata.name");
    assert_eq!(field("TRACECAR_POD_UID"), "metadata.uid");
    assert_eq!(field("TRACECAR_POD_NAMESPACE"), "metadata.namespace");
    assert_eq!(field("TRACECAR_NODE_NAME"), "spec.nodeName");
    assert_eq!(
        p["metadata"]["annotations"]["tracecar.dev/status"],
        "injected"
    );
    assert_eq!(
        p["metadata"]["annotations"]["tracecar.dev/proxy-version"],
        env!("CARGO_PKG_VERSION")
    );
    // causal (the default): the shared volume, mounted in the proxy and the app; the app
    // loads the library, and both name the table.
    assert_eq!(
        p["spec"]["volumes"],
        serde_json::json!([{"name": "tracecar-causal",
            "emptyDir": {"medium": "Memory", "sizeLimit": "8Mi"}}]),
        "no TLS secret configured: only the causal volume"
    );
    assert_eq!(
        proxy["volumeMounts"],
        serde_json::json!([{"name": "tracecar-causal", "mountPath": "/var/run/tracecar"}]),
        "writable: the proxy puts the table and the library there"
    );
    assert_eq!(env(proxy, "TRACECAR_CAUSAL_TABLE"), Some(TABLE));
    assert_eq!(env(proxy, "LD_PRELOAD"), None);
    let app = named(&p["spec"]["containers"], "app");
    assert_wired(app, "tracecar-causal");
    assert_eq!(env(app, "LD_PRELOAD"), Some(LIBRARY));
    assert_eq!(
        named(init, "tracecar-init").get("volumeMounts"),
        None,
        "tracecar-init does not see the volume"
    );
    assert!(o["plain"].warnings.is_empty(), "{:?}", o["plain"].warnings);

    let p = patched("init-containers");
    assert_eq!(
        names(&p["spec"]["initContainers"]),
        ["tracecar-init", "tracecar-proxy", "migrate", "warm-cache"]
    );
    for n in ["migrate", "warm-cache"] {
        let c = named(&p["spec"]["initContainers"], n);
        assert!(
            c.get("env").is_none() && c.get("volumeMounts").is_none(),
            "the pod's init containers are left alone: {c}"
        );
    }
    assert_wired(
        named(&p["spec"]["containers"], "checkout"),
        "tracecar-causal",
    );
    assert_eq!(names(&p["spec"]["volumes"]), ["config", "tracecar-causal"]);
    assert_eq!(p["metadata"]["annotations"]["team"], "payments");
    assert_eq!(
        env(
            named(&p["spec"]["initContainers"], "tracecar-proxy"),
            "OTEL_SERVICE_NAME"
        ),
        Some("checkout")
    );

    let p = patched("existing-volumes-tls");
    assert_eq!(
        names(&p["spec"]["volumes"]),
        ["data", "tracecar-otlp-tls", "tracecar-causal"]
    );
    assert_eq!(
        named(&p["spec"]["volumes"], "tracecar-otlp-tls")["secret"],
        serde_json::json!({"secretName": "otel-client-tls", "optional": true}),
        "a missing Secret must not keep the pod from starting"
    );
    let proxy = named(&p["spec"]["initContainers"], "tracecar-proxy");
    assert_eq!(
        env(proxy, "TRACECAR_EXPORT_REQUIRED"),
        Some("false"),
        "the proxy must start while the Secret's files are missing"
    );
    assert_eq!(
        proxy["volumeMounts"][0]["mountPath"],
        "/var/run/secrets/tracecar/otlp"
    );
    assert_eq!(proxy["volumeMounts"][0]["readOnly"], true);
    assert_eq!(
        env(proxy, "OTEL_EXPORTER_OTLP_CERTIFICATE"),
        Some("/var/run/secrets/tracecar/otlp/ca.crt")
    );
    assert_eq!(
        env(proxy, "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE"),
        Some("/var/run/secrets/tracecar/otlp/tls.crt")
    );
    assert_eq!(
        env(proxy, "OTEL_EXPORTER_OTLP_CLIENT_KEY"),
        Some("/var/run/secrets/tracecar/otlp/tls.key")
    );
    assert_eq!(
        env(proxy, "OTEL_EXPORTER_OTLP_ENDPOINT"),
        Some("https://otel-collector.observability:4317")
    );

    let p = patched("all-annotations");
    let init = &p["spec"]["initContainers"];
    assert_eq!(
        named(init, "tracecar-init")["command"],
        serde_json::json!([
            "tracecar-proxy",
            "init",
            "--skip-inbound-ports",
            "22,9000-9100",
            "--skip-outbound-ports",
            "5432,6379",
            "--skip-outbound-cidrs",
            "10.0.0.0/8,fd00::/8,169.254.169.254/32"
        ])
    );
    let proxy = named(init, "tracecar-proxy");
    assert_eq!(proxy["image"], "registry.example.com/tracecar-proxy:dev");
    assert_eq!(env(proxy, "OTEL_SERVICE_NAME"), Some("storefront"));
    assert_eq!(
        env(proxy, "OTEL_TRACES_SAMPLER"),
        Some("parentbased_traceidratio")
    );
    assert_eq!(env(proxy, "OTEL_TRACES_SAMPLER_ARG"), Some("0.25"));
    assert_eq!(
        env(proxy, "OTEL_PROPAGATORS"),
        Some("tracecontext,b3multi,jaeger")
    );
    assert_eq!(env(proxy, "TRACECAR_CORRELATION"), Some("off"));
    assert_eq!(env(proxy, "TRACECAR_CAUSAL_TABLE"), None);
    assert!(p["spec"].get("volumes").is_none(), "off: no causal volume");
    assert_eq!(env(proxy, "TRACECAR_LOG"), Some("debug"));
    assert_eq!(
        env(proxy, "OTEL_EXPORTER_OTLP_ENDPOINT"),
        Some("http://jaeger-collector.tracing:4318")
    );
    assert_eq!(
        proxy["resources"],
        serde_json::json!({"requests": {"cpu": "50m", "memory": "32Mi"}, "limits": {"cpu": "1", "memory": "128Mi"}})
    );
    assert!(
        o["all-annotations"].warnings.is_empty(),
        "{:?}",
        o["all-annotations"].warnings
    );

    let inv = &o["invalid-annotations"];
    let p = patched("invalid-annotations");
    for key in [
        "inject",
        "sampling-ratio",
        "propagators",
        "skip-inbound-ports",
        "skip-outbound-ports",
        "skip-outbound-cidrs",
        "capture",
        "correlation",
        "collector-endpoint",
        "proxy-cpu-request",
        "proxy-memory-limit",
        "log-level",
        "proxy-image",
        "sampling-rate",
    ] {
        let full = format!("tracecar.dev/{key}:");
        assert!(
            inv.warnings.iter().any(|w| w.starts_with(&full)),
            "no warning for {key}: {:?}",
            inv.warnings
        );
    }
    assert!(inv.warnings.contains(&"tracecar.dev/sampling-ratio: invalid value \"1.5\": expected a number from 0 to 1; using 1".to_owned()));
    let proxy = named(&p["spec"]["initContainers"], "tracecar-proxy");
    assert_eq!(env(proxy, "OTEL_TRACES_SAMPLER_ARG"), Some("1"));
    assert_eq!(
        proxy["image"],
        format!(
            "ghcr.io/tracecar-dev/tracecar-proxy:{}",
            env!("CARGO_PKG_VERSION")
        )
    );
    // memory request 256Mi is valid but above the (default) limit: the limit is raised.
    assert_eq!(proxy["resources"]["limits"]["memory"], "256Mi");
    assert_eq!(
        names(&p["spec"]["initContainers"])[0],
        "tracecar-init",
        "invalid capture falls back to iptables"
    );

    let p = patched("escaping");
    let a = &p["metadata"]["annotations"];
    assert_eq!(a["example.com/owner~team"], "a/b~c");
    assert_eq!(a["kubectl.kubernetes.io/default-container"], "app");
    assert_eq!(a["tracecar.dev/status"], "injected");

    let p = patched("collisions");
    assert_eq!(
        names(&p["spec"]["initContainers"]),
        ["tracecar-init-1", "tracecar-proxy-2", "tracecar-init"]
    );
    assert_eq!(
        names(&p["spec"]["containers"]),
        ["tracecar-proxy", "tracecar-proxy-1"]
    );
    assert_eq!(
        names(&p["spec"]["volumes"]),
        [
            "tracecar-otlp-tls",
            "tracecar-otlp-tls-1",
            "tracecar-causal"
        ]
    );
    let proxy = named(&p["spec"]["initContainers"], "tracecar-proxy-2");
    assert_eq!(proxy["volumeMounts"][0]["name"], "tracecar-otlp-tls-1");
    assert_eq!(
        named(&p["spec"]["volumes"], "tracecar-otlp-tls-1")["secret"]["optional"],
        true
    );
    assert_eq!(env(proxy, "TRACECAR_EXPORT_REQUIRED"), Some("false"));
    assert_eq!(
        proxy["image"],
        format!(
            "ghcr.io/tracecar-dev/tracecar-proxy:{}",
            env!("CARGO_PKG_VERSION")
        )
    );

    let p = patched("http-proxy");
    assert_eq!(
        names(&p["spec"]["initContainers"]),
        ["tracecar-proxy"],
        "http-proxy capture has no init container"
    );
    let app = named(&p["spec"]["containers"], "app");
    let worker = named(&p["spec"]["containers"], "worker");
    assert_eq!(env(app, "HTTP_PROXY"), Some("http://127.0.0.1:15140"));
    assert_eq!(env(app, "http_proxy"), Some("http://127.0.0.1:15140"));
    assert_eq!(
        env(app, "NO_PROXY"),
        Some("localhost,127.0.0.1,::1,.svc,.cluster.local")
    );
    assert_eq!(
        env(app, "no_proxy"),
        Some("localhost,127.0.0.1,::1,.svc,.cluster.local")
    );
    assert_eq!(
        env(worker, "HTTP_PROXY"),
        Some("http://corporate-proxy:3128"),
        "existing value kept"
    );
    assert_eq!(
        worker["env"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["name"] == "HTTP_PROXY")
            .count(),
        1
    );
    assert_eq!(env(worker, "LOG_FORMAT"), Some("json"));
    assert_eq!(
        env(worker, "NO_PROXY"),
        Some("localhost,127.0.0.1,::1,.svc,.cluster.local")
    );

    let p = patched("container-mode");
    assert!(p["spec"].get("initContainers").is_none());
    assert_eq!(names(&p["spec"]["containers"]), ["tracecar-proxy", "app"]);
    let app = named(&p["spec"]["containers"], "app");
    assert_wired(app, "tracecar-causal");
    assert_eq!(env(app, "HTTP_PROXY"), Some("http://127.0.0.1:15140"));
    assert_eq!(env(app, "LD_PRELOAD"), Some(LIBRARY));
    let proxy = named(&p["spec"]["containers"], "tracecar-proxy");
    assert!(proxy.get("restartPolicy").is_none());
    assert_eq!(
        proxy["lifecycle"]["postStart"]["exec"]["command"],
        serde_json::json!(["tracecar-proxy", "wait-ready", "--timeout", "60s"])
    );
    assert_eq!(env(proxy, "TRACECAR_CONTAINER_NAME"), Some("app"));
    assert_eq!(
        env(named(&p["spec"]["containers"], "app"), "NO_PROXY"),
        Some("localhost,127.0.0.1,::1,.svc,.corp.internal")
    );

    let p = patched("replicaset-owned");
    let proxy = named(&p["spec"]["initContainers"], "tracecar-proxy");
    assert_eq!(env(proxy, "OTEL_SERVICE_NAME"), Some("web"));
    assert_eq!(
        env(proxy, "OTEL_RESOURCE_ATTRIBUTES"),
        Some("k8s.deployment.name=web")
    );

    let p = patched("cronjob-owned");
    let proxy = named(&p["spec"]["initContainers"], "tracecar-proxy");
    assert_eq!(env(proxy, "OTEL_SERVICE_NAME"), Some("report"));
    assert_eq!(
        env(proxy, "OTEL_RESOURCE_ATTRIBUTES"),
        Some("k8s.cronjob.name=report")
    );

    check_preload(o);

    let p = patched("opt-in-enabled");
    assert_eq!(
        env(
            named(&p["spec"]["initContainers"], "tracecar-proxy"),
            "OTEL_SERVICE_NAME"
        ),
        Some("lonely")
    );
}

/// How many env entries of `container` are named `name`.
fn count(container: &Value, name: &str) -> usize {
    container["env"]
        .as_array()
        .map_or(0, |l| l.iter().filter(|e| e["name"] == name).count())
}

/// `container` loads the library from `volume` (mounted at /var/run/tracecar) and names the
/// table; its `LD_PRELOAD` (one entry) ends with the library.
fn assert_wired(container: &Value, volume: &str) {
    let mounts = container["volumeMounts"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        mounts.contains(&serde_json::json!({"name": volume, "mountPath": "/var/run/tracecar"})),
        "{container}"
    );
    assert_eq!(count(container, "LD_PRELOAD"), 1, "{container}");
    assert!(
        env(container, "LD_PRELOAD").is_some_and(|v| v.ends_with(LIBRARY)),
        "{container}"
    );
    assert_eq!(count(container, "TRACECAR_CAUSAL_TABLE"), 1, "{container}");
    assert_eq!(count(container, "NODE_OPTIONS"), 1, "{container}");
    assert!(
        env(container, "NODE_OPTIONS").is_some_and(|v| v.ends_with(NODE_REQUIRE)),
        "{container}"
    );
}

/// `container` was given nothing of the preload library.
fn assert_not_wired(container: &Value) {
    let mounts = container["volumeMounts"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        !mounts.iter().any(|m| m["mountPath"] == "/var/run/tracecar"),
        "{container}"
    );
    assert!(
        env(container, "LD_PRELOAD").is_none_or(|v| !v.contains(LIBRARY)),
        "{container}"
    );
    assert_eq!(env(container, "TRACECAR_CAUSAL_TABLE"), None, "{container}");
    assert!(
        env(container, "NODE_OPTIONS").is_none_or(|v| !v.contains(NODE_REQUIRE)),
        "{container}"
    );
}

/// The preload library's wiring (issue 12), fixture by fixture.
fn check_preload(o: &BTreeMap<String, Outcome>) {
    let patched = |n: &str| {
        o[n].patched
            .as_ref()
            .unwrap_or_else(|| panic!("{n} was not injected"))
    };
    let proxy_of = |p: &Value| -> Value {
        let all = [&p["spec"]["initContainers"], &p["spec"]["containers"]];
        all.iter()
            .filter_map(|l| l.as_array())
            .flatten()
            .find(|c| c["command"] == serde_json::json!(["tracecar-proxy", "run"]))
            .cloned()
            .expect("a proxy")
    };

    // The app's own LD_PRELOAD stays first, byte for byte; the library is appended once.
    let p = patched("preload-existing");
    let app = named(&p["spec"]["containers"], "app");
    assert_wired(app, "tracecar-causal");
    assert_eq!(
        app["env"][0],
        serde_json::json!({"name": "LD_PRELOAD",
            "value": format!("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 {LIBRARY}")})
    );
    assert_eq!(env(app, "TZ"), Some("UTC"));
    let batch = named(&p["spec"]["containers"], "batch");
    assert_wired(batch, "tracecar-causal");
    assert_eq!(
        env(batch, "LD_PRELOAD"),
        Some(format!("/opt/a.so:/opt/b.so:{LIBRARY}").as_str())
    );
    assert!(o["preload-existing"].warnings.is_empty());

    // valueFrom / envFrom: not replaced, not touched, and the user is told.
    let p = patched("preload-value-from");
    let app = named(&p["spec"]["containers"], "app");
    assert_not_wired(app);
    assert_eq!(
        app["env"],
        serde_json::json!([{"name": "LD_PRELOAD", "valueFrom":
            {"configMapKeyRef": {"name": "app-preload", "key": "preload"}}}])
    );
    let configured = named(&p["spec"]["containers"], "configured");
    assert_not_wired(configured);
    assert!(configured.get("env").is_none());
    assert_wired(named(&p["spec"]["containers"], "web"), "tracecar-causal");
    let w = &o["preload-value-from"].warnings;
    assert_eq!(w.len(), 2, "{w:?}");
    assert!(
        w[0].starts_with(
            "tracecar.dev/correlation: container \"app\": its LD_PRELOAD is set with valueFrom"
        ),
        "{w:?}"
    );
    assert!(
        w[1].starts_with("tracecar.dev/correlation: container \"configured\": it has envFrom"),
        "{w:?}"
    );
    assert_eq!(env(&proxy_of(p), "TRACECAR_CAUSAL_TABLE"), Some(TABLE));

    // Several containers, names taken, paths taken, a table named by the app.
    let p = patched("causal-containers");
    assert_eq!(
        names(&p["spec"]["volumes"]),
        ["tracecar-causal", "run", "tracecar-causal-1"]
    );
    let c = &p["spec"]["containers"];
    let api = named(c, "api");
    assert_wired(api, "tracecar-causal-1");
    assert_eq!(api["volumeMounts"][0]["mountPath"], "/cache");
    assert_eq!(env(api, "PORT"), Some("8080"));
    assert_wired(named(c, "worker"), "tracecar-causal-1");
    let own = named(c, "own-table");
    assert_wired(own, "tracecar-causal-1");
    assert_eq!(
        env(own, "TRACECAR_CAUSAL_TABLE"),
        Some("/var/run/tracecar/custom")
    );
    let busy = named(c, "busy-path");
    assert_eq!(
        busy["volumeMounts"],
        serde_json::json!([{"name": "run", "mountPath": "/var/run/tracecar/"}])
    );
    assert!(busy.get("env").is_none());
    let w = &o["causal-containers"].warnings;
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].contains("\"busy-path\": it already uses the path /var/run/tracecar"));
    let migrate = named(&p["spec"]["initContainers"], "migrate");
    assert_eq!(
        migrate,
        &serde_json::json!({"name": "migrate", "image": "busybox:1.36"})
    );
    let proxy = proxy_of(p);
    assert_eq!(proxy["volumeMounts"][0]["name"], "tracecar-causal-1");

    // Opted out per pod or for the cluster: nothing added; the pod annotation wins.
    for n in ["correlation-off", "cluster-inflight"] {
        let p = patched(n);
        assert!(p["spec"].get("volumes").is_none(), "{n}");
        for c in p["spec"]["containers"].as_array().unwrap() {
            assert_not_wired(c);
        }
        let proxy = proxy_of(p);
        assert_eq!(env(&proxy, "TRACECAR_CAUSAL_TABLE"), None, "{n}");
        assert!(proxy.get("volumeMounts").is_none(), "{n}");
    }
    assert_eq!(
        named(&patched("correlation-off")["spec"]["containers"], "app")["env"],
        serde_json::json!([{"name": "LD_PRELOAD", "value": "/usr/lib/libjemalloc.so"}])
    );
    assert_eq!(
        env(
            &proxy_of(patched("cluster-inflight")),
            "TRACECAR_CORRELATION"
        ),
        Some("inflight")
    );
    let p = patched("cluster-inflight-pod-causal");
    assert_wired(named(&p["spec"]["containers"], "app"), "tracecar-causal");
    assert_eq!(env(&proxy_of(p), "TRACECAR_CORRELATION"), Some("causal"));

    // Container mode: the proxy goes first; the app's own changes land on the app.
    let p = patched("container-mode-preload");
    let c = &p["spec"]["containers"];
    assert_eq!(names(c), ["tracecar-proxy", "app", "side"]);
    let app = named(c, "app");
    assert_wired(app, "tracecar-causal");
    assert_eq!(
        env(app, "LD_PRELOAD"),
        Some(format!("/usr/lib/libtcmalloc.so {LIBRARY}").as_str())
    );
    assert_eq!(names(&app["volumeMounts"]), ["data", "tracecar-causal"]);
    assert_wired(named(c, "side"), "tracecar-causal");
    let proxy = named(c, "tracecar-proxy");
    assert_eq!(env(proxy, "LD_PRELOAD"), None);
    assert_eq!(proxy["volumeMounts"][0]["mountPath"], "/var/run/tracecar");
    assert_eq!(names(&p["spec"]["initContainers"]), ["tracecar-init"]);

    // A namespace's policy (the chart routes its pods to /inject[/opt-in]/correlation/<policy>);
    // a pod's annotation still wins.
    let p = patched("namespace-inflight");
    assert_not_wired(named(&p["spec"]["containers"], "app"));
    assert_eq!(env(&proxy_of(p), "TRACECAR_CORRELATION"), Some("inflight"));
    let p = patched("namespace-off-pod-causal");
    assert_wired(named(&p["spec"]["containers"], "app"), "tracecar-causal");
    assert_eq!(env(&proxy_of(p), "TRACECAR_CORRELATION"), Some("causal"));
    let p = patched("namespace-opt-in-off");
    assert_not_wired(named(&p["spec"]["containers"], "app"));
    assert_eq!(env(&proxy_of(p), "TRACECAR_CORRELATION"), Some("off"));

    // NODE_OPTIONS: the app's own options stay first, byte for byte; valueFrom keeps the
    // library but not the hook (told); a value that names the hook is left alone.
    let p = patched("node-options");
    let c = &p["spec"]["containers"];
    let web = named(c, "web");
    assert_wired(web, "tracecar-causal");
    assert_eq!(
        web["env"][0],
        serde_json::json!({"name": "NODE_OPTIONS",
            "value": format!("--max-old-space-size=512 --enable-source-maps {NODE_REQUIRE}")})
    );
    let configured = named(c, "configured");
    assert_eq!(env(configured, "LD_PRELOAD"), Some(LIBRARY));
    assert_eq!(count(configured, "NODE_OPTIONS"), 1);
    assert!(configured["env"][0]["valueFrom"].is_object());
    let already = named(c, "already");
    assert_wired(already, "tracecar-causal");
    assert_eq!(env(already, "NODE_OPTIONS"), Some(NODE_REQUIRE));
    let w = &o["node-options"].warnings;
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].starts_with(
            "tracecar.dev/correlation: container \"configured\": its NODE_OPTIONS is set with valueFrom"
        ) && w[0].contains("Node.js runtime hook is not added"),
        "{w:?}"
    );
}
