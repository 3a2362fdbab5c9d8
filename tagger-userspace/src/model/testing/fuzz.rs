//! Fuzzing with proptest (cargo-fuzz needs a sanitizer runtime these toolchains lack; see
//! docs/RELIABILITY.md): the file source's YAML, the lanes config, label keys and values and the
//! Service annotations, from random text and from random mutations of the seeds in
//! `fuzz-corpus/`. The reconciler's event sequences are fuzzed by the proptests in
//! `reconcile/tests.rs` against the full recomputation.
//!
//! Each target runs [`cases`] cases: a modest number in the normal test run, as many as
//! `TAGGER_FUZZ_CASES` says otherwise. Failures are kept in `proptest-regressions/fuzz.txt` and
//! replayed first on every run.

use std::{collections::BTreeMap, path::PathBuf};

use proptest::prelude::*;
use tagger_common::{MAX_CHAIN, MAX_LANES, SVC_F_STRICT};

use crate::{
    cgroup::CgroupRef,
    config::labels::{default_lane_keys, validate_label_key, validate_label_value},
    config::lanes::LanesConfig,
    model::incremental::{Incremental, Recheck},
    model::lane::lane_of,
    model::{
        FrontendIds, Limits, ObjectRef, ServiceInput, WarningKind, api::Service, objects::STRICT_ANNOTATION,
    },
    source::file,
};

/// Cases per fuzz target: `TAGGER_FUZZ_CASES` if set, else `default`.
pub(crate) fn cases(default: u32) -> u32 {
    std::env::var("TAGGER_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn config(default: u32) -> ProptestConfig {
    ProptestConfig { cases: cases(default), max_shrink_iters: 2048, ..ProptestConfig::default() }
}

const FILE_SEEDS: [&str; 1] = [include_str!("../../../fuzz-corpus/file-source/cluster.yaml")];
const LANES_SEEDS: [&str; 1] = [include_str!("../../../fuzz-corpus/lanes/lanes.yaml")];

/// Tokens that stress YAML and the decoders when spliced in.
const TOKENS: [&str; 24] = [
    "",
    "-1",
    "0",
    "65536",
    "99999999999999999999",
    "1e400",
    "null",
    "~",
    "[]",
    "{}",
    "&a x",
    "*a",
    "!!binary AA",
    "'",
    "\"",
    ": ",
    "\n- ",
    "\n  ",
    "---\n",
    "kind: List\n",
    "<<: *a",
    "\t",
    "é\u{0}",
    "::1",
];

/// One edit of a seed text.
#[derive(Clone, Debug)]
enum Mutation {
    Delete { at: usize, len: usize },
    Insert { at: usize, text: String },
    DuplicateLine { line: usize },
    SwapLines { a: usize, b: usize },
    ReplaceScalar { line: usize, token: usize },
    Truncate { at: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let text = prop_oneof![
        "[ -~\n]{0,12}",
        "[:{}\\[\\],#&*!|>'\"%@` \n-]{1,6}",
        proptest::sample::select(TOKENS.to_vec()).prop_map(str::to_owned),
        any::<String>(),
    ];
    prop_oneof![
        (any::<usize>(), 1..40usize).prop_map(|(at, len)| Mutation::Delete { at, len }),
        (any::<usize>(), text).prop_map(|(at, text)| Mutation::Insert { at, text }),
        any::<usize>().prop_map(|line| Mutation::DuplicateLine { line }),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Mutation::SwapLines { a, b }),
        (any::<usize>(), 0..TOKENS.len()).prop_map(|(line, token)| Mutation::ReplaceScalar { line, token }),
        any::<usize>().prop_map(|at| Mutation::Truncate { at }),
    ]
}

fn boundary(s: &str, at: usize) -> usize {
    let mut at = if s.is_empty() { 0 } else { at % (s.len() + 1) };
    while !s.is_char_boundary(at) {
        at -= 1;
    }
    at
}

fn mutate(seed: &str, mutations: &[Mutation]) -> String {
    let mut s = seed.to_owned();
    for m in mutations {
        match m {
            Mutation::Delete { at, len } => {
                let a = boundary(&s, *at);
                let b = boundary(&s, (a + len).min(s.len()));
                s.replace_range(a..b.max(a), "");
            }
            Mutation::Insert { at, text } => s.insert_str(boundary(&s, *at), text),
            Mutation::Truncate { at } => s.truncate(boundary(&s, *at)),
            Mutation::DuplicateLine { line } | Mutation::SwapLines { a: line, .. }
                if s.lines().next().is_none() =>
            {
                let _ = line;
            }
            Mutation::DuplicateLine { line } => {
                let mut lines: Vec<&str> = s.lines().collect();
                let i = line % lines.len();
                lines.insert(i, lines[i]);
                s = lines.join("\n");
            }
            Mutation::SwapLines { a, b } => {
                let mut lines: Vec<&str> = s.lines().collect();
                let n = lines.len();
                lines.swap(a % n, b % n);
                s = lines.join("\n");
            }
            Mutation::ReplaceScalar { line, token } => {
                let mut lines: Vec<String> = s.lines().map(str::to_owned).collect();
                if !lines.is_empty() {
                    let i = line % lines.len();
                    if let Some((key, _)) = lines[i].split_once(": ") {
                        lines[i] = format!("{key}: {}", TOKENS[*token]);
                    }
                    s = lines.join("\n");
                }
            }
        }
    }
    s
}

fn mutated(seeds: &'static [&'static str]) -> impl Strategy<Value = String> {
    (proptest::sample::select(seeds), proptest::collection::vec(mutation(), 1..6))
        .prop_map(|(seed, ms)| mutate(seed, &ms))
}

