//! The tables at their documented capacity: 65,536 Service frontends and 262,144 backends, with
//! lookups right at the edges, and a full table refusing cleanly without changing anything.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use tagger::{
    Error,
    net::{Proto, backend, frontend_key},
};
use tagger_common::{BASE_LANE, MAX_BACKENDS, MAX_FRONTENDS, Service};
use tagger_tests::{
    client::Mode,
    scenario::{Sandbox, replies},
};

/// The i-th frontend address: 10.96.0.0/16 holds exactly 65,536 of them.
fn vip(i: u32) -> SocketAddr {
    let [_, _, hi, lo] = i.to_be_bytes();
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, hi, lo)), 80)
}

#[test]
fn full_tables_65536_frontends_262144_backends_lookups_at_the_edges() {
    let mut sb = Sandbox::new();
    let (first_backend, _) = sb.backend("first");
    let (middle_backend, _) = sb.backend("middle");
    let (last_backend, _) = sb.backend("last");
    let per_frontend = MAX_BACKENDS / MAX_FRONTENDS;
    assert_eq!(per_frontend, 4);
    let edges = [(0, first_backend), (MAX_FRONTENDS / 2, middle_backend), (MAX_FRONTENDS - 1, last_backend)];
    {
        let tables = sb.dp.dp.tables_mut();
        for i in 0..MAX_FRONTENDS {
            let svc_id = i + 1;
            let set: Vec<_> = match edges.iter().find(|(e, _)| *e == i) {
                // Edge frontends: four slots, all the real backend (any slot picked must work).
                Some((_, real)) => vec![backend(*real); 4],
                // Others: four addresses that exist nowhere.
                None => (0..per_frontend)
                    .map(|k| {
                        let [_, _, hi, lo] = i.to_be_bytes();
                        backend(SocketAddr::new(
                            IpAddr::V4(Ipv4Addr::new(10, 245, hi, lo)),
                            1000 + u16::try_from(k).unwrap(),
                        ))
                    })
                    .collect(),
            };
            tables.replace_backends(svc_id, BASE_LANE, &set).unwrap();
            tables.upsert_frontend(&frontend_key(vip(i), Proto::Tcp), Service { svc_id, flags: 0 }).unwrap();
        }
        assert_eq!(tables.frontends().unwrap().len(), MAX_FRONTENDS as usize);
        assert_eq!(tables.slot_entries(), MAX_BACKENDS as usize);
    }

    let caller = sb.caller("client", None);
    for (i, name) in [(0, "first"), (MAX_FRONTENDS / 2, "middle"), (MAX_FRONTENDS - 1, "last")] {
        let got = replies(&sb.call(&caller, Mode::Tcp, vip(i), 10));
        assert_eq!(got.keys().collect::<Vec<_>>(), [name], "frontend {i} ({})", vip(i));
    }

    // One frontend too many: a clear error, and every existing frontend is still served.
    let tables = sb.dp.dp.tables_mut();
    let extra = frontend_key("10.97.0.1:80".parse().unwrap(), Proto::Tcp);
    let err = tables.upsert_frontend(&extra, Service { svc_id: MAX_FRONTENDS + 1, flags: 0 }).unwrap_err();
    assert!(matches!(err, Error::MapFull { .. }), "{err}");
    assert!(err.to_string().contains("TAGGER_SVC_V1"), "{err}");
    assert_eq!(tables.frontends().unwrap().len(), MAX_FRONTENDS as usize);
    let got = replies(&sb.call(&caller, Mode::Tcp, vip(MAX_FRONTENDS - 1), 5));
    assert_eq!(got.keys().collect::<Vec<_>>(), ["last"]);

    // `tagger status` reports the full tables.
    let (_, status) = tagger_tests::agent::cli_json(sb.dp.dir(), &["status"]);
    // (The slots map has room for two generations of every set, for atomic replacement: the
    // backends fill half of it.)
    for (map, entries, fill) in
        [("TAGGER_SVC_V1", MAX_FRONTENDS, 1.0), ("TAGGER_SLOTS_V1", MAX_BACKENDS, 0.5)]
    {
        let m = status["maps"].as_array().unwrap().iter().find(|m| m["map"] == map).expect(map);
        assert_eq!(
            (m["entries"].as_u64(), m["fill_ratio"].as_f64()),
            (Some(u64::from(entries)), Some(fill)),
            "{m}"
        );
    }
}
