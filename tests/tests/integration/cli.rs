//! The `tagger` CLI against real pins: every subcommand as tables and as JSON, after real
//! connections; its handle on the maps is read-only; a missing pin directory is a clear error.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use serde_json::Value;
use tagger::{
    datapath::Datapath,
    net::{Proto, frontend_key},
};
use tagger_common::{SVC_F_STRICT, Service, lane_id};
use tagger_tests::{
    agent::workspace_bin,
    cgroup::TestCgroup,
    client::Mode,
    netns::Netns,
    scenario::{Caller, Sandbox, replies},
    unique_name,
};

const N: usize = 20;

fn vip() -> SocketAddr {
    "10.96.40.1:80".parse().unwrap()
}

fn strict_vip() -> SocketAddr {
    "10.96.40.2:53".parse().unwrap()
}

/// Runs the CLI on a pin directory, optionally inside a network namespace (so that `status`'s
/// agent probe stays in the test's namespace).
fn tagger_in(netns: Option<&Netns>, dir: &Path, args: &[&str]) -> Output {
    let bin = workspace_bin("tagger");
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={}", ns.path().display())).arg(&bin);
            c
        }
        None => Command::new(&bin),
    };
    cmd.arg("--bpffs").arg(dir).args(args).output().expect("run tagger")
}

fn tagger(dir: &Path, args: &[&str]) -> Output {
    tagger_in(None, dir, args)
}

/// Stdout of a successful run.
fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "tagger {what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `tagger <args> -o json`, parsed.
fn json(dir: &Path, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    let text = ok(&tagger(dir, &all), &args.join(" "));
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("tagger {}: not JSON ({e}): {text}", args.join(" ")))
}

/// `tagger <args>` as a table; printed so a failing run shows what people would see.
fn table(dir: &Path, args: &[&str]) -> String {
    let text = ok(&tagger(dir, args), &args.join(" "));
    println!("$ tagger {}\n{text}", args.join(" "));
    text
}

fn cgroup_id(caller: &Caller) -> u64 {
    TestCgroup::resolve(&caller.cgroup).id
}

/// A node with two Services (one strict), a lane chain, names published as the agent would, a
/// gray and a base caller.
struct Setup {
    sb: Sandbox,
    gray: Caller,
    base: Caller,
    base_backend: SocketAddr,
    gray_backend: SocketAddr,
}

fn setup(gray_backends: bool) -> Setup {
    let mut sb = Sandbox::new();
    let (base_backend, _) = sb.backend("a-base");
    let (gray_backend, _) = sb.backend("a-gray");
    let gray_set: &[SocketAddr] = if gray_backends { &[gray_backend] } else { &[] };
    sb.service(vip(), Proto::Tcp, 1, 0, &[("base", &[base_backend]), ("gray", gray_set)]);
    sb.service(strict_vip(), Proto::Udp, 2, SVC_F_STRICT, &[("base", &[base_backend])]);
    sb.lane_policy("feature-x", &["gray", "base"], 0);
    let gray = sb.caller("gw-gray", Some("gray"));
    let base = sb.caller("gw-base", Some("base"));
    let (gray_id, base_id) = (cgroup_id(&gray), cgroup_id(&base));
    let t = sb.dp.dp.tables_mut();
    for lane in ["gray", "feature-x"] {
        t.set_lane_name(lane_id(lane), lane).unwrap();
    }
    t.set_service_meta(1, "demo", "a", "http").unwrap();
    t.set_service_meta(2, "demo", "dns", "").unwrap();
    t.set_pod_meta(gray_id, "demo", "gw-gray").unwrap();
    t.set_pod_meta(base_id, "demo", "gw-base").unwrap();
    Setup { sb, gray, base, base_backend, gray_backend }
}

/// The element of a JSON array whose `field` equals `value`.
fn find<'a>(array: &'a Value, field: &str, value: &Value) -> &'a Value {
    array
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {array}"))
        .iter()
        .find(|e| &e[field] == value)
        .unwrap_or_else(|| panic!("no element with {field} = {value} in {array}"))
}

fn lane(name: &str) -> Value {
    serde_json::json!({ "id": lane_id(name), "name": name })
}

