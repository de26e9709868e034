//! The injector and the proxy agree: what the injector writes into a pod is accepted by the
//! proxy binary it starts (init flags, run environment, the postStart readiness hook).

use std::process::Command;

use tracecar_tests::{built_bin, free_port, proxy_bin, ProxyProcess};

fn inject(pod: &serde_json::Value, flags: &[&str]) -> serde_json::Value {
    let bin = built_bin("debug", "tracecar-injector");
    let dir = std::env::temp_dir().join(format!("tracecar-contract-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("pod.json");
    std::fs::write(&file, pod.to_string()).unwrap();
    let out = Command::new(bin)
        .arg("inject")
        .arg("-f")
        .arg(&file)
        .args(flags)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("injected pod as JSON")
}

fn container<'a>(list: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    list.as_array()
        .and_then(|l| l.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no container {name} in {list}"))
}

fn pod() -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web", "namespace": "shop", "annotations": {
            "tracecar.dev/skip-outbound-ports": "5432,6379,9000-9010",
            "tracecar.dev/skip-outbound-cidrs": "10.0.0.0/8,fd00::/8",
            "tracecar.dev/skip-inbound-ports": "22",
            "tracecar.dev/sampling-ratio": "0.25",
            "tracecar.dev/propagators": "tracecontext,baggage,b3,jaeger",
            "tracecar.dev/correlation": "off",
            "tracecar.dev/log-level": "debug"
        }},
        "spec": {"containers": [{"name": "app", "image": "nginx"}]}
    })
}

#[test]
fn init_container_flags_are_accepted_by_tracecar_proxy_init() {
    let injected = inject(&pod(), &[]);
    let init = container(&injected["spec"]["initContainers"], "tracecar-init");
    let cmd: Vec<String> = serde_json::from_value(init["command"].clone()).unwrap();
    assert_eq!(&cmd[..2], ["tracecar-proxy", "init"]);
    let out = Command::new(proxy_bin())
        .args(&cmd[1..])
        .arg("--dry-run")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "init rejected the injector's flags: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rules = String::from_utf8_lossy(&out.stdout);
    for expected in [
        "5432",
        "6379",
        "9000:9010",
        "10.0.0.0/8",
        "TRACECAR_OUTBOUND_REDIRECT",
    ] {
        assert!(
            rules.contains(expected),
            "{expected} missing from:\n{rules}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_environment_and_ready_hook_work_with_the_proxy() {
    let injected = inject(&pod(), &["--sidecar-mode", "container"]);
    let proxy = container(&injected["spec"]["containers"], "tracecar-proxy");
    // Plain values as the kubelet would set them; downward-API values stand in for the kubelet.
    let mut env: Vec<(String, String)> = proxy["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let name = e["name"].as_str().unwrap().to_string();
            let value = match e["value"].as_str() {
                Some(v) => v.to_string(),
                None => format!(
                    "from-{}",
                    e["valueFrom"]["fieldRef"]["fieldPath"]
                        .as_str()
                        .unwrap_or("?")
                ),
            };
            (name, value)
        })
        .collect();
    let sink = tracecar_tests::sink::Sink::start().await;
    env.push(("OTEL_EXPORTER_OTLP_ENDPOINT".into(), sink.endpoint()));
    // The annotations reach the proxy as the variables it reads (a missing one fails here).
    let var = |name: &str| {
        env.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("the injector set no {name}"))
    };
    assert_eq!(var("OTEL_TRACES_SAMPLER_ARG"), "0.25");
    assert_eq!(var("TRACECAR_CORRELATION"), "off");
    assert_eq!(var("TRACECAR_LOG"), "debug");
    // ...and the proxy starts with them: every value passes its validation.
    let running = ProxyProcess::spawn(&env);
    assert!(
        running.stderr().contains("\"level\":\"INFO\""),
        "JSON logs on stderr"
    );

    // The postStart hook of container mode.
    let hook: Vec<String> =
        serde_json::from_value(proxy["lifecycle"]["postStart"]["exec"]["command"].clone()).unwrap();
    assert_eq!(&hook[..2], ["tracecar-proxy", "wait-ready"]);
    let ok = Command::new(proxy_bin())
        .args(&hook[1..])
        .env("TRACECAR_ADMIN_LISTEN", running.admin.to_string())
        .status()
        .unwrap();
    assert!(ok.success(), "wait-ready against a ready proxy");
    let not_running = Command::new(proxy_bin())
        .args([
            "wait-ready",
            "--timeout",
            "1s",
            "--admin",
            &format!("127.0.0.1:{}", free_port()),
        ])
        .status()
        .unwrap();
    assert!(
        !not_running.success(),
        "wait-ready fails when nothing is ready"
    );
}

/// The README's first command: the demo prints connected traces of uninstrumented services.
#[test]
fn demo_prints_connected_traces() {
    let out = Command::new(proxy_bin())
        .args(["demo", "--requests", "2"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Two checkouts: two traces of five spans across both services.
    assert_eq!(stdout.matches("5 spans").count(), 2, "{stdout}");
    assert!(stdout.contains("shop SERVER GET /checkout/1"), "{stdout}");
    assert!(
        stdout.contains("└─ inventory SERVER GET /items/1"),
        "{stdout}"
    );
    assert_eq!(
        stdout.matches("(linked by correlation: sole)").count(),
        4,
        "{stdout}"
    );
    assert!(
        stdout.contains("error.type=503"),
        "the failing checkout shows why: {stdout}"
    );
}
