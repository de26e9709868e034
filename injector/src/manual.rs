//! `tracecar-injector inject`: manual injection of manifests, through the same
//! [`crate::decide`] as the webhook.
//!
//! Input is YAML (multi-document) or JSON (one or more values, `kind: List` too). Pods are
//! injected directly; Deployment, StatefulSet, DaemonSet, ReplicaSet, Job and CronJob have
//! their pod template injected (the status annotations land on the template); every other
//! kind passes through. `--uninject` removes what injection recorded that it added.

use k8s_openapi::api::core::v1::Pod;
use serde::Deserialize;
use serde_json::Value;

use crate::config::Defaults;
use crate::decide::{decide_with, Reason};
use crate::patch;
use crate::workload::{Kind, Workload};

#[derive(Debug, thiserror::Error)]
pub enum ManualError {
    #[error("document {index}: YAML: {source}")]
    Yaml {
        index: usize,
        source: serde_yaml::Error,
    },
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("{object}: the pod template does not decode: {source}")]
    Template {
        object: String,
        source: serde_json::Error,
    },
    #[error("{object}: applying the patch: {source}")]
    Patch {
        object: String,
        source: json_patch::PatchError,
    },
    #[error("{object}: {source}")]
    Uninject {
        object: String,
        source: patch::UninjectError,
    },
}

/// The rewritten manifests, and the warnings to print.
#[derive(Debug)]
pub struct Output {
    pub text: String,
    pub warnings: Vec<String>,
}

/// Injects (or uninjects) every document of `input`; YAML in gives YAML out, JSON gives JSON.
pub fn run(input: &str, defaults: &Defaults, uninject: bool) -> Result<Output, ManualError> {
    let is_json = input.trim_start().starts_with(['{', '[']);
    let mut docs: Vec<Value> = Vec::new();
    if is_json {
        for v in serde_json::Deserializer::from_str(input).into_iter::<Value>() {
            docs.push(v?);
        }
    } else {
        for (index, d) in serde_yaml::Deserializer::from_str(input).enumerate() {
            let v = Value::deserialize(d).map_err(|source| ManualError::Yaml { index, source })?;
            if !v.is_null() {
                docs.push(v);
            }
        }
    }
    let mut warnings = Vec::new();
    for d in &mut docs {
        process(d, defaults, uninject, &mut warnings)?;
    }
    let mut text = String::new();
    if is_json {
        for d in &docs {
            text.push_str(&serde_json::to_string_pretty(d)?);
            text.push('\n');
        }
    } else {
        for (i, d) in docs.iter().enumerate() {
            if i > 0 {
                text.push_str("---\n");
            }
            let y = serde_yaml::to_string(d)
                .map_err(|source| ManualError::Yaml { index: i, source })?;
            text.push_str(&y);
        }
    }
    Ok(Output { text, warnings })
}

fn describe(obj: &Value) -> String {
    let kind = obj.get("kind").and_then(Value::as_str).unwrap_or("?");
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("?");
    format!("{kind}/{name}")
}

/// Processes one object in place.
fn process(
    obj: &mut Value,
    defaults: &Defaults,
    uninject: bool,
    warnings: &mut Vec<String>,
) -> Result<(), ManualError> {
    let kind = obj
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let object = describe(obj);
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let (pointer, workload) = match kind.as_str() {
        "List" => {
            if let Some(items) = obj.get_mut("items").and_then(Value::as_array_mut) {
                for item in items {
                    process(item, defaults, uninject, warnings)?;
                }
            }
            return Ok(());
        }
        "Pod" => ("", None),
        "CronJob" => ("/spec/jobTemplate/spec/template", Some(Kind::CronJob)),
        k => match Kind::from_kind(k) {
            Some(kind) => ("/spec/template", Some(kind)),
            None => return Ok(()),
        },
    };
    let Some(target) = (if pointer.is_empty() {
        Some(obj)
    } else {
        obj.pointer_mut(pointer)
    }) else {
        return Ok(());
    };
    if uninject {
        patch::uninject(target).map_err(|source| ManualError::Uninject { object, source })?;
        // Templates often have no metadata; injection created it (see below).
        if let Some(t) = target.as_object_mut() {
            if t.get("metadata")
                .and_then(Value::as_object)
                .is_some_and(|m| m.is_empty())
            {
                t.remove("metadata");
            }
        }
        return Ok(());
    }
    // A pod always has metadata at admission; a template may not.
    if let Some(t) = target.as_object_mut() {
        t.entry("metadata")
            .or_insert_with(|| Value::Object(Default::default()));
    }
    let pod: Pod =
        serde_json::from_value(target.clone()).map_err(|source| ManualError::Template {
            object: object.clone(),
            source,
        })?;
    let workload = workload.filter(|_| !name.is_empty()).map(|kind| Workload {
        kind: Some(kind),
        name,
    });
    let decision = decide_with(&pod, defaults, workload);
    warnings.extend(
        decision
            .warnings
            .iter()
            .map(|w| format!("{object}: {}", w.message)),
    );
    match decision.patch {
        Some(p) => {
            json_patch::patch(target, &p.0).map_err(|source| ManualError::Patch { object, source })
        }
        None => {
            if let Some(t) = target.as_object_mut() {
                if t.get("metadata")
                    .and_then(Value::as_object)
                    .is_some_and(|m| m.is_empty())
                {
                    t.remove("metadata");
                }
            }
            if decision.reason != Reason::AlreadyInjected {
                warnings.push(format!(
                    "{object}: not injected ({})",
                    decision.reason.as_str()
                ));
            }
            Ok(())
        }
    }
}
