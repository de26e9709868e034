//! The decision: a pure function from a pod and the injector's defaults to an optional
//! patch, the warnings to return, and the reason (logged and counted by the callers).
//! The webhook and `inject` both call [`decide`]; nothing here does I/O.

use k8s_openapi::api::core::v1::Pod;

use crate::annotations::{self as ann, Warning};
use crate::config::Defaults;
use crate::patch::{self, Inputs};
use crate::workload::{self, Workload};

/// Label value that marks the injector's own pods.
pub const INJECTOR_APP: &str = "tracecar-injector";

/// Why a pod was or was not injected; the `reason` label of the admissions counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    Injected,
    AlreadyInjected,
    DisabledByAnnotation,
    NotOptedIn,
    HostNetwork,
    InjectorPod,
    NotPodCreate,
    InvalidObject,
}

impl Reason {
    pub const ALL: [Reason; 8] = [
        Reason::Injected,
        Reason::AlreadyInjected,
        Reason::DisabledByAnnotation,
        Reason::NotOptedIn,
        Reason::HostNetwork,
        Reason::InjectorPod,
        Reason::NotPodCreate,
        Reason::InvalidObject,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Injected => "injected",
            Reason::AlreadyInjected => "already-injected",
            Reason::DisabledByAnnotation => "disabled-by-annotation",
            Reason::NotOptedIn => "not-opted-in",
            Reason::HostNetwork => "host-network",
            Reason::InjectorPod => "injector-pod",
            Reason::NotPodCreate => "not-pod-create",
            Reason::InvalidObject => "invalid-object",
        }
    }
}

/// The outcome for one pod.
#[derive(Debug, Clone)]
pub struct Decision {
    /// The JSON Patch to return; `None` when the pod is left alone.
    pub patch: Option<json_patch::Patch>,
    /// Invalid annotation values that fell back to the default, and app containers that
    /// could not get the preload library.
    pub warnings: Vec<Warning>,
    pub reason: Reason,
}

impl Decision {
    fn skip(reason: Reason, warnings: Vec<Warning>) -> Self {
        Decision {
            patch: None,
            warnings,
            reason,
        }
    }
}

/// Decides for a pod being created. See [`decide_with`] to name the workload explicitly.
pub fn decide(pod: &Pod, defaults: &Defaults) -> Decision {
    decide_with(pod, defaults, None)
}

/// Like [`decide`], with the workload known from outside the pod (manual injection of a
/// Deployment's template: the template has no owner references).
pub fn decide_with(pod: &Pod, defaults: &Defaults, workload: Option<Workload>) -> Decision {
    let meta = &pod.metadata;
    let labels = meta.labels.as_ref();
    let annotations = meta.annotations.as_ref();

    if labels
        .and_then(|l| l.get("app.kubernetes.io/name"))
        .map(String::as_str)
        == Some(INJECTOR_APP)
    {
        return Decision::skip(Reason::InjectorPod, Vec::new());
    }
    if annotations
        .and_then(|a| a.get(ann::STATUS))
        .map(String::as_str)
        == Some(ann::STATUS_INJECTED)
    {
        return Decision::skip(Reason::AlreadyInjected, Vec::new());
    }
    let Some(spec) = pod.spec.as_ref().filter(|s| !s.containers.is_empty()) else {
        return Decision::skip(Reason::InvalidObject, Vec::new());
    };
    if spec.host_network == Some(true) {
        return Decision::skip(Reason::HostNetwork, Vec::new());
    }

    let mut warnings = Vec::new();
    let wanted = match annotations.and_then(|a| a.get(ann::INJECT)) {
        None => defaults.inject_by_default,
        Some(v) => match ann::parse_inject(v) {
            Ok(b) => b,
            Err(accepted) => {
                let default = if defaults.inject_by_default {
                    "enabled"
                } else {
                    "disabled"
                };
                warnings.push(ann::invalid(ann::INJECT, v, accepted, default));
                defaults.inject_by_default
            }
        },
    };
    if !wanted {
        let explicit = annotations
            .and_then(|a| a.get(ann::INJECT))
            .map(String::as_str)
            == Some("disabled");
        let reason = if explicit {
            Reason::DisabledByAnnotation
        } else {
            Reason::NotOptedIn
        };
        return Decision::skip(reason, warnings);
    }

    let (settings, more) = ann::resolve(defaults, annotations);
    warnings.extend(more);
    let workload = workload.or_else(|| workload::of_pod(pod));
    let service_name =
        workload::service_name(pod, settings.service_name.as_deref(), workload.as_ref());
    let (patch, more) = patch::build(
        pod,
        &Inputs {
            defaults,
            settings: &settings,
            workload: workload.as_ref(),
            service_name: &service_name,
        },
    );
    warnings.extend(more);
    Decision {
        patch: Some(patch),
        warnings,
        reason: Reason::Injected,
    }
}
