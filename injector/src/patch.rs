//! What injection adds to a pod, as an RFC 6902 JSON Patch against the pod as received,
//! and the exact inverse (`uninject`) for manual injection.
//!
//! The patch is written to apply to any valid pod: it creates `metadata.annotations`,
//! `spec.initContainers`, `spec.volumes` and container `env` lists when they are missing,
//! escapes JSON pointers (`tracecar.dev/status` → `tracecar.dev~1status`), and never reuses
//! a container or volume name the pod already has (`tracecar-proxy` → `tracecar-proxy-1`).

use std::collections::{BTreeMap, BTreeSet};

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation};
use k8s_openapi::api::core::v1::{Container, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::annotations::{self as ann, Capture, Settings, SidecarMode};
use crate::config::{Defaults, VERSION};
use crate::workload::Workload;

/// Base name of the iptables init container.
pub const INIT_NAME: &str = "tracecar-init";
/// Base name of the proxy container.
pub const PROXY_NAME: &str = "tracecar-proxy";
/// Base name of the collector TLS volume.
pub const TLS_VOLUME: &str = "tracecar-otlp-tls";
/// Where the collector TLS Secret is mounted in the proxy.
pub const TLS_MOUNT: &str = "/var/run/secrets/tracecar/otlp";
/// The proxy's admin port (SPEC): `/live`, `/ready`, `/metrics`.
pub const ADMIN_PORT: u16 = 15190;
/// The proxy's uid and gid (SPEC).
pub const PROXY_UID: i64 = 2140;
/// The proxy's outbound listener as an HTTP proxy URL (SPEC).
pub const HTTP_PROXY_URL: &str = "http://127.0.0.1:15140";

/// What injection added, stored as JSON in the `tracecar.dev/injection` annotation so that
/// `inject --uninject` removes exactly that.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub init_containers: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub containers: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<String>,
    /// Container name → environment variables added to it (http-proxy capture).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, Vec<String>>,
    /// Lists and maps that did not exist before: `annotations`, `initContainers`,
    /// `volumes`, `env:<container>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub created: Vec<String>,
}

/// Everything [`build`] needs besides the pod.
pub struct Inputs<'a> {
    pub defaults: &'a Defaults,
    pub settings: &'a Settings,
    pub workload: Option<&'a Workload>,
    pub service_name: &'a str,
}

fn ptr(tokens: &[&str]) -> PointerBuf {
    PointerBuf::from_tokens(tokens.iter().copied())
}

fn add(path: PointerBuf, value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation { path, value })
}

/// Picks `base`, else `base-1`, `base-2`, ... not in `taken`, and marks it taken.
fn unique(base: &str, taken: &mut BTreeSet<String>) -> String {
    let mut name = base.to_owned();
    let mut i = 1;
    while taken.contains(&name) {
        name = format!("{base}-{i}");
        i += 1;
    }
    taken.insert(name.clone());
    name
}

fn containers_of(pod: &Pod) -> (&[Container], &[Container]) {
    match pod.spec.as_ref() {
        Some(s) => (s.init_containers.as_deref().unwrap_or(&[]), &s.containers),
        None => (&[], &[]),
    }
}