#[test]
fn pods_services_and_lanes_as_tables_and_json() {
    let s = setup(true);
    let dir = s.sb.dp.dir();

    let pods = json(dir, &["pods"]);
    let gray = find(&pods["pods"], "cgroup_id", &cgroup_id(&s.gray).into());
    assert_eq!(gray["lane"], lane("gray"), "{pods}");
    assert_eq!((gray["namespace"].as_str(), gray["name"].as_str()), (Some("demo"), Some("gw-gray")));
    assert_eq!(gray["level"], TestCgroup::resolve(&s.gray.cgroup).level);
    let base = find(&pods["pods"], "cgroup_id", &cgroup_id(&s.base).into());
    assert_eq!(base["lane"], serde_json::json!({"id": 0, "name": "base"}));
    let text = table(dir, &["pods"]);
    assert!(
        text.contains("demo/gw-gray") && text.contains("gray") && text.contains("demo/gw-base"),
        "{text}"
    );

    let services = json(dir, &["services"]);
    let a = find(&services["services"], "svc_id", &1.into());
    assert_eq!(a["frontends"], serde_json::json!(["10.96.40.1:80/tcp"]));
    assert_eq!(a["service"], serde_json::json!({"namespace": "demo", "name": "a", "port_name": "http"}));
    assert_eq!((a["strict"].as_bool(), a["flags"].as_array().map(Vec::len)), (Some(false), Some(0)));
    let a_gray = find(&a["lanes"], "lane", &lane("gray"));
    assert_eq!(a_gray["count"], 1);
    assert_eq!(a_gray["backends"], serde_json::json!([s.gray_backend.to_string()]));
    assert_eq!(a_gray["if_empty"]["fallback"], serde_json::json!([{"id": 0, "name": "base"}]));
    let a_base = find(&a["lanes"], "lane", &serde_json::json!({"id": 0, "name": "base"}));
    assert_eq!(a_base["backends"], serde_json::json!([s.base_backend.to_string()]));
    let dns = find(&services["services"], "svc_id", &2.into());
    assert_eq!(dns["frontends"], serde_json::json!(["10.96.40.2:53/udp"]));
    assert_eq!((dns["strict"].as_bool(), dns["flags"].clone()), (Some(true), serde_json::json!(["strict"])));
    let fx = find(&services["lane_policies"], "lane", &lane("feature-x"));
    assert_eq!(fx["policy"]["fallback"], serde_json::json!([lane("gray"), {"id": 0, "name": "base"}]));
    let text = table(dir, &["services"]);
    for want in
        ["10.96.40.1:80/tcp", "demo/a:http", "demo/dns", "strict", &s.gray_backend.to_string(), "gray → base"]
    {
        assert!(text.contains(want), "{want} missing: {text}");
    }

    let lanes = json(dir, &["lanes"]);
    let l = &lanes["lanes"];
    assert_eq!(l[0]["lane"], serde_json::json!({"id": 0, "name": "base"}), "base first: {lanes}");
    let fx = find(l, "lane", &lane("feature-x"));
    assert_eq!(fx["id_hex"], format!("{:#010x}", lane_id("feature-x")));
    assert_eq!(
        (fx["policy"]["configured"].as_bool(), fx["policy"]["strict"].as_bool()),
        (Some(true), Some(false))
    );
    assert_eq!(fx["policy"]["fallback"], serde_json::json!([lane("gray"), {"id": 0, "name": "base"}]));
    let g = find(l, "lane", &lane("gray"));
    assert_eq!((g["pods"].as_u64(), g["backend_sets"].as_u64()), (Some(1), Some(1)));
    assert_eq!(g["policy"]["configured"], false);
    let text = table(dir, &["lanes"]);
    assert!(text.contains("feature-x") && text.contains(&format!("{:#010x}", lane_id("gray"))), "{text}");
}