/// Everything the agent does with a file it read: decode, turn into changes, reconcile.
fn feed_file(text: &str) {
    let Ok(snapshot) = file::parse(text) else { return };
    let changes = crate::source::file::file_changes(&snapshot, "node-1");
    let mut inc = Incremental::new(FrontendIds::new(), default_lane_keys(), Limits::DATAPATH);
    inc.apply(changes);
    let lanes = LanesConfig::parse(LANES_SEEDS[0]).expect("the seed config is valid");
    let _ = inc.update(&crate::model::lanes::LaneSettings::of(&lanes), Recheck::All, |p| {
        Some(CgroupRef { path: PathBuf::from("/c"), id: 1000 + p.pod.name.len() as u64, level: 4 })
    });
    let _ = inc.desired_state();
}

/// Independent statement of Kubernetes' label-value grammar: empty, or at most 63 of
/// `[A-Za-z0-9._-]` beginning and ending with an alphanumeric.
fn oracle_value(v: &str) -> bool {
    let alnum = |c: char| c.is_ascii_alphanumeric();
    v.is_empty()
        || (v.len() <= 63
            && v.chars().all(|c| alnum(c) || "._-".contains(c))
            && v.starts_with(alnum)
            && v.ends_with(alnum))
}

/// `[dns-subdomain/]name`, name a non-empty label value.
fn oracle_key(k: &str) -> bool {
    let dns_part = |p: &str| {
        let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
        !p.is_empty() && p.chars().all(|c| ok(c) || c == '-') && p.starts_with(ok) && p.ends_with(ok)
    };
    let (prefix, name) = match k.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    let prefix_ok = prefix.is_none_or(|p| p.len() <= 253 && p.split('.').all(dns_part));
    prefix_ok && !name.is_empty() && oracle_value(name)
}

fn near_label() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[a-z0-9.-]{0,8}(/)?[A-Za-z0-9._-]{0,70}",
        "[a-z]{1,3}(\\.[a-z0-9-]{0,4}){0,3}/[a-z]{0,3}/?[a-z]{0,3}",
        "[A-Za-z0-9._ /-]{0,260}",
    ]
}