/// Builds the patch that injects `pod`. The pod must have a spec with a container.
pub fn build(pod: &Pod, inputs: &Inputs<'_>) -> Patch {
    let Inputs {
        defaults, settings, ..
    } = *inputs;
    let spec = pod.spec.as_ref();
    let (init, apps) = containers_of(pod);
    let mut record = Record::default();
    let mut ops = Vec::with_capacity(8);

    let mut taken: BTreeSet<String> = init.iter().chain(apps).map(|c| c.name.clone()).collect();
    if let Some(eph) = spec.and_then(|s| s.ephemeral_containers.as_ref()) {
        taken.extend(eph.iter().map(|c| c.name.clone()));
    }
    let mut volumes_taken: BTreeSet<String> = spec
        .and_then(|s| s.volumes.as_ref())
        .map(|v| v.iter().map(|v| v.name.clone()).collect())
        .unwrap_or_default();

    let init_name = (settings.capture == Capture::Iptables).then(|| unique(INIT_NAME, &mut taken));
    let proxy_name = unique(PROXY_NAME, &mut taken);
    let volume_name = defaults
        .collector_tls_secret
        .as_ref()
        .map(|secret| (unique(TLS_VOLUME, &mut volumes_taken), secret));

    // http-proxy capture: point every app container at the proxy, without overriding.
    if settings.capture == Capture::HttpProxy {
        let no_proxy = format!("localhost,127.0.0.1,::1,.svc,.{}", defaults.cluster_domain);
        let vars = [
            ("HTTP_PROXY", HTTP_PROXY_URL),
            ("http_proxy", HTTP_PROXY_URL),
            ("NO_PROXY", no_proxy.as_str()),
            ("no_proxy", no_proxy.as_str()),
        ];
        for (i, c) in apps.iter().enumerate() {
            let idx = i.to_string();
            let existing: BTreeSet<&str> =
                c.env.iter().flatten().map(|e| e.name.as_str()).collect();
            let new: Vec<(&str, &str)> = vars
                .iter()
                .copied()
                .filter(|(k, _)| !existing.contains(k))
                .collect();
            if new.is_empty() {
                continue;
            }
            if c.env.is_none() {
                let list: Vec<Value> = new
                    .iter()
                    .map(|(k, v)| json!({"name": k, "value": v}))
                    .collect();
                ops.push(add(
                    ptr(&["spec", "containers", &idx, "env"]),
                    Value::Array(list),
                ));
                record.created.push(format!("env:{}", c.name));
            } else {
                for (k, v) in &new {
                    ops.push(add(
                        ptr(&["spec", "containers", &idx, "env", "-"]),
                        json!({"name": k, "value": v}),
                    ));
                }
            }
            record.env.insert(
                c.name.clone(),
                new.iter().map(|(k, _)| (*k).to_owned()).collect(),
            );
        }
    }

    let proxy = proxy_container(
        pod,
        inputs,
        &proxy_name,
        volume_name.as_ref().map(|(n, _)| n.as_str()),
    );

    // Init containers: tracecar-init first, then the native sidecar, then the pod's own.
    let mut new_init = Vec::new();
    if let Some(name) = &init_name {
        new_init.push(init_container(defaults, settings, name));
        record.init_containers.push(name.clone());
    }
    let native = defaults.sidecar_mode == SidecarMode::Native;
    if native {
        record.init_containers.push(proxy_name.clone());
    }
    let mut proxy = Some(proxy);
    if native {
        if let Some(p) = proxy.take() {
            new_init.push(p);
        }
    }
    if !new_init.is_empty() {
        if spec.and_then(|s| s.init_containers.as_ref()).is_none() {
            ops.push(add(
                ptr(&["spec", "initContainers"]),
                Value::Array(new_init),
            ));
            record.created.push("initContainers".into());
        } else {
            for (i, c) in new_init.into_iter().enumerate() {
                ops.push(add(ptr(&["spec", "initContainers", &i.to_string()]), c));
            }
        }
    }
    if let Some(p) = proxy {
        ops.push(add(ptr(&["spec", "containers", "0"]), p));
        record.containers.push(proxy_name.clone());
    }

    if let Some((vname, secret)) = &volume_name {
        // Optional: a missing Secret must not keep the pod from starting; the proxy runs
        // without export until the files appear (TRACECAR_EXPORT_REQUIRED=false below).
        let vol = json!({"name": vname, "secret": {"secretName": secret, "optional": true}});
        if spec.and_then(|s| s.volumes.as_ref()).is_none() {
            ops.push(add(ptr(&["spec", "volumes"]), json!([vol])));
            record.created.push("volumes".into());
        } else {
            ops.push(add(ptr(&["spec", "volumes", "-"]), vol));
        }
        record.volumes.push(vname.clone());
    }

    // Annotations last: the record is complete now.
    let created_annotations = pod.metadata.annotations.is_none();
    if created_annotations {
        record.created.push("annotations".into());
    }
    let record_json = serde_json::to_string(&record).unwrap_or_default();
    let marks = [
        (ann::STATUS, ann::STATUS_INJECTED.to_owned()),
        (ann::PROXY_VERSION, VERSION.to_owned()),
        (ann::INJECTION, record_json),
    ];
    if created_annotations {
        let map: Map<String, Value> = marks
            .into_iter()
            .map(|(k, v)| (k.to_owned(), Value::String(v)))
            .collect();
        if pod.metadata == ObjectMeta::default() {
            // Sent without metadata (or `metadata: null`), the pod decodes with an empty one:
            // add the whole object, which applies whether or not the sender's JSON has it.
            ops.push(add(ptr(&["metadata"]), json!({ "annotations": map })));
        } else {
            ops.push(add(ptr(&["metadata", "annotations"]), Value::Object(map)));
        }
    } else {
        for (k, v) in marks {
            ops.push(add(ptr(&["metadata", "annotations", k]), Value::String(v)));
        }
    }
    Patch(ops)
}

