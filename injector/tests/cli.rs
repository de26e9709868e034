//! The real binary: `inject`/`--uninject` over YAML and JSON manifests, start-up errors
//! for invalid flags and variables, and `serve` shutting down cleanly on SIGTERM.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_tracecar-injector");

fn manifests() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/manifests")
}

/// Runs the binary with `stdin`, returning stdout, stderr and the exit code.
fn run(args: &[&str], stdin: &str, envs: &[(&str, &str)]) -> (String, String, Option<i32>) {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
        out.status.code(),
    )
}

fn yaml_docs(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn env<'a>(c: &'a Value, name: &str) -> Option<&'a str> {
    c["env"].as_array()?.iter().find(|e| e["name"] == name)?["value"].as_str()
}

#[test]
fn inject_then_uninject_yaml_gives_back_the_original() {
    let path = manifests().join("workloads.yaml");
    let original = std::fs::read_to_string(&path).unwrap();
    let (out, err, code) = run(&["inject", "-f", path.to_str().unwrap()], "", &[]);
    assert_eq!(code, Some(0), "{err}");
    let docs = yaml_docs(&out);
    let before = yaml_docs(&original);
    assert_eq!(docs.len(), before.len());

    let by_kind = |k: &str| docs.iter().find(|d| d["kind"] == k).unwrap();
    let tpl = &by_kind("Deployment")["spec"]["template"];
    assert_eq!(
        tpl["metadata"]["annotations"]["tracecar.dev/status"],
        "injected"
    );
    let init = tpl["spec"]["initContainers"].as_array().unwrap();
    assert_eq!(init[0]["name"], "tracecar-init");
    assert_eq!(
        env(&init[1], "OTEL_RESOURCE_ATTRIBUTES"),
        Some("k8s.deployment.name=web")
    );
    assert_eq!(env(&init[1], "OTEL_SERVICE_NAME"), Some("web"));

    let sts = &by_kind("StatefulSet")["spec"]["template"]["spec"];
    assert_eq!(sts["initContainers"][0]["name"], "tracecar-proxy");
    assert_eq!(sts["initContainers"][1]["name"], "init-perms");
    assert_eq!(
        env(&sts["containers"][0], "HTTP_PROXY"),
        Some("http://127.0.0.1:15140")
    );
    assert_eq!(
        env(&sts["initContainers"][0], "OTEL_RESOURCE_ATTRIBUTES"),
        Some("k8s.statefulset.name=db")
    );

    let cron = &by_kind("CronJob")["spec"]["jobTemplate"]["spec"]["template"];
    let proxy = &cron["spec"]["initContainers"][1];
    assert_eq!(
        env(proxy, "OTEL_RESOURCE_ATTRIBUTES"),
        Some("k8s.cronjob.name=report")
    );
    assert_eq!(env(proxy, "OTEL_TRACES_SAMPLER_ARG"), Some("0.1"));
    for (kind, attr) in [
        ("DaemonSet", "k8s.daemonset.name=agent"),
        ("ReplicaSet", "k8s.replicaset.name=rs"),
        ("Job", "k8s.job.name=migrate"),
    ] {
        let p = &by_kind(kind)["spec"]["template"]["spec"]["initContainers"][1];
        assert_eq!(env(p, "OTEL_RESOURCE_ATTRIBUTES"), Some(attr), "{kind}");
    }
    assert_eq!(
        by_kind("Pod")["metadata"]["annotations"]["tracecar.dev/status"],
        "injected"
    );
    // Other kinds pass through untouched.
    for kind in ["Service", "ConfigMap"] {
        let want = before.iter().find(|d| d["kind"] == kind).unwrap();
        assert_eq!(by_kind(kind), want);
    }

    // Injecting again changes nothing.
    let (again, _, code) = run(&["inject", "-f", "-"], &out, &[]);
    assert_eq!(code, Some(0));
    assert_eq!(yaml_docs(&again), docs);

    // Uninject gives back the original documents.
    let (back, err, code) = run(&["inject", "--uninject"], &out, &[]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(yaml_docs(&back), before);

    // The injected manifests are valid Kubernetes objects.
    if let Some(versions) = common::validate_versions() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("injected.yaml");
        std::fs::write(&file, &out).unwrap();
        common::validate_strict_docs(&[file], &versions, docs.len());
    }
}

