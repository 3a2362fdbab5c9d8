//! The pods of this node: their lanes, and where kubelet puts their pod-level cgroups.
//!
//! The datapath finds a caller's pod from the calling task's cgroup, so every local pod's
//! pod-level cgroup is registered with the pod's lane; containers are child cgroups and inherit
//! it, which is why a restarted container keeps its lane. Which of the candidate directories
//! exists is I/O and belongs to the agent; this module only names them.
//!
//! Kubelet's layouts (cgroup v2), for pod UID `1234-ab`:
//!
//! ```text
//! systemd driver   kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234_ab.slice
//!                  kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1234_ab.slice
//!                  kubepods.slice/kubepods-pod1234_ab.slice                  (Guaranteed)
//! cgroupfs driver  kubepods/burstable/pod1234-ab
//!                  kubepods/besteffort/pod1234-ab
//!                  kubepods/pod1234-ab                                        (Guaranteed)
//! ```
//!
//! systemd unit names use `-` as the hierarchy separator, hence the UID's dashes become
//! underscores there.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
};

use tagger_common::{BASE_LANE, PodEntry};

use super::{ObjectRef, WarningKind, Warnings, api::Pod};
use crate::{
    cgroup::CgroupRef,
    model::lane::{LaneOf, lane_of},
};

/// A pod's QoS class (`status.qosClass`), which decides its cgroup's parent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum QosClass {
    /// Requests equal limits for every container: directly under `kubepods`.
    Guaranteed,
    /// Under `kubepods/burstable`.
    Burstable,
    /// Under `kubepods/besteffort`.
    BestEffort,
    /// Not reported (yet) or not understood: every layout is tried.
    Unknown,
}

impl QosClass {
    /// From `status.qosClass`.
    #[must_use]
    pub fn from_status(qos: Option<&str>) -> Self {
        match qos {
            Some("Guaranteed") => QosClass::Guaranteed,
            Some("Burstable") => QosClass::Burstable,
            Some("BestEffort") => QosClass::BestEffort,
            _ => QosClass::Unknown,
        }
    }

    /// The QoS part of kubelet's cgroup names; `None` for Guaranteed (no QoS level).
    const fn dir(self) -> Option<&'static str> {
        match self {
            QosClass::Burstable => Some("burstable"),
            QosClass::BestEffort => Some("besteffort"),
            QosClass::Guaranteed | QosClass::Unknown => None,
        }
    }
}

/// A pod running on this node, as the agent's pod watch sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalPod {
    /// `metadata.uid`.
    pub uid: String,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// QoS class.
    pub qos: QosClass,
    /// The pod's own addresses (`status.podIPs`, at most [`MAX_POD_IPS`]); empty for pods on
    /// the host network, whose addresses are the node's.
    pub ips: Vec<IpAddr>,
}

/// Addresses kept per pod: one per family (dual stack); more are ignored.
pub const MAX_POD_IPS: usize = 2;

impl LocalPod {
    /// The fields the model needs from a Pod; `None` without a UID or name (a pod the API
    /// server has not created yet cannot have a cgroup).
    #[must_use]
    pub fn from_pod(pod: &Pod) -> Option<Self> {
        let object = ObjectRef::of(&pod.metadata)?;
        Some(Self {
            uid: pod.metadata.uid.clone()?,
            namespace: object.namespace,
            name: object.name,
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            qos: QosClass::from_status(pod.status.as_ref().and_then(|s| s.qos_class.as_deref())),
            ips: pod_ips(pod),
        })
    }
}

/// A pod's own addresses: `status.podIPs` (or `status.podIP`), unparsable ones skipped, none
/// for a pod on the host network.
fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    if pod.spec.as_ref().and_then(|s| s.host_network).unwrap_or(false) {
        return Vec::new();
    }
    let Some(status) = pod.status.as_ref() else { return Vec::new() };
    let listed = status.pod_ips.iter().flatten().map(|p| p.ip.as_str());
    let mut ips: Vec<IpAddr> = Vec::new();
    for ip in listed.chain(status.pod_ip.as_deref()).filter_map(|s| s.parse().ok()) {
        if !ips.contains(&ip) && ips.len() < MAX_POD_IPS {
            ips.push(ip);
        }
    }
    ips
}

/// A local pod with its lane decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredPod {
    /// `metadata.uid`.
    pub uid: String,
    /// The pod.
    pub pod: ObjectRef,
    /// QoS class (where to look for its cgroup).
    pub qos: QosClass,
    /// Lane id.
    pub lane: u32,
    /// Lane name; `None` for base (including pods whose label was invalid).
    pub lane_name: Option<String>,
    /// The pod's addresses.
    pub ips: Vec<IpAddr>,
}