fn resources(settings: &Settings) -> Value {
    let mut requests = Map::new();
    let mut limits = Map::new();
    for (is_limit, key, q) in [
        (false, "cpu", &settings.cpu_request),
        (false, "memory", &settings.memory_request),
        (true, "cpu", &settings.cpu_limit),
        (true, "memory", &settings.memory_limit),
    ] {
        if let Some(q) = q {
            let map = if is_limit { &mut limits } else { &mut requests };
            map.insert(key.to_owned(), Value::String(q.text.clone()));
        }
    }
    let mut r = Map::new();
    if !requests.is_empty() {
        r.insert("requests".into(), Value::Object(requests));
    }
    if !limits.is_empty() {
        r.insert("limits".into(), Value::Object(limits));
    }
    Value::Object(r)
}

fn init_container(defaults: &Defaults, settings: &Settings, name: &str) -> Value {
    let mut command = vec!["tracecar-proxy".to_owned(), "init".to_owned()];
    for (flag, v) in [
        ("--skip-inbound-ports", &settings.skip_inbound_ports),
        ("--skip-outbound-ports", &settings.skip_outbound_ports),
        ("--skip-outbound-cidrs", &settings.skip_outbound_cidrs),
    ] {
        if !v.is_empty() {
            command.push(flag.to_owned());
            command.push(v.clone());
        }
    }
    json!({
        "name": name,
        "image": defaults.init_image,
        "command": command,
        "resources": resources(settings),
        "securityContext": {
            "runAsUser": 0,
            "runAsGroup": 0,
            "runAsNonRoot": false,
            "privileged": false,
            "allowPrivilegeEscalation": false,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
        },
    })
}

fn env_value(name: &str, value: &str) -> Value {
    json!({"name": name, "value": value})
}

