//! Which workload a pod belongs to, and the service name the proxy reports.
//!
//! At admission a controller's pod has no name yet, only `generateName` and
//! `ownerReferences`; the workload is read from those: a ReplicaSet `web-7d9f8c6b5` whose
//! suffix is the pod's `pod-template-hash` belongs to Deployment `web`; a Job
//! `backup-28012345` (suffix = scheduled minute) belongs to CronJob `backup`.

use k8s_openapi::api::core::v1::Pod;

/// The kinds that get a `k8s.<kind>.name` resource attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Deployment,
    ReplicaSet,
    StatefulSet,
    DaemonSet,
    Job,
    CronJob,
}

impl Kind {
    /// The OpenTelemetry resource attribute key for this kind's name.
    pub fn attribute(self) -> &'static str {
        match self {
            Kind::Deployment => "k8s.deployment.name",
            Kind::ReplicaSet => "k8s.replicaset.name",
            Kind::StatefulSet => "k8s.statefulset.name",
            Kind::DaemonSet => "k8s.daemonset.name",
            Kind::Job => "k8s.job.name",
            Kind::CronJob => "k8s.cronjob.name",
        }
    }

    /// The kind named in an apps/v1 or batch/v1 manifest, if it is a workload kind.
    pub fn from_kind(kind: &str) -> Option<Kind> {
        Some(match kind {
            "Deployment" => Kind::Deployment,
            "ReplicaSet" => Kind::ReplicaSet,
            "StatefulSet" => Kind::StatefulSet,
            "DaemonSet" => Kind::DaemonSet,
            "Job" => Kind::Job,
            "CronJob" => Kind::CronJob,
            _ => return None,
        })
    }
}

/// A pod's owning workload. `kind` is `None` for owners of other kinds (the name is
/// still used as the service name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub kind: Option<Kind>,
    pub name: String,
}

/// Derives the workload from the pod's controller owner reference, else from `generateName`.
pub fn of_pod(pod: &Pod) -> Option<Workload> {
    let meta = &pod.metadata;
    let hash = meta
        .labels
        .as_ref()
        .and_then(|l| l.get("pod-template-hash"))
        .map(String::as_str);
    if let Some(owners) = meta.owner_references.as_ref() {
        let owner = owners
            .iter()
            .find(|o| o.controller == Some(true))
            .or_else(|| owners.first());
        if let Some(o) = owner {
            return Some(match o.kind.as_str() {
                "ReplicaSet" => replica_set(&o.name, hash),
                "Job" => job(&o.name),
                k => Workload {
                    kind: Kind::from_kind(k),
                    name: o.name.clone(),
                },
            });
        }
    }
    let base = meta.generate_name.as_deref()?.trim_end_matches('-');
    if base.is_empty() {
        return None;
    }
    Some(match hash {
        Some(_) => match replica_set(base, hash) {
            w @ Workload {
                kind: Some(Kind::Deployment),
                ..
            } => w,
            _ => Workload {
                kind: None,
                name: base.to_owned(),
            },
        },
        None => Workload {
            kind: None,
            name: base.to_owned(),
        },
    })
}

fn replica_set(name: &str, hash: Option<&str>) -> Workload {
    if let Some(h) = hash.filter(|h| !h.is_empty()) {
        if let Some(base) = name.strip_suffix(h).and_then(|b| b.strip_suffix('-')) {
            if !base.is_empty() {
                return Workload {
                    kind: Some(Kind::Deployment),
                    name: base.to_owned(),
                };
            }
        }
    }
    Workload {
        kind: Some(Kind::ReplicaSet),
        name: name.to_owned(),
    }
}

/// A Job made by a CronJob is named `<cronjob>-<scheduled time in minutes>` (8+ digits).
fn job(name: &str) -> Workload {
    if let Some((base, suffix)) = name.rsplit_once('-') {
        if !base.is_empty() && suffix.len() >= 8 && suffix.bytes().all(|b| b.is_ascii_digit()) {
            return Workload {
                kind: Some(Kind::CronJob),
                name: base.to_owned(),
            };
        }
    }
    Workload {
        kind: Some(Kind::Job),
        name: name.to_owned(),
    }
}

