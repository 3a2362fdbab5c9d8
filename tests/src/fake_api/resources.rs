//! The resource types the fake API server serves, and the discovery documents describing them.

use serde_json::{Value, json};

/// A served resource type: where it lives in the API and what it is called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourceType {
    /// API group; `""` for the core (legacy) group served under `/api`.
    pub group: &'static str,
    /// API version, e.g. `v1`.
    pub version: &'static str,
    /// Plural resource name used in URLs, e.g. `pods`.
    pub plural: &'static str,
    /// Singular lower-case name, as in discovery documents.
    pub singular: &'static str,
    /// Object kind, e.g. `Pod`.
    pub kind: &'static str,
    /// Whether objects live in a namespace.
    pub namespaced: bool,
    /// Field selector labels supported besides `metadata.name` and `metadata.namespace`.
    pub field_labels: &'static [&'static str],
}

impl ResourceType {
    /// `v1` for the core group, `group/version` otherwise.
    #[must_use]
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// Kind of a list of these objects, e.g. `PodList`.
    #[must_use]
    pub fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }

    /// Finds a served type by kind (`Pod`), plural (`pods`) or `plural.group`
    /// (`endpointslices.discovery.k8s.io`), case-insensitively.
    #[must_use]
    pub fn lookup(name: &str) -> Option<&'static Self> {
        RESOURCE_TYPES.iter().find(|t| {
            name.eq_ignore_ascii_case(t.kind)
                || name.eq_ignore_ascii_case(t.plural)
                || name.eq_ignore_ascii_case(&format!("{}.{}", t.plural, t.group))
        })
    }

    /// Finds the type of an object from its `apiVersion` and `kind`.
    #[must_use]
    pub fn of_object(api_version: &str, kind: &str) -> Option<&'static Self> {
        RESOURCE_TYPES.iter().find(|t| t.kind == kind && t.api_version() == api_version)
    }

    /// Finds the type served at `/api/v1/<plural>` or `/apis/<group>/<version>/<plural>`.
    pub(crate) fn at(group: &str, version: &str, plural: &str) -> Option<&'static Self> {
        RESOURCE_TYPES.iter().find(|t| t.group == group && t.version == version && t.plural == plural)
    }

    /// Index of this type in [`RESOURCE_TYPES`].
    pub(crate) fn index(&self) -> usize {
        RESOURCE_TYPES
            .iter()
            .position(|t| t == self)
            .expect("a ResourceType always comes from RESOURCE_TYPES")
    }
}

/// Every type the fake serves. Extend the table to serve more; the store, selectors, list and
/// watch code are generic.
pub static RESOURCE_TYPES: &[ResourceType] = &[
    ResourceType {
        group: "",
        version: "v1",
        plural: "pods",
        singular: "pod",
        kind: "Pod",
        namespaced: true,
        field_labels: &[
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        ],
    },
    ResourceType {
        group: "",
        version: "v1",
        plural: "services",
        singular: "service",
        kind: "Service",
        namespaced: true,
        field_labels: &["spec.clusterIP", "spec.type"],
    },
    ResourceType {
        group: "",
        version: "v1",
        plural: "nodes",
        singular: "node",
        kind: "Node",
        namespaced: false,
        field_labels: &[],
    },
    ResourceType {
        group: "discovery.k8s.io",
        version: "v1",
        plural: "endpointslices",
        singular: "endpointslice",
        kind: "EndpointSlice",
        namespaced: true,
        field_labels: &[],
    },
    ResourceType {
        group: "",
        version: "v1",
        plural: "configmaps",
        singular: "configmap",
        kind: "ConfigMap",
        namespaced: true,
        field_labels: &[],
    },
    ResourceType {
        group: "",
        version: "v1",
        plural: "nodes",
        singular: "node",
        kind: "Node",
        namespaced: false,
        field_labels: &["spec.unschedulable"],
    },
    ResourceType {
        group: "",
        version: "v1",
        plural: "namespaces",
        singular: "namespace",
        kind: "Namespace",
        namespaced: false,
        field_labels: &["status.phase"],
    },
];

/// `/api`: the versions of the core group.
pub(crate) fn core_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
    })
}

/// The named groups and their versions.
fn groups() -> Vec<(&'static str, Vec<&'static str>)> {
    let mut groups: Vec<(&'static str, Vec<&'static str>)> = Vec::new();
    for t in RESOURCE_TYPES.iter().filter(|t| !t.group.is_empty()) {
        match groups.iter_mut().find(|(g, _)| *g == t.group) {
            Some((_, versions)) if !versions.contains(&t.version) => versions.push(t.version),
            Some(_) => {}
            None => groups.push((t.group, vec![t.version])),
        }
    }
    groups
}

fn group_json(group: &str, versions: &[&str]) -> Value {
    let versions: Vec<Value> =
        versions.iter().map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v})).collect();
    json!({
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": group,
        "versions": versions,
        "preferredVersion": versions[0],
    })
}

/// `/apis`: every named group.
pub(crate) fn group_list() -> Value {
    let groups: Vec<Value> = groups()
        .iter()
        .map(|(g, vs)| {
            let mut group = group_json(g, vs);
            if let Some(obj) = group.as_object_mut() {
                obj.remove("kind");
                obj.remove("apiVersion");
            }
            group
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `/apis/<group>`, if the group is served.
pub(crate) fn group(group: &str) -> Option<Value> {
    groups().into_iter().find(|(g, _)| *g == group).map(|(g, vs)| group_json(g, &vs))
}

/// `/api/v1` or `/apis/<group>/<version>`: the resources of one group version.
pub(crate) fn resource_list(group: &str, version: &str) -> Option<Value> {
    let resources: Vec<Value> = RESOURCE_TYPES
        .iter()
        .filter(|t| t.group == group && t.version == version)
        .map(|t| {
            json!({
                "name": t.plural,
                "singularName": t.singular,
                "namespaced": t.namespaced,
                "kind": t.kind,
                "verbs": ["get", "list", "watch"],
            })
        })
        .collect();
    if resources.is_empty() {
        return None;
    }
    let group_version = if group.is_empty() { version.to_owned() } else { format!("{group}/{version}") };
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources,
    }))
}

/// `/version`.
pub(crate) fn version_info() -> Value {
    json!({
        "major": "1",
        "minor": "33",
        "gitVersion": "v1.33.0-tagger-fake",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z",
        "goVersion": "go1.24.0",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}