#[test]
fn stats_show_real_connections_per_outcome_service_and_lane() {
    let s = setup(true);
    let dir = s.sb.dp.dir();
    let g = s.sb.call(&s.gray, Mode::Tcp, vip(), N);
    assert_eq!(replies(&g).into_keys().collect::<Vec<_>>(), ["a-gray"]);
    let b = s.sb.call(&s.base, Mode::Tcp, vip(), N);
    assert_eq!(replies(&b).into_keys().collect::<Vec<_>>(), ["a-base"]);

    let stats = json(dir, &["stats"]);
    let counters = &stats["counters"];
    assert_eq!(counters["steered"], 2 * N, "{stats}");
    for o in tagger_common::Outcome::ALL {
        assert!(counters[o.name()].is_u64(), "outcome {} missing: {stats}", o.name());
    }
    assert!(stats["rates"].is_null() && stats["interval_seconds"].is_null());
    let rows: Vec<&Value> = stats["per_service"].as_array().unwrap().iter().collect();
    let gray_row = rows
        .iter()
        .find(|r| r["caller_lane"] == lane("gray") && r["outcome"] == "steered")
        .unwrap_or_else(|| panic!("no gray steered row: {stats}"));
    assert_eq!(gray_row["count"], N);
    assert_eq!(gray_row["backend_lane"], lane("gray"));
    assert_eq!(gray_row["svc_id"], 1);
    assert_eq!(gray_row["service"]["name"], "a");
    assert_eq!(gray_row["frontends"], serde_json::json!(["10.96.40.1:80/tcp"]));
    let base_row = rows
        .iter()
        .find(|r| r["caller_lane"]["id"] == 0 && r["outcome"] == "steered")
        .expect("base steered row");
    assert_eq!(base_row["count"], N);

    let text = table(dir, &["stats"]);
    assert!(text.contains("steered") && text.contains("demo/a:http") && text.contains("gray"), "{text}");
    assert!(text.contains(&(2 * N).to_string()), "{text}");

    // --watch: one JSON document per refresh, rates from the second one on.
    let out =
        ok(&tagger(dir, &["stats", "--watch", "--interval", "0.2", "--count", "2", "-o", "json"]), "watch");
    let docs: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).expect("JSON line")).collect();
    assert_eq!(docs.len(), 2, "{out}");
    assert!(docs[0]["rates"].is_null());
    assert!(
        docs[1]["rates"]["steered"].is_number() && docs[1]["interval_seconds"].as_f64() > Some(0.1),
        "{out}"
    );
    let out = ok(&tagger(dir, &["stats", "--watch", "--interval", "0.2", "--count", "2"]), "watch table");
    assert_eq!(out.matches("tagger stats, every").count(), 2, "{out}");
    assert!(out.contains("rate/s"), "{out}");
}