/// The service name: annotation, else label `app.kubernetes.io/name`, else label `app`,
/// else the workload name, else the pod name (or `generateName` without its dash).
pub fn service_name(
    pod: &Pod,
    from_annotation: Option<&str>,
    workload: Option<&Workload>,
) -> String {
    if let Some(s) = from_annotation {
        return s.to_owned();
    }
    let labels = pod.metadata.labels.as_ref();
    for key in ["app.kubernetes.io/name", "app"] {
        if let Some(v) = labels.and_then(|l| l.get(key)).filter(|v| !v.is_empty()) {
            return v.clone();
        }
    }
    if let Some(w) = workload {
        return w.name.clone();
    }
    if let Some(n) = pod.metadata.name.as_deref().filter(|n| !n.is_empty()) {
        return n.to_owned();
    }
    match pod
        .metadata
        .generate_name
        .as_deref()
        .map(|g| g.trim_end_matches('-'))
    {
        Some(g) if !g.is_empty() => g.to_owned(),
        _ => "unknown_service".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    fn pod(owner: Option<(&str, &str)>, hash: Option<&str>, generate: Option<&str>) -> Pod {
        let mut p = Pod::default();
        if let Some((kind, name)) = owner {
            p.metadata.owner_references = Some(vec![OwnerReference {
                api_version: "apps/v1".into(),
                kind: kind.into(),
                name: name.into(),
                uid: "u".into(),
                controller: Some(true),
                block_owner_deletion: None,
            }]);
        }
        if let Some(h) = hash {
            p.metadata.labels = Some([("pod-template-hash".to_owned(), h.to_owned())].into());
        }
        p.metadata.generate_name = generate.map(Into::into);
        p
    }

    fn w(kind: Kind, name: &str) -> Option<Workload> {
        Some(Workload {
            kind: Some(kind),
            name: name.into(),
        })
    }

    #[test]
    fn owners() {
        assert_eq!(
            of_pod(&pod(
                Some(("ReplicaSet", "web-7d9f8c6b5")),
                Some("7d9f8c6b5"),
                None
            )),
            w(Kind::Deployment, "web")
        );
        assert_eq!(
            of_pod(&pod(Some(("ReplicaSet", "web-7d9f8c6b5")), None, None)),
            w(Kind::ReplicaSet, "web-7d9f8c6b5")
        );
        assert_eq!(
            of_pod(&pod(Some(("StatefulSet", "db")), None, None)),
            w(Kind::StatefulSet, "db")
        );
        assert_eq!(
            of_pod(&pod(Some(("DaemonSet", "agent")), None, None)),
            w(Kind::DaemonSet, "agent")
        );
        assert_eq!(
            of_pod(&pod(Some(("Job", "backup-28012345")), None, None)),
            w(Kind::CronJob, "backup")
        );
        assert_eq!(
            of_pod(&pod(Some(("Job", "migrate-v2")), None, None)),
            w(Kind::Job, "migrate-v2")
        );
        assert_eq!(
            of_pod(&pod(Some(("Rollout", "canary")), None, None)),
            Some(Workload {
                kind: None,
                name: "canary".into()
            })
        );
        assert_eq!(
            of_pod(&pod(None, Some("abc12"), Some("api-abc12-"))),
            w(Kind::Deployment, "api")
        );
        assert_eq!(
            of_pod(&pod(None, None, Some("batch-"))),
            Some(Workload {
                kind: None,
                name: "batch".into()
            })
        );
        assert_eq!(of_pod(&pod(None, None, None)), None);
    }

    #[test]
    fn service_name_order() {
        let mut p = pod(Some(("StatefulSet", "db")), None, None);
        let wl = of_pod(&p);
        assert_eq!(service_name(&p, None, wl.as_ref()), "db");
        p.metadata.labels = Some([("app".to_owned(), "a".to_owned())].into());
        assert_eq!(service_name(&p, None, wl.as_ref()), "a");
        p.metadata
            .labels
            .as_mut()
            .unwrap()
            .insert("app.kubernetes.io/name".into(), "b".into());
        assert_eq!(service_name(&p, None, wl.as_ref()), "b");
        assert_eq!(service_name(&p, Some("c"), wl.as_ref()), "c");
        let mut q = Pod::default();
        q.metadata.name = Some("solo".into());
        assert_eq!(service_name(&q, None, None), "solo");
    }
}