#[test]
fn json_list_round_trip() {
    let path = manifests().join("list.json");
    let original: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let (out, err, code) = run(
        &[
            "inject",
            "-f",
            path.to_str().unwrap(),
            "--collector-tls-secret",
            "otel-tls",
        ],
        "",
        &[],
    );
    assert_eq!(code, Some(0), "{err}");
    let injected: Value = serde_json::from_str(&out).expect("JSON in, JSON out");
    let tpl = &injected["items"][0]["spec"]["template"];
    assert_eq!(tpl["spec"]["volumes"][0]["name"], "tracecar-otlp-tls");
    assert_eq!(tpl["spec"]["volumes"][0]["secret"]["optional"], true);
    assert_eq!(tpl["spec"]["initContainers"].as_array().unwrap().len(), 2);
    assert_eq!(
        env(
            &tpl["spec"]["initContainers"][1],
            "TRACECAR_EXPORT_REQUIRED"
        ),
        Some("false")
    );
    assert_eq!(tpl["metadata"]["annotations"]["x"], "y");
    assert_eq!(injected["items"][1], original["items"][1]);
    let (back, err, code) = run(&["inject", "--uninject", "-f", "-"], &out, &[]);
    assert_eq!(code, Some(0), "{err}");
    let back: Value = serde_json::from_str(&back).unwrap();
    assert_eq!(
        back, original,
        "explicit empty lists and maps survive the round trip"
    );
}

#[test]
fn tls_secret_in_container_mode_round_trip() {
    // A pod that already has env, volumes and mounts of its own: uninject must leave exactly them.
    let pod = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "p", "annotations": {"a": "b"}},
        "spec": {
            "containers": [{"name": "app", "image": "nginx",
                "env": [{"name": "X", "value": "1"}],
                "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
            "volumes": [{"name": "data", "emptyDir": {}}]
        }
    });
    let text = serde_json::to_string(&pod).unwrap();
    let (out, err, code) = run(
        &[
            "inject",
            "--sidecar-mode",
            "container",
            "--collector-tls-secret",
            "otel-tls",
        ],
        &text,
        &[],
    );
    assert_eq!(code, Some(0), "{err}");
    let injected: Value = serde_json::from_str(&out).unwrap();
    let proxy = &injected["spec"]["containers"][0];
    assert_eq!(proxy["name"], "tracecar-proxy");
    assert_eq!(env(proxy, "TRACECAR_EXPORT_REQUIRED"), Some("false"));
    assert_eq!(proxy["volumeMounts"][0]["name"], "tracecar-otlp-tls");
    assert_eq!(
        injected["spec"]["volumes"][1],
        serde_json::json!({"name": "tracecar-otlp-tls",
            "secret": {"secretName": "otel-tls", "optional": true}})
    );
    let (back, err, code) = run(&["inject", "--uninject"], &out, &[]);
    assert_eq!(code, Some(0), "{err}");
    let back: Value = serde_json::from_str(&back).unwrap();
    assert_eq!(back, pod);
}

