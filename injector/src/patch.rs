//! What injection adds to a pod, as an RFC 6902 JSON Patch against the pod as received,
//! and the exact inverse (`uninject`) for manual injection.
//!
//! The patch is written to apply to any valid pod: it creates `metadata.annotations`,
//! `spec.initContainers`, `spec.volumes` and container `env` lists when they are missing,
//! escapes JSON pointers (`tracecar.dev/status` → `tracecar.dev~1status`), and never reuses
//! a container or volume name the pod already has (`tracecar-proxy` → `tracecar-proxy-1`).
//!
//! With the `causal` correlation policy it also wires the preload library (issue 12): an
//! in-memory volume at [`CAUSAL_MOUNT`] in the proxy and in each app container, where the
//! proxy creates the table and copies the library at start-up (before it reports ready, so
//! before the app containers start); each app container gets `LD_PRELOAD` (appended to its
//! own value), `NODE_OPTIONS` with `--require` of the Node.js runtime hook that the proxy
//! writes there too (appended likewise; other runtimes ignore it) and `TRACECAR_CAUSAL_TABLE`.
//! A container whose `LD_PRELOAD` cannot be extended safely is left alone, with a warning; one
//! whose `NODE_OPTIONS` cannot be gets the library without the hook, with a warning.

use std::collections::{BTreeMap, BTreeSet};

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation};
use k8s_openapi::api::core::v1::{Container, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::annotations::{self as ann, Capture, Settings, SidecarMode, Warning};
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
/// Base name of the in-memory volume shared by the proxy and the app containers (`causal`).
pub const CAUSAL_VOLUME: &str = "tracecar-causal";
/// Where that volume is mounted, in the proxy and in every app container.
pub const CAUSAL_MOUNT: &str = "/var/run/tracecar";
/// The causal table the proxy creates there (SPEC: the default of `TRACECAR_CAUSAL_TABLE`).
pub const CAUSAL_TABLE: &str = "/var/run/tracecar/causal";
/// The preload library the proxy copies there from its image.
/// `$PLATFORM` is expanded by glibc's loader and not by musl's, which then skips the entry: an
/// Alpine app is never stopped by a glibc library it cannot load (docs/causal.md). The proxy
/// copies the library to each platform directory at start-up.
pub const PRELOAD_LIBRARY: &str = "/var/run/tracecar/lib/$PLATFORM/libtracecar_preload.so";
/// `sizeLimit` of the volume: the library and a table of the default size (4096 slots,
/// 128 KiB) need well under 2 MiB; the limit bounds what the pod can keep in memory there.
pub const CAUSAL_SIZE_LIMIT: &str = "8Mi";
/// The variable that names the table, for the proxy and the library alike (SPEC).
pub const CAUSAL_TABLE_ENV: &str = "TRACECAR_CAUSAL_TABLE";
/// The dynamic loader's preload list.
pub const LD_PRELOAD: &str = "LD_PRELOAD";
/// Node.js's options, read by every `node` process at start.
pub const NODE_OPTIONS: &str = "NODE_OPTIONS";
/// The option that loads the Node.js runtime hook, which the proxy writes to the shared
/// volume before it reports ready (so before the app containers start: a `--require` of a
/// missing file would stop Node.js). One token, so that it is found again as one.
pub const NODE_REQUIRE: &str = "--require=/var/run/tracecar/node/tracecar.js";

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
    /// Container name → environment variables added to it (http-proxy capture; with causal
    /// correlation `TRACECAR_CAUSAL_TABLE`, and `LD_PRELOAD` when the container had none).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, Vec<String>>,
    /// Container name → volume mounts (by volume name) added to it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub mounts: BTreeMap<String, Vec<String>>,
    /// Container name → the value its own (last) `LD_PRELOAD` entry had before the library
    /// was appended; `null` when the entry had no `value`. Uninject puts it back as it was.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub preload: BTreeMap<String, Option<String>>,
    /// The same for `NODE_OPTIONS` and the Node.js hook.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_options: BTreeMap<String, Option<String>>,
    /// Lists and maps that did not exist before: `annotations`, `initContainers`,
    /// `volumes`, `env:<container>`, `volumeMounts:<container>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub created: Vec<String>,
}