fn env_field(name: &str, path: &str) -> Value {
    json!({"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}})
}

fn proxy_container(pod: &Pod, inputs: &Inputs<'_>, name: &str, tls_volume: Option<&str>) -> Value {
    let Inputs {
        defaults,
        settings,
        workload,
        service_name,
    } = *inputs;
    let (_, apps) = containers_of(pod);
    let mut env = vec![
        env_field("TRACECAR_POD_NAME", "metadata.name"),
        env_field("TRACECAR_POD_UID", "metadata.uid"),
        env_field("TRACECAR_POD_NAMESPACE", "metadata.namespace"),
        env_field("TRACECAR_NODE_NAME", "spec.nodeName"),
    ];
    if let Some(first) = apps.first() {
        env.push(env_value("TRACECAR_CONTAINER_NAME", &first.name));
    }
    env.push(env_value("OTEL_SERVICE_NAME", service_name));
    if let Some(Workload {
        kind: Some(kind),
        name,
    }) = workload
    {
        env.push(env_value(
            "OTEL_RESOURCE_ATTRIBUTES",
            &format!("{}={name}", kind.attribute()),
        ));
    }
    if let Some(ep) = &settings.collector_endpoint {
        env.push(env_value("OTEL_EXPORTER_OTLP_ENDPOINT", ep));
    }
    env.push(env_value(
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        defaults.collector_protocol.as_str(),
    ));
    env.push(env_value("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"));
    env.push(env_value(
        "OTEL_TRACES_SAMPLER_ARG",
        &settings.sampling_ratio,
    ));
    env.push(env_value("OTEL_PROPAGATORS", &settings.propagators));
    env.push(env_value("TRACECAR_CORRELATION", settings.correlation));
    env.push(env_value("TRACECAR_LOG", settings.log_level));
    if tls_volume.is_some() {
        env.push(env_value(
            "OTEL_EXPORTER_OTLP_CERTIFICATE",
            &format!("{TLS_MOUNT}/ca.crt"),
        ));
        env.push(env_value(
            "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
            &format!("{TLS_MOUNT}/tls.crt"),
        ));
        env.push(env_value(
            "OTEL_EXPORTER_OTLP_CLIENT_KEY",
            &format!("{TLS_MOUNT}/tls.key"),
        ));
        // The Secret volume is optional, so the files may be missing or still arriving: the
        // proxy must serve traffic and report export as failing rather than exit, which would
        // keep the app from starting (native sidecar: startupProbe; container: postStart).
        env.push(env_value("TRACECAR_EXPORT_REQUIRED", "false"));
    }

    let mut c = Map::new();
    c.insert("name".into(), json!(name));
    c.insert("image".into(), json!(settings.proxy_image));
    c.insert("command".into(), json!(["tracecar-proxy", "run"]));
    if defaults.sidecar_mode == SidecarMode::Native {
        c.insert("restartPolicy".into(), json!("Always"));
    }
    c.insert("env".into(), Value::Array(env));
    c.insert("resources".into(), resources(settings));
    c.insert(
        "securityContext".into(),
        json!({
            "runAsUser": PROXY_UID,
            "runAsGroup": PROXY_UID,
            "runAsNonRoot": true,
            "readOnlyRootFilesystem": true,
            "allowPrivilegeEscalation": false,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        }),
    );
    c.insert(
        "startupProbe".into(),
        json!({"httpGet": {"path": "/ready", "port": ADMIN_PORT}, "periodSeconds": 1, "failureThreshold": 60}),
    );
    c.insert(
        "livenessProbe".into(),
        json!({"httpGet": {"path": "/live", "port": ADMIN_PORT}, "periodSeconds": 10, "failureThreshold": 3}),
    );
    if defaults.sidecar_mode == SidecarMode::Container {
        c.insert(
            "lifecycle".into(),
            json!({"postStart": {"exec": {"command": ["tracecar-proxy", "wait-ready", "--timeout", "60s"]}}}),
        );
    }
    if let Some(v) = tls_volume {
        c.insert(
            "volumeMounts".into(),
            json!([{"name": v, "mountPath": TLS_MOUNT, "readOnly": true}]),
        );
    }
    Value::Object(c)
}

/// Why a document could not be uninjected.
#[derive(Debug, thiserror::Error)]
pub enum UninjectError {
    #[error("annotation tracecar.dev/injection is missing or not a record: {0}")]
    Record(String),
}

/// Removes what injection added from a pod or pod template (`{metadata, spec}`), using the
/// `tracecar.dev/injection` record. Returns `Ok(false)` when the object is not injected.
pub fn uninject(pod: &mut Value) -> Result<bool, UninjectError> {
    let Some(annotations) = pod
        .pointer("/metadata/annotations")
        .and_then(Value::as_object)
    else {
        return Ok(false);
    };
    if !annotations.contains_key(ann::STATUS) && !annotations.contains_key(ann::INJECTION) {
        return Ok(false);
    }
    let record: Record = match annotations.get(ann::INJECTION).and_then(Value::as_str) {
        Some(s) => serde_json::from_str(s).map_err(|e| UninjectError::Record(e.to_string()))?,
        None => return Err(UninjectError::Record("missing".into())),
    };
    let created = |what: &str| record.created.iter().any(|c| c == what);

    if let Some(spec) = pod.get_mut("spec").and_then(Value::as_object_mut) {
        remove_named(
            spec,
            "initContainers",
            &record.init_containers,
            created("initContainers"),
        );
        remove_named(spec, "containers", &record.containers, false);
        remove_named(spec, "volumes", &record.volumes, created("volumes"));
        if let Some(list) = spec.get_mut("containers").and_then(Value::as_array_mut) {
            for c in list.iter_mut().filter_map(Value::as_object_mut) {
                let Some(name) = c.get("name").and_then(Value::as_str).map(str::to_owned) else {
                    continue;
                };
                if let Some(vars) = record.env.get(&name) {
                    remove_named(c, "env", vars, created(&format!("env:{name}")));
                }
            }
        }
    }
    if let Some(meta) = pod.get_mut("metadata").and_then(Value::as_object_mut) {
        if let Some(a) = meta.get_mut("annotations").and_then(Value::as_object_mut) {
            for k in [ann::STATUS, ann::PROXY_VERSION, ann::INJECTION] {
                a.remove(k);
            }
            if a.is_empty() && created("annotations") {
                meta.remove("annotations");
            }
        }
    }
    Ok(true)
}

/// Removes the entries of `obj[key]` whose `name` is in `names` (first match each), and the
/// list itself when it was created by injection and is now empty.
fn remove_named(obj: &mut Map<String, Value>, key: &str, names: &[String], created: bool) {
    if let Some(list) = obj.get_mut(key).and_then(Value::as_array_mut) {
        for n in names {
            if let Some(i) = list
                .iter()
                .position(|v| v.get("name").and_then(Value::as_str) == Some(n))
            {
                list.remove(i);
            }
        }
        if list.is_empty() && created {
            obj.remove(key);
        }
    }
}