/// The lanes of the local pods.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredPods {
    /// By UID.
    pub pods: BTreeMap<String, DesiredPod>,
    /// Invalid lane labels and UIDs.
    pub warnings: Warnings,
}

/// The lane of every local pod. Pods with a UID that cannot name a cgroup are left out (and
/// counted); a UID listed twice keeps its first entry.
#[must_use]
pub fn desired_pods<'a>(pods: impl IntoIterator<Item = &'a LocalPod>, lane_keys: &[String]) -> DesiredPods {
    let mut out = DesiredPods::default();
    for pod in pods {
        let object = ObjectRef::new(pod.namespace.clone(), pod.name.clone());
        if !is_valid_uid(&pod.uid) {
            out.warnings.add(WarningKind::InvalidPodUid, format_args!("pod {object}: UID {:?}", pod.uid));
            continue;
        }
        if out.pods.contains_key(&pod.uid) {
            continue;
        }
        let (lane, lane_name) = match lane_of(&pod.labels, lane_keys) {
            LaneOf::Base => (BASE_LANE, None),
            LaneOf::Lane(name) => (tagger_common::lane_id(&name), Some(name)),
            invalid @ LaneOf::Invalid { .. } => {
                if let Some(w) = invalid.warning(&object) {
                    out.warnings.add(WarningKind::InvalidLaneLabel, w);
                }
                (BASE_LANE, None)
            }
        };
        out.pods.insert(
            pod.uid.clone(),
            DesiredPod {
                uid: pod.uid.clone(),
                pod: object,
                qos: pod.qos,
                lane,
                lane_name,
                ips: pod.ips.clone(),
            },
        );
    }
    out
}

/// The pods map's desired contents: each pod whose cgroup `cgroup_of` finds, keyed by cgroup
/// id, with its lane and the cgroup's level. Returns the pods whose cgroup was not found (the
/// agent retries them: kubelet creates the cgroup shortly after the pod object).
pub fn pod_entries(
    pods: &DesiredPods,
    mut cgroup_of: impl FnMut(&DesiredPod) -> Option<CgroupRef>,
) -> (BTreeMap<u64, PodEntry>, Vec<&DesiredPod>) {
    let mut entries = BTreeMap::new();
    let mut pending = Vec::new();
    for pod in pods.pods.values() {
        match cgroup_of(pod) {
            Some(cgroup) => {
                entries.insert(cgroup.id, PodEntry { lane: pod.lane, level: cgroup.level });
            }
            None => pending.push(pod),
        }
    }
    (entries, pending)
}

/// The directories under `root` where kubelet may have put the pod-level cgroup of pod `uid`,
/// most likely first: the systemd driver's, then the cgroupfs driver's; every QoS class for
/// [`QosClass::Unknown`]. Empty when `uid` could not be a pod UID (it is joined into a path,
/// so `/` or `..` must never get through).
#[must_use]
pub fn pod_cgroup_candidates(root: &Path, uid: &str, qos: QosClass) -> Vec<PathBuf> {
    if !is_valid_uid(uid) {
        return Vec::new();
    }
    let known = [qos];
    let classes: &[QosClass] = match qos {
        QosClass::Unknown => &[QosClass::Guaranteed, QosClass::Burstable, QosClass::BestEffort],
        _ => &known,
    };
    let systemd_uid = uid.replace('-', "_");
    let mut out = Vec::with_capacity(2 * classes.len());
    for class in classes {
        let slice = root.join("kubepods.slice");
        out.push(match class.dir() {
            None => slice.join(format!("kubepods-pod{systemd_uid}.slice")),
            Some(q) => {
                slice.join(format!("kubepods-{q}.slice")).join(format!("kubepods-{q}-pod{systemd_uid}.slice"))
            }
        });
    }
    for class in classes {
        let dir = root.join("kubepods");
        out.push(match class.dir() {
            None => dir.join(format!("pod{uid}")),
            Some(q) => dir.join(q).join(format!("pod{uid}")),
        });
    }
    out
}