proptest! {
    #![proptest_config(config(512))]

    /// Random text never panics the file source or anything downstream.
    #[test]
    fn file_source_random_text(text in "\\PC{0,400}") {
        feed_file(&text);
    }

    /// Mutated valid files either decode and reconcile, or are rejected with a document number
    /// (or, not being YAML, a line and column); never a panic.
    #[test]
    fn file_source_mutated(text in mutated(&FILE_SEEDS)) {
        match file::parse(&text) {
            Ok(_) => feed_file(&text),
            Err(e) => prop_assert!(
                e.document >= 1 || e.message.contains("limit") || e.message.contains(" at line "),
                "{e}"
            ),
        }
    }

    /// Any lanes config that parses is valid and within the datapath's limits, and survives a
    /// round trip through YAML.
    #[test]
    fn lanes_config_mutated(text in prop_oneof![mutated(&LANES_SEEDS), "\\PC{0,200}"]) {
        if let Ok(cfg) = LanesConfig::parse(&text) {
            prop_assert!(cfg.validate().is_ok());
            let policies = cfg.policies();
            prop_assert!(policies.len() <= MAX_LANES as usize);
            // Every lane and every chain entry has a name (ids never collide: the config
            // would have been rejected).
            let names = cfg.lane_names();
            for (id, p) in &policies {
                prop_assert!(names.contains_key(id));
                prop_assert!(p.chain_len as usize <= MAX_CHAIN);
                for entry in &p.chain[..p.chain_len as usize] {
                    prop_assert!(names.contains_key(entry), "chain entry {:#x} has no name", entry);
                }
            }
            let again = serde_saphyr::to_string(&cfg).unwrap();
            prop_assert_eq!(LanesConfig::parse(&again).unwrap(), cfg);
        }
    }

    /// The label validators agree with an independent statement of the grammar.
    #[test]
    fn label_validators_match_the_grammar(s in near_label()) {
        prop_assert_eq!(validate_label_value(&s).is_ok(), oracle_value(&s), "value {:?}", s);
        prop_assert_eq!(validate_label_key(&s).is_ok(), oracle_key(&s), "key {:?}", s);
    }

    /// Whatever labels a pod carries, its lane is base, a valid value, or reported invalid.
    #[test]
    fn lane_of_any_labels(labels in proptest::collection::btree_map(near_label(), near_label(), 0..6),
                          lane in near_label()) {
        let mut labels = labels;
        labels.insert("tagger.io/lane".into(), lane.clone());
        match lane_of(&labels, &default_lane_keys()) {
            crate::model::lane::LaneOf::Lane(name) => {
                prop_assert_eq!(&name, &lane);
                prop_assert!(oracle_value(&name));
            }
            crate::model::lane::LaneOf::Invalid { value, .. } => prop_assert!(!oracle_value(&value)),
            crate::model::lane::LaneOf::Base => {}
        }
    }

    /// Service annotations: only "true" makes a Service strict; any other value but "false" is a
    /// counted warning, never a panic or a dropped Service.
    #[test]
    fn service_annotations(value in prop_oneof![near_label(), Just("true".to_owned()), Just("false".to_owned())],
                           others in proptest::collection::btree_map(near_label(), any::<String>(), 0..4)) {
        let mut annotations: BTreeMap<String, String> = others;
        annotations.insert(STRICT_ANNOTATION.into(), value.clone());
        let svc: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "s", "namespace": "n", "annotations": annotations},
            "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80, "protocol": "TCP"}]},
        })).unwrap();
        let input = ServiceInput::new(&ObjectRef::new("n", "s"), &svc);
        let spec = input.spec.expect("the Service stays steerable");
        prop_assert_eq!(spec.flags & SVC_F_STRICT != 0, value == "true");
        let warned = input.warnings.count(WarningKind::InvalidAnnotation);
        prop_assert_eq!(warned, u64::from(value != "true" && value != "false"));
    }
}
