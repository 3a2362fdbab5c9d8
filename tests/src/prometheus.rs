//! A real Prometheus (Debian's `prometheus`) for the tests: started on 127.0.0.1 with its own
//! storage in a scratch directory, scraping given targets every second; stopped (by its pid) and
//! removed on drop.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::agent::TempDir;

/// A running Prometheus.
pub struct Prometheus {
    child: Child,
    port: u16,
    dir: TempDir,
}

impl Prometheus {
    /// Whether the binary is installed (`cargo xtask test` installs it).
    #[must_use]
    pub fn installed() -> bool {
        Command::new("prometheus").arg("--version").output().is_ok_and(|o| o.status.success())
    }

    /// Starts Prometheus scraping `targets` (`127.0.0.1:PORT` each) every second as job
    /// `tagger`, and waits until its API answers.
    ///
    /// # Panics
    /// If it does not start within 20 s.
    #[must_use]
    pub fn start(targets: &[String]) -> Self {
        let dir = TempDir::new();
        let list: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n- job_name: tagger\n  \
             static_configs:\n  - targets: [{}]\n",
            list.join(", ")
        );
        std::fs::write(dir.0.join("prometheus.yml"), config).unwrap();
        // Port 0: Prometheus binds an ephemeral port itself and logs it ("Listening on"), so no
        // other test can take a port picked here before Prometheus binds it.
        let log = std::fs::File::create(dir.0.join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", dir.0.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.0.join("data").display()))
            .arg("--web.listen-address=127.0.0.1:0")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        let mut p = Self { child, port: 0, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while p.port == 0 {
            p.port = p
                .log()
                .lines()
                .filter(|l| l.contains("msg=\"Listening on\""))
                .find_map(|l| l.split("address=127.0.0.1:").nth(1)?.split_whitespace().next()?.parse().ok())
                .unwrap_or(0);
            assert!(Instant::now() < deadline, "prometheus never said where it listens:\n{}", p.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        while p.get("/-/ready").is_none_or(|(code, _)| code != 200) {
            assert!(Instant::now() < deadline, "prometheus never became ready:\n{}", p.log());
            std::thread::sleep(Duration::from_millis(100));
        }
        p
    }

    /// The port its HTTP API listens on (127.0.0.1).
    #[must_use]
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its log.
    #[must_use]
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("prometheus.log")).unwrap_or_default()
    }

    /// An instant query through the HTTP API: the result vector (or matrix, scalar) as JSON.
    ///
    /// # Panics
    /// If the query is refused (a PromQL error names it).
    #[must_use]
    pub fn query(&self, promql: &str) -> Vec<Value> {
        let (code, body) = self
            .get(&format!("/api/v1/query?query={}", tagger::coverage::prometheus::percent_encode(promql)))
            .expect("prometheus answers");
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
        assert_eq!((code, v["status"].as_str()), (200, Some("success")), "query {promql}: {body}");
        match &v["data"]["result"] {
            Value::Array(a) => a.clone(),
            other => vec![other.clone()],
        }
    }

    /// `GET path` over HTTP/1.0 (a whole, unchunked answer): status code and body.
    fn get(&self, path: &str) -> Option<(u16, String)> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        let (head, body) = text.split_once("\r\n\r\n")?;
        let code = head.split_whitespace().nth(1)?.parse().ok()?;
        Some((code, body.to_owned()))
    }

    /// The scratch directory (config, data, log).
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir.0
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