/// What injection does to a list-valued variable of one app container (`LD_PRELOAD`,
/// `NODE_OPTIONS`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Preload {
    /// The container does not set the variable: add it, naming only our item.
    Add,
    /// Append our item to the value of the container's env entry `index`.
    Append {
        index: usize,
        original: Option<String>,
        value: String,
    },
    /// The container's value already names our item: leave it as it is.
    Present,
}

/// Decides how the library reaches app container `c`; `Err` says why it cannot, safely.
fn preload_plan(c: &Container) -> Result<Preload, String> {
    let mount = CAUSAL_MOUNT.trim_end_matches('/');
    let busy = c
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| m.mount_path.as_str())
        .chain(
            c.volume_devices
                .iter()
                .flatten()
                .map(|d| d.device_path.as_str()),
        )
        .any(|p| p.trim_end_matches('/') == mount);
    if busy {
        return Err(format!("it already uses the path {CAUSAL_MOUNT}"));
    }
    extend_plan(
        c,
        LD_PRELOAD,
        |old| old.split([' ', ':']).any(|p| p == PRELOAD_LIBRARY),
        append_library,
    )
}

/// Decides how the Node.js hook reaches app container `c` (after [`preload_plan`] said yes).
fn node_plan(c: &Container) -> Result<Preload, String> {
    extend_plan(
        c,
        NODE_OPTIONS,
        |old| old.split_ascii_whitespace().any(|p| p == NODE_REQUIRE),
        |old| {
            if old.trim().is_empty() {
                format!("{old}{NODE_REQUIRE}")
            } else {
                format!("{old} {NODE_REQUIRE}")
            }
        },
    )
}

/// How variable `var` of container `c` gets our item: `present` says whether a value names it
/// already, `append` adds it after a value, leaving that value first and unchanged.
fn extend_plan(
    c: &Container,
    var: &str,
    present: impl Fn(&str) -> bool,
    append: impl Fn(&str) -> String,
) -> Result<Preload, String> {
    // Kubernetes uses the last entry of a name: that is the one to extend.
    let last = c
        .env
        .iter()
        .flatten()
        .enumerate()
        .filter(|(_, e)| e.name == var)
        .last();
    match last {
        Some((_, e)) if e.value_from.is_some() => Err(format!(
            "its {var} is set with valueFrom, which the injector cannot extend"
        )),
        Some((index, e)) => {
            let old = e.value.as_deref().unwrap_or("");
            if present(old) {
                return Ok(Preload::Present);
            }
            Ok(Preload::Append {
                index,
                original: e.value.clone(),
                value: append(old),
            })
        }
        None if c.env_from.as_ref().is_some_and(|f| !f.is_empty()) => Err(format!(
            "it has envFrom, which may set {var}, and an env entry would replace that value \
             (name {var} in its env, even empty, to have it extended)"
        )),
        None => Ok(Preload::Add),
    }
}

/// `old` followed by the library, separated as `old` separates its own entries (ld.so takes
/// spaces and colons); `old` stays first and unchanged.
fn append_library(old: &str) -> String {
    if old.is_empty() || old.ends_with([' ', ':']) {
        return format!("{old}{PRELOAD_LIBRARY}");
    }
    let sep = if old.contains(':') && !old.contains(' ') {
        ':'
    } else {
        ' '
    };
    format!("{old}{sep}{PRELOAD_LIBRARY}")
}

