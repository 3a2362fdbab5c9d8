//! The datapath's contents as data: what the maps hold and what they should hold
//! ([`DatapathState`], or [`DesiredRef`] borrowing the incremental model's maps), and which
//! entries a change may have touched ([`Scope`]). The reconciler ([`crate::reconcile`]) diffs
//! two of them into writes; it reads the maps into one (`DatapathState::read`) and applies
//! writes to one in memory.

use std::collections::{BTreeMap, BTreeSet};

use tagger_common::{
    Backend, FrontendKey, LanePolicy, PodEntry, RouteKey, Service, SetKey, SvcAffinity, SvcShaping,
    WarmEntry, WarmKey,
};

use super::FrontendIds;

/// Declares the maps the reconciler manages, from one list of `field: Key => Value`: the
/// fields of [`DatapathState`], [`DesiredRef`] and [`Scope`], and what those do with every map
/// ([`DatapathState::as_desired`], [`DatapathState::equivalent`], [`Scope::all`],
/// [`Scope::is_empty`], [`Scope::merge`]). A map whose values are equivalent otherwise than by
/// `==` names its comparison after `as`. The global flags are one value, not a map: they are
/// declared here by hand.
macro_rules! datapath_maps {
    (@same) => { PartialEq::eq };
    (@same $same:expr) => { $same };
    ($($(#[doc = $doc:literal])* $field:ident: $key:ty => $value:ty $(as $same:expr)?;)*) => {
        /// The contents of the datapath maps that the reconciler manages: both "what is in the
        /// maps" and "what should be".
        #[derive(Clone, Debug, Default, PartialEq, Eq)]
        pub struct DatapathState {
            $($(#[doc = $doc])* pub $field: BTreeMap<$key, $value>,)*
            /// `DatapathConfig::flags` (shadow mode).
            pub config_flags: u32,
        }

        /// The desired contents, borrowed from wherever they are kept (a [`DatapathState`], or
        /// the incremental model's maps).
        #[derive(Clone, Copy, Debug)]
        pub struct DesiredRef<'a> {
            $($(#[doc = $doc])* pub $field: &'a BTreeMap<$key, $value>,)*
            /// `DatapathConfig::flags`.
            pub config_flags: u32,
        }

        /// The entries a plan looks at: those that may differ between the maps and the desired
        /// state. [`Scope::all`] is every entry of either; an incremental reconciler passes only
        /// the keys its inputs' changes touched.
        #[derive(Clone, Debug, Default, PartialEq, Eq)]
        pub struct Scope {
            $(
                #[doc = concat!("Keys of [`DatapathState::", stringify!($field), "`].")]
                pub $field: BTreeSet<$key>,
            )*
            /// The global flags.
            pub config: bool,
        }

        impl DatapathState {
            /// This state as the desired contents of a plan.
            #[must_use]
            pub fn as_desired(&self) -> DesiredRef<'_> {
                DesiredRef { $($field: &self.$field,)* config_flags: self.config_flags }
            }

            /// Whether both states hold the same entries, comparing backend sets as sets.
            #[must_use]
            pub fn equivalent(&self, other: &Self) -> bool {
                $(equivalent(&self.$field, &other.$field, datapath_maps!(@same $($same)?)) &&)*
                    self.config_flags == other.config_flags
            }
        }

        impl Scope {
            /// Every entry of `current` and of `desired`.
            #[must_use]
            pub fn all(current: &DatapathState, desired: DesiredRef<'_>) -> Self {
                Self {
                    $($field: current.$field.keys().chain(desired.$field.keys()).copied().collect(),)*
                    config: true,
                }
            }

            /// Whether the scope holds no entry.
            #[must_use]
            pub fn is_empty(&self) -> bool {
                $(self.$field.is_empty() &&)* !self.config
            }

            /// Adds another scope's entries.
            pub fn merge(&mut self, other: Scope) {
                $(self.$field.extend(other.$field);)*
                self.config |= other.config;
            }
        }
    };
}

datapath_maps! {
    /// Pod cgroup id → lane and cgroup level.
    pods: u64 => PodEntry;
    /// Service frontends.
    frontends: FrontendKey => Service;
    /// (frontend, lane) → backends. Order does not matter to the datapath.
    sets: SetKey => Vec<Backend> as |a: &Vec<Backend>, b: &Vec<Backend>| same_members(a, b);
    /// Lane id → policy.
    lanes: u32 => LanePolicy;
    /// svc_id → shaping settings.
    shaping: u32 => SvcShaping;
    /// (svc_id, caller lane) → routing rule chain.
    routes: RouteKey => LanePolicy;
    /// Warming backends.
    warm: WarmKey => WarmEntry;
    /// svc_id → session affinity timeout.
    affinity: u32 => SvcAffinity;
}

impl DatapathState {
    /// An id allocator that keeps the ids of these frontends and never hands out the id of a
    /// set that is still here (left by an interrupted removal), so a new frontend cannot
    /// inherit another one's backends. Call it on the state read at startup.
    #[must_use]
    pub fn frontend_ids(&self) -> FrontendIds {
        let mut ids = FrontendIds::from_existing(self.frontends.iter().map(|(k, s)| (*k, s.svc_id)));
        ids.reserve(self.sets.keys().map(|k| k.svc_id));
        ids
    }
}

/// Whether two maps hold the same keys with values equivalent by `same`.
fn equivalent<K: Ord, V>(a: &BTreeMap<K, V>, b: &BTreeMap<K, V>, same: impl Fn(&V, &V) -> bool) -> bool {
    a.len() == b.len() && a.iter().all(|(k, v)| b.get(k).is_some_and(|o| same(v, o)))
}

/// Whether two backend lists hold the same backends, in any order.
pub fn same_members(a: &[Backend], b: &[Backend]) -> bool {
    if a == b {
        return true;
    }
    let set = |v: &[Backend]| v.iter().copied().collect::<BTreeSet<_>>();
    set(a) == set(b)
}