/// A Kubernetes UID: letters, digits and dashes (a UUID in practice).
fn is_valid_uid(uid: &str) -> bool {
    !uid.is_empty() && uid.len() <= 64 && uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::labels::default_lane_keys;
    use crate::model::api::{ObjectMeta, PodStatus};

    const UID: &str = "0b6c3a0e-1f2d-4c5b-9a8e-7d6f5e4c3b2a";

    fn local(uid: &str, lane: Option<&str>) -> LocalPod {
        LocalPod {
            uid: uid.into(),
            namespace: "shop".into(),
            name: format!("pod-{uid}"),
            labels: lane.iter().map(|l| ("tagger.io/lane".to_owned(), (*l).to_owned())).collect(),
            qos: QosClass::Burstable,
            ips: Vec::new(),
        }
    }

    #[test]
    fn qos_from_status() {
        assert_eq!(QosClass::from_status(Some("Guaranteed")), QosClass::Guaranteed);
        assert_eq!(QosClass::from_status(Some("Burstable")), QosClass::Burstable);
        assert_eq!(QosClass::from_status(Some("BestEffort")), QosClass::BestEffort);
        assert_eq!(QosClass::from_status(Some("guaranteed")), QosClass::Unknown);
        assert_eq!(QosClass::from_status(None), QosClass::Unknown);
    }

    #[test]
    fn cgroup_paths_per_driver_and_qos() {
        let root = Path::new("/sys/fs/cgroup");
        let u = "0b6c3a0e_1f2d_4c5b_9a8e_7d6f5e4c3b2a";
        let s = |p: &str| PathBuf::from(format!("/sys/fs/cgroup/{p}"));
        assert_eq!(
            pod_cgroup_candidates(root, UID, QosClass::Burstable),
            vec![
                s(&format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice")),
                s(&format!("kubepods/burstable/pod{UID}")),
            ]
        );
        assert_eq!(
            pod_cgroup_candidates(root, UID, QosClass::BestEffort),
            vec![
                s(&format!("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice")),
                s(&format!("kubepods/besteffort/pod{UID}")),
            ]
        );
        assert_eq!(
            pod_cgroup_candidates(root, UID, QosClass::Guaranteed),
            vec![s(&format!("kubepods.slice/kubepods-pod{u}.slice")), s(&format!("kubepods/pod{UID}"))]
        );
        let all = pod_cgroup_candidates(root, UID, QosClass::Unknown);
        assert_eq!(all.len(), 6);
        for qos in [QosClass::Guaranteed, QosClass::Burstable, QosClass::BestEffort] {
            for p in pod_cgroup_candidates(root, UID, qos) {
                assert!(all.contains(&p), "{}", p.display());
            }
        }
    }

    #[test]
    fn hostile_uids_name_no_path() {
        for uid in ["", "../../etc", "a/b", "a b", "x.slice", &"a".repeat(65)] {
            assert!(pod_cgroup_candidates(Path::new("/c"), uid, QosClass::Unknown).is_empty(), "{uid:?}");
        }
    }

    #[test]
    fn lanes_of_local_pods() {
        let pods = [
            local("a", Some("gray")),
            local("b", None),
            local("c", Some("gray!")),
            local("d", Some("base")),
            local("../x", Some("gray")),
            local("a", Some("blue")),
        ];
        let d = desired_pods(&pods, &default_lane_keys());
        assert_eq!(d.pods.len(), 4);
        assert_eq!(d.pods["a"].lane, tagger_common::lane_id("gray"), "first entry of a UID wins");
        assert_eq!(d.pods["a"].lane_name.as_deref(), Some("gray"));
        assert_eq!(d.pods["a"].pod, ObjectRef::new("shop", "pod-a"));
        assert_eq!((d.pods["b"].lane, d.pods["c"].lane, d.pods["d"].lane), (0, 0, 0));
        assert_eq!(d.warnings.count(WarningKind::InvalidLaneLabel), 1);
        assert_eq!(d.warnings.count(WarningKind::InvalidPodUid), 1);
    }

    #[test]
    fn entries_and_pending() {
        let d = desired_pods(&[local("a", Some("gray")), local("b", None)], &default_lane_keys());
        let (entries, pending) = pod_entries(&d, |p| {
            (p.uid == "a").then(|| CgroupRef { path: PathBuf::from("/x"), id: 42, level: 4 })
        });
        assert_eq!(
            entries,
            BTreeMap::from([(42, PodEntry { lane: tagger_common::lane_id("gray"), level: 4 })])
        );
        assert_eq!(pending.iter().map(|p| p.uid.as_str()).collect::<Vec<_>>(), ["b"]);
    }

    #[test]
    fn from_api_pod() {
        let pod = Pod {
            metadata: ObjectMeta {
                name: Some("web-1".into()),
                namespace: Some("shop".into()),
                uid: Some(UID.into()),
                labels: Some(BTreeMap::from([("tagger.io/lane".into(), "gray".into())])),
                ..ObjectMeta::default()
            },
            status: Some(PodStatus { qos_class: Some("BestEffort".into()), ..PodStatus::default() }),
            ..Pod::default()
        };
        let local = LocalPod::from_pod(&pod).unwrap();
        assert_eq!(
            (local.uid.as_str(), local.namespace.as_str(), local.name.as_str()),
            (UID, "shop", "web-1")
        );
        assert_eq!(local.qos, QosClass::BestEffort);
        assert_eq!(local.labels["tagger.io/lane"], "gray");
        assert_eq!(LocalPod::from_pod(&Pod::default()), None);
    }
}