#[test]
fn preload_wiring_round_trip_restores_ld_preload_byte_for_byte() {
    const LIB: &str = "/var/run/tracecar/lib/$PLATFORM/libtracecar_preload.so";
    // Every shape of LD_PRELOAD a container can have, in both sidecar modes.
    let pod = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "p"},
        "spec": {
            "containers": [
                {"name": "spaces", "image": "app",
                    "env": [{"name": "LD_PRELOAD", "value": " /a.so  $(EXTRA) "},
                            {"name": "X", "value": "1"}],
                    "volumeMounts": [{"name": "data", "mountPath": "/data"}]},
                {"name": "colons", "image": "app",
                    "env": [{"name": "LD_PRELOAD", "value": "/a.so:/b.so"}]},
                {"name": "no-value", "image": "app", "env": [{"name": "LD_PRELOAD"}]},
                {"name": "bare", "image": "app"},
                {"name": "from", "image": "app", "env": [{"name": "LD_PRELOAD",
                    "valueFrom": {"configMapKeyRef": {"name": "c", "key": "k"}}}]},
                {"name": "env-from", "image": "app",
                    "envFrom": [{"configMapRef": {"name": "settings"}}]}
            ],
            "volumes": [{"name": "data", "emptyDir": {}}]
        }
    });
    let text = serde_json::to_string(&pod).unwrap();
    for mode in ["native", "container"] {
        let (out, err, code) = run(&["inject", "--sidecar-mode", mode], &text, &[]);
        assert_eq!(code, Some(0), "{err}");
        let injected: Value = serde_json::from_str(&out).unwrap();
        let c = |name: &str| {
            injected["spec"]["containers"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["name"] == name)
                .unwrap()
                .clone()
        };
        assert_eq!(
            env(&c("spaces"), "LD_PRELOAD"),
            Some(format!(" /a.so  $(EXTRA) {LIB}").as_str())
        );
        assert_eq!(
            env(&c("colons"), "LD_PRELOAD"),
            Some(format!("/a.so:/b.so:{LIB}").as_str())
        );
        assert_eq!(env(&c("no-value"), "LD_PRELOAD"), Some(LIB));
        assert_eq!(env(&c("bare"), "LD_PRELOAD"), Some(LIB));
        for n in ["spaces", "colons", "no-value", "bare"] {
            assert_eq!(
                env(&c(n), "TRACECAR_CAUSAL_TABLE"),
                Some("/var/run/tracecar/causal"),
                "{n}"
            );
        }
        assert_eq!(
            c("from"),
            pod["spec"]["containers"][4],
            "valueFrom: untouched"
        );
        assert_eq!(
            c("env-from"),
            pod["spec"]["containers"][5],
            "envFrom: untouched"
        );
        assert!(
            err.contains("container \"from\"") && err.contains("container \"env-from\""),
            "both are reported: {err}"
        );
        let (back, err, code) = run(&["inject", "--uninject"], &out, &[]);
        assert_eq!(code, Some(0), "{err}");
        let back: Value = serde_json::from_str(&back).unwrap();
        assert_eq!(back, pod, "{mode}: uninject gives back the pod exactly");
    }
}

#[test]
fn invalid_flags_and_variables_stop_start_up_with_one_line() {
    let (_, err, code) = run(&["inject", "--capture", "ebpf"], "", &[]);
    assert_eq!(code, Some(2));
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("--capture")
            && err.contains("TRACECAR_CAPTURE")
            && err.contains("\"ebpf\"")
            && err.contains("iptables, http-proxy"),
        "{err}"
    );

    let (_, err, code) = run(&["inject"], "", &[("TRACECAR_SAMPLING_RATIO", "2")]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("TRACECAR_SAMPLING_RATIO") && err.contains("\"2\"") && err.contains("0 to 1"),
        "{err}"
    );

    let (_, err, code) = run(
        &[
            "serve",
            "--tls-cert",
            "x",
            "--tls-key",
            "y",
            "--listen",
            "nowhere",
        ],
        "",
        &[],
    );
    assert_eq!(code, Some(2));
    assert!(
        err.contains("--listen") && err.contains("TRACECAR_INJECTOR_LISTEN"),
        "{err}"
    );

    let (_, err, code) = run(&["inject", "--proxy-memory-request", "128Mi"], "", &[]);
    assert_eq!(code, Some(2), "request above the default limit: {err}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn serve_answers_and_stops_on_sigterm() {
    let pki = common::Pki::new();
    let leaf = pki.leaf("bin");
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = common::write_pair(dir.path(), &leaf);
    let (port, admin) = (free_port(), free_port());
    let mut child = tokio::process::Command::new(BIN)
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--admin-listen",
            &format!("127.0.0.1:{admin}"),
        ])
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .args(["--worker-threads", "1"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let admin_addr = format!("127.0.0.1:{admin}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(admin_addr).await.is_err() {
        assert!(Instant::now() < deadline, "server did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(common::get(admin_addr, "/ready").await.0, 200);
    let pod = serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "app", "image": "nginx"}]}});
    let r = common::Client::new(&pki)
        .post(
            format!("127.0.0.1:{port}").parse().unwrap(),
            "/inject",
            serde_json::to_vec(&common::review(&pod, "u")).unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);

    let pid = child.id().unwrap().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("exits after SIGTERM")
        .unwrap();
    assert!(status.success(), "{status:?}");
    let mut logs = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut child.stderr.take().unwrap(), &mut logs)
        .await
        .unwrap();
    // JSON log lines: the decision and the shutdown.
    let lines: Vec<Value> = logs
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    assert!(
        lines.iter().any(|l| l["fields"]["reason"] == "injected"),
        "{logs}"
    );
    assert!(
        lines.iter().any(|l| l["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("shutting down"))),
        "{logs}"
    );
}