#[test]
fn explain_a_gray_caller_without_gray_backends_shows_the_fallback_to_base() {
    let mut s = setup(false);
    let dir = s.sb.dp.dir().to_owned();
    let dir = dir.as_path();

    // What the kernel does...
    let g = s.sb.call(&s.gray, Mode::Tcp, vip(), N);
    assert_eq!(replies(&g).into_keys().collect::<Vec<_>>(), ["a-base"]);
    // ...is what explain says, by pod name.
    let ex = json(dir, &["explain", "--pod", "demo/gw-gray", "10.96.40.1:80"]);
    assert_eq!(ex["outcome"], "fell_back", "{ex}");
    assert_eq!(ex["caller"]["lane"], lane("gray"));
    assert_eq!(ex["caller"]["found_by"], "pod_name");
    assert_eq!(ex["caller"]["pod_cgroup_id"], cgroup_id(&s.gray));
    assert_eq!(ex["destination"], "10.96.40.1:80/tcp");
    assert_eq!(ex["frontend"]["svc_id"], 1);
    assert_eq!(ex["own_set"], serde_json::json!({"lane": lane("gray"), "count": 0}));
    assert_eq!(ex["fallback"][0]["set"]["lane"]["id"], 0);
    assert_eq!(ex["fallback"][0]["chosen"], true);
    assert_eq!(ex["backend_lane"], serde_json::json!({"id": 0, "name": "base"}));
    assert_eq!(
        ex["backends"],
        serde_json::json!([{"address": s.base_backend.to_string(), "reachable": true}])
    );
    let stats = json(dir, &["stats"]);
    assert_eq!(stats["counters"]["fell_back"], N, "{stats}");

    let text = table(dir, &["explain", "--pod", "demo/gw-gray", "10.96.40.1:80/tcp"]);
    for want in
        ["backend set is empty", "base (default", "→ chosen", "fell_back", &s.base_backend.to_string()]
    {
        assert!(text.contains(want), "{want} missing: {text}");
    }

    // A container cgroup below the pod, by path and by id: the pod's lane, as in the kernel.
    let container = s.gray.cgroup.join("cri-containerd-0123.scope");
    std::fs::create_dir_all(&container).unwrap();
    let by_path = json(dir, &["explain", "--pod", container.to_str().unwrap(), "10.96.40.1:80"]);
    assert_eq!(by_path["caller"]["found_by"], "cgroup_path");
    assert_eq!(by_path["caller"]["registered"], true);
    assert_eq!(by_path["caller"]["pod_cgroup_id"], cgroup_id(&s.gray));
    assert_eq!(by_path["caller"]["name"], "gw-gray");
    assert_eq!(by_path["outcome"], "fell_back");
    let container_id = TestCgroup::resolve(&container).id.to_string();
    let by_id = json(dir, &["explain", "--pod", &container_id, "10.96.40.1:80"]);
    assert_eq!(by_id["caller"]["lane"], lane("gray"), "{by_id}");
    let pod_id = cgroup_id(&s.gray).to_string();
    assert_eq!(json(dir, &["explain", "--pod", &pod_id, "10.96.40.1:80"])["caller"]["found_by"], "cgroup_id");
    // --cgroup-root (the host's tree as a container sees it): ids and relative paths resolve
    // below it.
    let root = s.gray.cgroup.parent().unwrap();
    let relative =
        format!("./{}/cri-containerd-0123.scope", s.gray.cgroup.file_name().unwrap().to_str().unwrap());
    for query in [relative.as_str(), container_id.as_str()] {
        let ex =
            json(dir, &["--cgroup-root", root.to_str().unwrap(), "explain", "--pod", query, "10.96.40.1:80"]);
        assert_eq!(ex["caller"]["lane"], lane("gray"), "{query}: {ex}");
        assert_eq!(ex["caller"]["cgroup_path"], container.to_str().unwrap(), "{query}: {ex}");
    }

    // An unregistered cgroup is base: base callers stay in base.
    let plain = s.sb.caller("plain", None);
    let ex = json(dir, &["explain", "--pod", plain.cgroup.to_str().unwrap(), "10.96.40.1:80"]);
    assert_eq!(
        (ex["caller"]["registered"].as_bool(), ex["outcome"].as_str()),
        (Some(false), Some("steered"))
    );
    assert_eq!(ex["caller"]["lane"]["id"], 0);

    // The strict UDP Service refuses the gray caller; a non-frontend is untouched.
    let ex = json(dir, &["explain", "--pod", "demo/gw-gray", "10.96.40.2:53/udp"]);
    assert_eq!(ex["outcome"], "refused_strict", "{ex}");
    let ex = json(dir, &["explain", "--pod", "demo/gw-gray", "10.96.40.2:53/tcp"]);
    assert_eq!((ex["outcome"].as_str(), ex["frontend"].is_null()), (Some("not_service"), true));

    // Unknown pods and bad destinations are errors that say what to do.
    let out = tagger(dir, &["explain", "--pod", "demo/nope", "10.96.40.1:80"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("demo/nope"));
    let out = tagger(dir, &["explain", "--pod", "demo/gw-gray", "10.96.40.1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("IP:PORT"));
}

/// A stand-in for the agent's health endpoint inside a test network namespace: answers
/// `/readyz` with 200 to every connection until dropped.
struct FakeAgent {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeAgent {
    fn start(ns: &Netns, port: u16) -> Self {
        // A socket belongs to the namespace it was created in for its whole life: bind it from a
        // thread that entered the namespace, serve it from any thread.
        let listener = std::thread::scope(|s| {
            s.spawn(|| {
                ns.enter_current_thread();
                TcpListener::bind(("127.0.0.1", port)).expect("bind in the test netns")
            })
            .join()
            .expect("bind thread")
        });
        listener.set_nonblocking(true).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = std::sync::Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut sock, _)) => {
                        sock.set_nonblocking(false).unwrap();
                        sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                        let mut buf = [0u8; 1024];
                        let _ = sock.read(&mut buf);
                        let _ = sock.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nready\n");
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Self { stop, thread: Some(thread) }
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn status_reports_links_maps_config_and_the_agent() {
    let s = setup(true);
    let dir = s.sb.dp.dir();
    // The agent probe runs inside this namespace: nothing leaves the test's network.
    let ns = Netns::new(&unique_name("cli"));
    let _agent = FakeAgent::start(&ns, 9477);

    let out = tagger_in(Some(&ns), dir, &["status", "-o", "json"]);
    let st: Value = serde_json::from_str(&ok(&out, "status")).expect("status JSON");
    assert_eq!(st["healthy"], true, "{st}");
    assert_eq!(st["bpffs"], dir.display().to_string());
    let root = std::fs::canonicalize(s.sb.cgroup.path()).unwrap();
    let programs = st["programs"].as_array().unwrap();
    assert_eq!(programs.len(), tagger::datapath::PROGRAMS.len());
    for p in programs {
        assert_eq!(p["pinned"], true, "{p}");
        assert!(p["link_id"].as_u64() > Some(0) && p["program_id"].as_u64() > Some(0), "{p}");
        assert_eq!(p["cgroup_path"], root.display().to_string(), "{p}");
        let since = p["pinned_since_unix"].as_u64().expect("pinned since");
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        assert!(since <= now && now - since < 600, "{p}");
    }
    assert_eq!(find(&st["programs"], "program", &"connect4".into())["attach_type"], "cgroup_inet4_connect");
    let pods = find(&st["maps"], "map", &"TAGGER_PODS_V1".into());
    assert_eq!((pods["entries"].as_u64(), pods["capacity"].as_u64()), (Some(2), Some(16_384)), "{st}");
    assert_eq!(find(&st["maps"], "map", &"TAGGER_SVC_V1".into())["entries"], 2);
    let level = u64::from(TestCgroup::resolve(&s.gray.cgroup).level);
    assert_eq!(st["config"], serde_json::json!({"pod_level_min": level, "pod_level_max": level}));
    assert_eq!(
        (st["agent"]["reachable"].as_bool(), st["agent"]["ready"].as_bool()),
        (Some(true), Some(true))
    );

    let text = ok(&tagger_in(Some(&ns), dir, &["status"]), "status");
    println!("$ tagger status\n{text}");
    for want in [
        "healthy",
        "connect4",
        "TAGGER_PODS_V1",
        "agent at 127.0.0.1:9477: ready",
        &root.display().to_string(),
    ] {
        assert!(text.contains(want), "{want} missing: {text}");
    }

    // No agent answering is an answer, not an error.
    let out = tagger_in(Some(&ns), dir, &["status", "-o", "json", "--agent-addr", "127.0.0.1:9"]);
    let st: Value = serde_json::from_str(&ok(&out, "status without agent")).unwrap();
    assert_eq!(
        (st["agent"]["reachable"].as_bool(), st["agent"]["ready"].clone()),
        (Some(false), Value::Null)
    );

    // A missing link pin (detached program) makes status unhealthy, with exit code 1.
    std::fs::remove_file(dir.join("links/getpeername6")).unwrap();
    let out = tagger_in(Some(&ns), dir, &["status", "-o", "json", "--agent-addr", "127.0.0.1:9"]);
    assert_eq!(out.status.code(), Some(1));
    let st: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st["healthy"], false);
    assert_eq!(find(&st["programs"], "program", &"getpeername6".into())["pinned"], false);
    let out = tagger_in(Some(&ns), dir, &["status", "--agent-addr", "127.0.0.1:9"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("NOT ATTACHED"));
}

fn is_eperm(e: &tagger::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.downcast_ref::<std::io::Error>().and_then(std::io::Error::raw_os_error) == Some(libc::EPERM) {
            return true;
        }
        source = err.source();
    }
    false
}

#[test]
fn the_cli_handle_is_read_only() {
    let s = setup(true);
    let dir = s.sb.dp.dir();
    let before = s.sb.dp.dp.tables().frontends().unwrap();
    let sets_before = s.sb.dp.dp.tables().backend_sets().unwrap();

    let mut ro = Datapath::open_read_only(dir).expect("open read-only");
    let t = ro.tables_mut();
    // Reading works...
    assert_eq!(t.frontends().unwrap(), before);
    // ...every write is refused by the kernel.
    let new_key = frontend_key("10.96.40.9:80".parse().unwrap(), Proto::Tcp);
    let e = t.upsert_frontend(&new_key, Service { svc_id: 9, flags: 0 }).unwrap_err();
    assert!(is_eperm(&e), "insert: {e}");
    let existing = frontend_key(vip(), Proto::Tcp);
    let e = t.upsert_frontend(&existing, Service { svc_id: 1, flags: SVC_F_STRICT }).unwrap_err();
    assert!(is_eperm(&e), "update: {e}");
    let e = t.remove_frontend(&existing).unwrap_err();
    assert!(is_eperm(&e), "delete: {e}");
    let e = t.replace_backends(1, lane_id("gray"), &[tagger::net::backend(s.base_backend)]).unwrap_err();
    assert!(is_eperm(&e), "replace backends: {e}");
    let e = t.set_lane_name(lane_id("gray"), "changed").unwrap_err();
    assert!(is_eperm(&e), "lane name: {e}");
    drop(ro);

    // Nothing changed.
    let after = s.sb.dp.dp.tables();
    assert_eq!(after.frontends().unwrap(), before);
    assert_eq!(after.backend_sets().unwrap(), sets_before);
    assert_eq!(after.lane_names().unwrap().get(&lane_id("gray")).map(String::as_str), Some("gray"));
    // And traffic still flows as before.
    let g = s.sb.call(&s.gray, Mode::Tcp, vip(), 5);
    assert_eq!(replies(&g).into_keys().collect::<Vec<_>>(), ["a-gray"]);
}

/// A plain directory removed on drop (not on bpffs: the CLI must say no datapath is there).
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn a_missing_pin_directory_is_a_clear_error() {
    tagger_tests::require_root();
    let missing = std::env::temp_dir().join(unique_name("no-pins"));
    for args in [
        &["status"][..],
        &["pods"],
        &["services"],
        &["lanes"],
        &["stats"],
        &["explain", "--pod", "1", "10.0.0.1:80"],
    ] {
        let out = tagger(&missing, args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?} printed {}", String::from_utf8_lossy(&out.stdout));
        assert!(err.contains(&missing.display().to_string()), "{args:?}: {err}");
        assert!(err.contains("is the agent installed"), "{args:?}: {err}");
    }
    // A directory without the map pins names the first missing pin.
    let empty = TempDir(std::env::temp_dir().join(unique_name("empty-pins")));
    std::fs::create_dir(&empty.0).unwrap();
    let out = tagger(&empty.0, &["pods"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&empty.0.join("maps/TAGGER_PODS_V1").display().to_string()), "{err}");
}

#[test]
fn every_subcommand_explains_itself() {
    let mut seen = BTreeMap::new();
    for sub in ["status", "pods", "services", "lanes", "stats", "explain"] {
        let out = Command::new(workspace_bin("tagger")).args([sub, "--help"]).output().unwrap();
        let text = ok(&out, &format!("{sub} --help"));
        assert!(text.contains("--bpffs") && text.contains("--output"), "{sub}: {text}");
        seen.insert(sub, text.lines().next().unwrap_or_default().to_owned());
    }
    assert!(seen.values().all(|first| first.len() > 20), "{seen:?}");
    let out = Command::new(workspace_bin("tagger")).arg("--help").output().unwrap();
    assert!(ok(&out, "--help").contains("read-only"));
}

/// `tagger status` reads link pins with nothing but `BPF_OBJ_GET` and info queries: it works on
/// a read-only bind mount of the pins (in a private mount namespace of its own). The kernel
/// refuses read-only descriptors of links (`EINVAL`), which is why the CLI's open falls back to
/// flags 0: if a kernel ever allows them, this test says so, and the fallback is unused there.
#[test]
fn status_reads_link_pins_on_a_read_only_mount() {
    let s = setup(true);
    let dir = s.sb.dp.dir();
    let pin = dir.join("links/connect4");
    let e = tagger::sys::obj_get(&pin, tagger::sys::BPF_F_RDONLY).expect_err("a read-only link descriptor");
    assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{e}");
    assert!(tagger::sys::link_info(&pin).is_ok_and(|i| i.link_id > 0));

    let ro = std::env::temp_dir().join(unique_name("tagger-ro-pins"));
    std::fs::create_dir_all(&ro).unwrap();
    let script = format!(
        "set -e; mount --bind '{dir}' '{ro}'; mount -o remount,bind,ro '{ro}'; \
         if touch '{ro}/probe' 2>/dev/null; then echo 'the mount is writable'; exit 99; fi; \
         exec '{bin}' --bpffs '{ro}' status -o json --agent-addr 127.0.0.1:9",
        dir = dir.display(),
        ro = ro.display(),
        bin = workspace_bin("tagger").display()
    );
    let out =
        Command::new("unshare").args(["--mount", "--propagation", "private", "sh", "-c", &script]).output();
    let _ = std::fs::remove_dir(&ro);
    let out = out.expect("unshare");
    let st: Value = serde_json::from_str(&ok(&out, "status on a read-only mount")).expect("status JSON");
    assert_eq!(st["healthy"], true, "{st}");
    for p in st["programs"].as_array().unwrap() {
        assert!(p["pinned"] == true && p["link_id"].as_u64() > Some(0), "{p}");
    }
}
