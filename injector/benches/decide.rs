//! Micro-benchmark of the pure decision (and of decode + decide + encode of one review).
//! `cargo bench -p tracecar-injector --bench decide`

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use k8s_openapi::api::core::v1::Pod;
use tracecar_injector::metrics::Metrics;
use tracecar_injector::server::{admit, State};
use tracecar_injector::{decide, Defaults};

fn fixture(name: &str) -> serde_json::Value {
    let path = format!("{}/tests/fixtures/{name}.yaml", env!("CARGO_MANIFEST_DIR"));
    serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn review(pod: &serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": "u", "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop", "operation": "CREATE", "userInfo": {}, "object": pod}
    }))
    .unwrap()
}

fn bench(c: &mut Criterion) {
    let defaults = Defaults::default();
    for name in ["plain", "all-annotations", "init-containers"] {
        let json = fixture(name);
        let pod: Pod = serde_json::from_value(json.clone()).unwrap();
        c.bench_function(&format!("decide/{name}"), |b| {
            b.iter(|| black_box(decide(black_box(&pod), &defaults)))
        });
        let state = State::new(defaults.clone(), Arc::new(Metrics::new()));
        let body = review(&json);
        c.bench_function(&format!("admit_json/{name}"), |b| {
            b.iter(|| black_box(admit(&state, &state.defaults, black_box(&body)).unwrap()))
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