/// What injection adds to one app container (a regular container of the pod).
#[derive(Default)]
struct AppAdds {
    /// Variables appended to its env list, in order.
    env: Vec<(&'static str, String)>,
    /// The env entries whose `value` is replaced, with their new values.
    extend: Vec<(usize, String)>,
    /// The causal volume is mounted at [`CAUSAL_MOUNT`].
    mount: bool,
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

/// Builds the patch that injects `pod` (the pod must have a spec with a container), and a
/// warning for each app container that could not get the preload library.
pub fn build(pod: &Pod, inputs: &Inputs<'_>) -> (Patch, Vec<Warning>) {
    let Inputs {
        defaults, settings, ..
    } = *inputs;
    let spec = pod.spec.as_ref();
    let (init, apps) = containers_of(pod);
    let mut record = Record::default();
    let mut warnings = Vec::new();
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

    // What each app container gets. http-proxy capture: point it at the proxy, without
    // overriding.
    let mut adds: Vec<AppAdds> = apps.iter().map(|_| AppAdds::default()).collect();
    if settings.capture == Capture::HttpProxy {
        let no_proxy = format!("localhost,127.0.0.1,::1,.svc,.{}", defaults.cluster_domain);
        let vars = [
            ("HTTP_PROXY", HTTP_PROXY_URL),
            ("http_proxy", HTTP_PROXY_URL),
            ("NO_PROXY", no_proxy.as_str()),
            ("no_proxy", no_proxy.as_str()),
        ];
        for (c, a) in apps.iter().zip(&mut adds) {
            let existing: BTreeSet<&str> =
                c.env.iter().flatten().map(|e| e.name.as_str()).collect();
            for (k, v) in vars {
                if !existing.contains(k) {
                    a.env.push((k, v.to_owned()));
                }
            }
        }
    }
    // Causal correlation: the preload library, loaded from the shared volume. Only regular
    // containers: init containers serve no inbound requests, so there is nothing to tie their
    // calls to, and in container mode they run before the proxy has put the library there.
    let mut causal_volume = None;
    if settings.correlation == "causal" {
        for (c, a) in apps.iter().zip(&mut adds) {
            let plan = match preload_plan(c) {
                Ok(plan) => plan,
                Err(why) => {
                    warnings.push(Warning {
                        annotation: ann::CORRELATION.to_owned(),
                        message: format!(
                            "{}: container {:?}: {why}; the preload library is not added to it \
                             (its outbound calls get a parent only when one is certain)",
                            ann::CORRELATION,
                            c.name
                        ),
                    });
                    continue;
                }
            };
            match plan {
                Preload::Add => a.env.push((LD_PRELOAD, PRELOAD_LIBRARY.to_owned())),
                Preload::Append {
                    index,
                    original,
                    value,
                } => {
                    a.extend.push((index, value));
                    record.preload.insert(c.name.clone(), original);
                }
                Preload::Present => {}
            }
            match node_plan(c) {
                Ok(Preload::Add) => a.env.push((NODE_OPTIONS, NODE_REQUIRE.to_owned())),
                Ok(Preload::Append {
                    index,
                    original,
                    value,
                }) => {
                    a.extend.push((index, value));
                    record.node_options.insert(c.name.clone(), original);
                }
                Ok(Preload::Present) => {}
                Err(why) => warnings.push(Warning {
                    annotation: ann::CORRELATION.to_owned(),
                    message: format!(
                        "{}: container {:?}: {why}; the Node.js runtime hook is not added to it \
                         (a Node.js app there gets no parent for calls made after a timer)",
                        ann::CORRELATION,
                        c.name
                    ),
                }),
            }
            if !c.env.iter().flatten().any(|e| e.name == CAUSAL_TABLE_ENV) {
                a.env.push((CAUSAL_TABLE_ENV, CAUSAL_TABLE.to_owned()));
            }
            a.mount = true;
        }
        if adds.iter().any(|a| a.mount) {
            causal_volume = Some(unique(CAUSAL_VOLUME, &mut volumes_taken));
        }
    }
    // Before the proxy goes in at /spec/containers/0 (container mode): indices are the pod's.
    for (i, (c, a)) in apps.iter().zip(&adds).enumerate() {
        let idx = i.to_string();
        let at = |rest: &[&str]| {
            let mut tokens = vec!["spec", "containers", idx.as_str()];
            tokens.extend_from_slice(rest);
            ptr(&tokens)
        };
        if !a.env.is_empty() {
            let entries = a.env.iter().map(|(k, v)| env_value(k, v));
            if c.env.is_none() {
                ops.push(add(at(&["env"]), Value::Array(entries.collect())));
                record.created.push(format!("env:{}", c.name));
            } else {
                for e in entries {
                    ops.push(add(at(&["env", "-"]), e));
                }
            }
            record.env.insert(
                c.name.clone(),
                a.env.iter().map(|(k, _)| (*k).to_owned()).collect(),
            );
        }
        for (index, value) in &a.extend {
            ops.push(add(
                at(&["env", &index.to_string(), "value"]),
                Value::String(value.clone()),
            ));
        }
        if let (true, Some(vol)) = (a.mount, &causal_volume) {
            let mount = json!({"name": vol, "mountPath": CAUSAL_MOUNT});
            if c.volume_mounts.is_none() {
                ops.push(add(at(&["volumeMounts"]), json!([mount])));
                record.created.push(format!("volumeMounts:{}", c.name));
            } else {
                ops.push(add(at(&["volumeMounts", "-"]), mount));
            }
            record.mounts.insert(c.name.clone(), vec![vol.clone()]);
        }
    }

    let proxy = proxy_container(
        pod,
        inputs,
        &proxy_name,
        volume_name.as_ref().map(|(n, _)| n.as_str()),
        causal_volume.as_deref(),
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

    let mut new_volumes = Vec::new();
    if let Some((vname, secret)) = &volume_name {
        // Optional: a missing Secret must not keep the pod from starting; the proxy runs
        // without export until the files appear (TRACECAR_EXPORT_REQUIRED=false below).
        new_volumes
            .push(json!({"name": vname, "secret": {"secretName": secret, "optional": true}}));
        record.volumes.push(vname.clone());
    }
    if let Some(vname) = &causal_volume {
        new_volumes.push(json!({"name": vname,
            "emptyDir": {"medium": "Memory", "sizeLimit": CAUSAL_SIZE_LIMIT}}));
        record.volumes.push(vname.clone());
    }
    if !new_volumes.is_empty() {
        if spec.and_then(|s| s.volumes.as_ref()).is_none() {
            ops.push(add(ptr(&["spec", "volumes"]), Value::Array(new_volumes)));
            record.created.push("volumes".into());
        } else {
            for vol in new_volumes {
                ops.push(add(ptr(&["spec", "volumes", "-"]), vol));
            }
        }
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
    (Patch(ops), warnings)
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

fn proxy_container(
    pod: &Pod,
    inputs: &Inputs<'_>,
    name: &str,
    tls_volume: Option<&str>,
    causal_volume: Option<&str>,
) -> Value {
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
    if causal_volume.is_some() {
        env.push(env_value(CAUSAL_TABLE_ENV, CAUSAL_TABLE));
    }
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
    let mut mounts = Vec::new();
    if let Some(v) = tls_volume {
        mounts.push(json!({"name": v, "mountPath": TLS_MOUNT, "readOnly": true}));
    }
    if let Some(v) = causal_volume {
        // Writable: the proxy creates the table and copies the library here at start-up.
        mounts.push(json!({"name": v, "mountPath": CAUSAL_MOUNT}));
    }
    if !mounts.is_empty() {
        c.insert("volumeMounts".into(), Value::Array(mounts));
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
                if let Some(original) = record.preload.get(&name) {
                    restore_value(c, LD_PRELOAD, original.as_deref());
                }
                if let Some(original) = record.node_options.get(&name) {
                    restore_value(c, NODE_OPTIONS, original.as_deref());
                }
                if let Some(mounts) = record.mounts.get(&name) {
                    let made = created(&format!("volumeMounts:{name}"));
                    remove_named(c, "volumeMounts", mounts, made);
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

/// Puts back the value that the container's last `var` entry had before our item was
/// appended (`None`: the entry had no `value`).
fn restore_value(container: &mut Map<String, Value>, var: &str, original: Option<&str>) {
    let entry = container
        .get_mut("env")
        .and_then(Value::as_array_mut)
        .and_then(|list| {
            list.iter_mut()
                .rev()
                .find(|e| e.get("name").and_then(Value::as_str) == Some(var))
        })
        .and_then(Value::as_object_mut);
    let Some(entry) = entry else {
        return;
    };
    match original {
        Some(v) => {
            entry.insert("value".to_owned(), Value::String(v.to_owned()));
        }
        None => {
            entry.remove("value");
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{EnvFromSource, EnvVar, EnvVarSource, VolumeMount};

    fn var(name: &str, value: Option<&str>) -> EnvVar {
        EnvVar {
            name: name.into(),
            value: value.map(str::to_owned),
            value_from: None,
        }
    }

    #[test]
    fn the_library_is_appended_after_the_value_as_it_was() {
        let lib = PRELOAD_LIBRARY;
        assert_eq!(append_library(""), lib);
        assert_eq!(
            append_library("/usr/lib/libjemalloc.so"),
            format!("/usr/lib/libjemalloc.so {lib}")
        );
        assert_eq!(append_library("/a.so:/b.so"), format!("/a.so:/b.so:{lib}"));
        assert_eq!(append_library("/a.so /b.so"), format!("/a.so /b.so {lib}"));
        assert_eq!(append_library("/a.so "), format!("/a.so {lib}"));
        assert_eq!(append_library("/a.so:"), format!("/a.so:{lib}"));
        for old in ["", "x", "/a.so:/b.so", " $(EXTRA) ", "é"] {
            assert!(append_library(old).starts_with(old), "{old:?}");
        }
    }

    #[test]
    fn the_node_hook_is_appended_to_node_options_as_they_were() {
        let c = |env: Vec<EnvVar>| Container {
            name: "app".into(),
            env: Some(env),
            ..Container::default()
        };
        assert_eq!(node_plan(&Container::default()), Ok(Preload::Add));
        assert_eq!(
            node_plan(&c(vec![var(
                NODE_OPTIONS,
                Some("--max-old-space-size=512")
            )])),
            Ok(Preload::Append {
                index: 0,
                original: Some("--max-old-space-size=512".into()),
                value: format!("--max-old-space-size=512 {NODE_REQUIRE}"),
            })
        );
        for empty in [None, Some(""), Some("  ")] {
            let Ok(Preload::Append { value, .. }) = node_plan(&c(vec![var(NODE_OPTIONS, empty)]))
            else {
                panic!("{empty:?}: appended");
            };
            assert_eq!(value.trim(), NODE_REQUIRE);
        }
        assert_eq!(
            node_plan(&c(vec![var(
                NODE_OPTIONS,
                Some(&format!("--enable-source-maps {NODE_REQUIRE}"))
            )])),
            Ok(Preload::Present)
        );
        // A hook of the app's own with a similar name is not ours.
        assert!(matches!(
            node_plan(&c(vec![var(
                NODE_OPTIONS,
                Some("--require=/app/tracecar.js")
            )])),
            Ok(Preload::Append { .. })
        ));
        let from = EnvVar {
            value_from: Some(EnvVarSource::default()),
            ..var(NODE_OPTIONS, None)
        };
        let err = node_plan(&c(vec![from])).unwrap_err();
        assert!(
            err.contains("NODE_OPTIONS") && err.contains("valueFrom"),
            "{err}"
        );
        let env_from = Container {
            env_from: Some(vec![EnvFromSource::default()]),
            ..Container::default()
        };
        assert!(node_plan(&env_from).is_err(), "envFrom may set it");
    }

    #[test]
    fn plans_follow_the_containers_own_ld_preload() {
        let c = |env: Vec<EnvVar>| Container {
            name: "app".into(),
            env: Some(env),
            ..Container::default()
        };
        assert_eq!(preload_plan(&Container::default()), Ok(Preload::Add));
        assert_eq!(
            preload_plan(&c(vec![
                var(LD_PRELOAD, Some("/first.so")),
                var("X", Some("1")),
                var(LD_PRELOAD, Some("/last.so")),
            ])),
            Ok(Preload::Append {
                index: 2,
                original: Some("/last.so".into()),
                value: format!("/last.so {PRELOAD_LIBRARY}"),
            }),
            "the last entry of a name is the one Kubernetes uses"
        );
        assert_eq!(
            preload_plan(&c(vec![var(LD_PRELOAD, None)])),
            Ok(Preload::Append {
                index: 0,
                original: None,
                value: PRELOAD_LIBRARY.into(),
            })
        );
        assert_eq!(
            preload_plan(&c(vec![var(
                LD_PRELOAD,
                Some(&format!("/a.so:{PRELOAD_LIBRARY}"))
            )])),
            Ok(Preload::Present)
        );
        let from = EnvVar {
            value_from: Some(EnvVarSource::default()),
            ..var(LD_PRELOAD, None)
        };
        assert!(preload_plan(&c(vec![from])).is_err());
        let env_from = Container {
            env_from: Some(vec![EnvFromSource::default()]),
            ..Container::default()
        };
        assert!(preload_plan(&env_from).is_err(), "envFrom may set it");
        let explicit = Container {
            env: Some(vec![var(LD_PRELOAD, Some(""))]),
            ..env_from
        };
        assert!(
            matches!(preload_plan(&explicit), Ok(Preload::Append { .. })),
            "an explicit entry wins over envFrom"
        );
        for path in ["/var/run/tracecar", "/var/run/tracecar/"] {
            let busy = Container {
                volume_mounts: Some(vec![VolumeMount {
                    name: "mine".into(),
                    mount_path: path.into(),
                    ..VolumeMount::default()
                }]),
                ..Container::default()
            };
            assert!(preload_plan(&busy).is_err(), "{path}");
        }
    }
}
