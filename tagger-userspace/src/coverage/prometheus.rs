//! What the whole cluster observed, from a Prometheus that scrapes every node's agent: three
//! PromQL queries over the series the agents export (see [`super::series`]), summed over nodes.
//! Prometheus is the engine that already aggregates a cluster; tagger only asks it.
//!
//! Plain HTTP only (`http://host:port[/prefix]`, e.g. through `kubectl port-forward`); the
//! answer is read whole (HTTP/1.0, no chunking) up to [`MAX_ANSWER`].

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{TcpStream, ToSocketAddrs as _},
    time::Duration,
};

use anyhow::{Context as _, anyhow, bail};
use serde::Deserialize;
use serde_json::Value;

use super::{
    Observed,
    series::{self, ArrivalLabels, EdgeLabels, LaneBackendLabels},
};

/// Largest answer read (a cluster's edges are a few thousand series).
pub const MAX_ANSWER: u64 = 64 << 20;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// A Prometheus HTTP API endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// `host:port`.
    authority: String,
    /// Path prefix without a trailing slash (empty, or e.g. `/prometheus`).
    prefix: String,
}

impl Endpoint {
    /// Parses `http://host[:port][/prefix]` (port 80 by default).
    ///
    /// # Errors
    /// Another scheme, or no host.
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        let rest = match url.split_once("://") {
            Some(("http", rest)) => rest,
            Some((scheme, _)) => bail!(
                "--prometheus {url}: only http:// is supported (not {scheme}://); reach an HTTPS or \
                 authenticated Prometheus through `kubectl port-forward` or a local proxy"
            ),
            None => bail!("--prometheus {url}: expected http://host:port"),
        };
        let (authority, prefix) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
        if authority.is_empty() || authority.contains('@') {
            bail!("--prometheus {url}: expected http://host:port (no credentials in the URL)");
        }
        let authority = if authority.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok())
            && !authority.ends_with(']')
        {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        let prefix = prefix.trim_end_matches('/');
        let prefix = if prefix.is_empty() { String::new() } else { format!("/{prefix}") };
        Ok(Self { authority, prefix })
    }

    /// An instant query: the result vector's samples as (labels, value).
    ///
    /// # Errors
    /// Prometheus unreachable, an HTTP or PromQL error (named), or an answer that is no vector.
    pub fn query(&self, promql: &str) -> anyhow::Result<Vec<(serde_json::Map<String, Value>, f64)>> {
        let path = format!("{}/api/v1/query?query={}", self.prefix, percent_encode(promql));
        let (code, body) = self.get(&path)?;
        let answer: Answer = serde_json::from_str(&body).with_context(|| {
            format!("prometheus answered HTTP {code} with no API document: {}", excerpt(&body))
        })?;
        if answer.status != "success" {
            bail!(
                "prometheus refused `{promql}` (HTTP {code}): {}: {}",
                answer.error_type.unwrap_or_default(),
                answer.error.unwrap_or_default()
            );
        }
        let data = answer.data.ok_or_else(|| anyhow!("prometheus answered `{promql}` without data"))?;
        if data.result_type != "vector" {
            bail!("prometheus answered `{promql}` with a {}, not a vector", data.result_type);
        }
        data.result
            .into_iter()
            .map(|s| {
                let value =
                    s.value.1.parse::<f64>().with_context(|| format!("sample value {:?}", s.value.1))?;
                Ok((s.metric, value))
            })
            .collect()
    }

    /// `GET path` over HTTP/1.0: status code and body.
    fn get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        let addr = self
            .authority
            .to_socket_addrs()
            .with_context(|| format!("resolving {}", self.authority))?
            .next()
            .ok_or_else(|| anyhow!("{} resolves to no address", self.authority))?;
        let mut s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
            .with_context(|| format!("connecting to prometheus at {addr}"))?;
        s.set_read_timeout(Some(READ_TIMEOUT))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: {}\r\nAccept: application/json\r\n\r\n", self.authority)?;
        let mut raw = Vec::new();
        s.take(MAX_ANSWER + 1).read_to_end(&mut raw).context("reading prometheus's answer")?;
        if raw.len() as u64 > MAX_ANSWER {
            bail!("prometheus's answer exceeds {} MiB", MAX_ANSWER >> 20);
        }
        let text = String::from_utf8_lossy(&raw);
        let (head, body) =
            text.split_once("\r\n\r\n").ok_or_else(|| anyhow!("no HTTP answer from {}", self.authority))?;
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| anyhow!("no HTTP status from {}: {}", self.authority, excerpt(head)))?;
        Ok((code, body.to_owned()))
    }
}

#[derive(Deserialize)]
struct Answer {
    status: String,
    #[serde(rename = "errorType")]
    error_type: Option<String>,
    error: Option<String>,
    data: Option<Data>,
}

#[derive(Deserialize)]
struct Data {
    #[serde(rename = "resultType")]
    result_type: String,
    #[serde(default)]
    result: Vec<Sample>,
}

#[derive(Deserialize)]
struct Sample {
    #[serde(default)]
    metric: serde_json::Map<String, Value>,
    value: (Value, String),
}

fn excerpt(s: &str) -> String {
    s.chars().take(200).collect()
}

/// Percent-encoding of a query parameter's value.
#[must_use]
pub fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The PromQL of each series: summed over nodes (and their ports), totals since each agent
/// started, or their increase over `window` (a PromQL duration such as `15m`).
#[must_use]
pub fn queries(window: Option<&str>) -> [String; 3] {
    let total = |series: &str, by: &str| {
        let name = series::full_name(series);
        match window {
            Some(w) => format!("sum by ({by}) (increase({name}[{w}]))"),
            None => format!("sum by ({by}) ({name})"),
        }
    };
    [
        total(
            series::EDGES,
            "caller_kind, caller_namespace, caller, caller_lane, namespace, service, backend_lane, outcome",
        ),
        total(series::ARRIVALS, "receiver_kind, receiver_namespace, receiver, pod_lane, caller_lane, kind"),
        format!("max by (namespace, service, lane) ({})", series::full_name(series::LANE_BACKENDS)),
    ]
}

/// Whether a PromQL duration: digits and a unit, repeated (`90s`, `1h30m`).
#[must_use]
pub fn is_duration(s: &str) -> bool {
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let Some(unit) =
            ["ms", "s", "m", "h", "d", "w", "y"].iter().find(|u| rest[digits..].starts_with(**u))
        else {
            return false;
        };
        if digits == 0 {
            return false;
        }
        rest = &rest[digits + unit.len()..];
    }
    !s.is_empty()
}

/// A sample's labels as one of the series' label sets.
fn labels<T: serde::de::DeserializeOwned>(m: serde_json::Map<String, Value>) -> serde_json::Result<T> {
    serde_json::from_value(Value::Object(m))
}

/// Reads the cluster's coverage rows.
///
/// # Errors
/// See [`Endpoint::query`].
pub fn observe(endpoint: &Endpoint, window: Option<&str>) -> anyhow::Result<Observed> {
    let [edges_q, arrivals_q, backends_q] = queries(window);
    let count = |v: f64| {
        // Counters are whole numbers; `increase` extrapolates, so round.
        #[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "rounded, clamped at 0")]
        let n = v.max(0.0).round() as u64;
        n
    };
    let mut edges = Vec::new();
    for (m, v) in endpoint.query(&edges_q)? {
        let l: EdgeLabels = labels(m).context("edge series labels")?;
        edges.extend(l.edge(count(v)));
    }
    let mut arrivals = Vec::new();
    for (m, v) in endpoint.query(&arrivals_q)? {
        let l: ArrivalLabels = labels(m).context("arrival series labels")?;
        arrivals.extend(l.arrival(count(v)));
    }
    let mut lane_backends = BTreeMap::<super::Peer, BTreeMap<String, u64>>::new();
    for (m, v) in endpoint.query(&backends_q)? {
        let l: LaneBackendLabels = labels(m).context("backend series labels")?;
        lane_backends
            .entry(super::Peer::service(&l.namespace, &l.service))
            .or_default()
            .insert(l.lane, count(v));
    }
    // Merged and sorted by `coverage::report`.
    Ok(Observed { edges, arrivals, lane_backends })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        let e = Endpoint::parse("http://prom.monitoring:9090").unwrap();
        assert_eq!((e.authority.as_str(), e.prefix.as_str()), ("prom.monitoring:9090", ""));
        let e = Endpoint::parse("http://127.0.0.1:9090/prometheus/").unwrap();
        assert_eq!((e.authority.as_str(), e.prefix.as_str()), ("127.0.0.1:9090", "/prometheus"));
        assert_eq!(Endpoint::parse("http://prom").unwrap().authority, "prom:80");
        assert_eq!(Endpoint::parse("http://[::1]:9090").unwrap().authority, "[::1]:9090");
        assert_eq!(Endpoint::parse("http://[::1]").unwrap().authority, "[::1]:80");
        for bad in ["https://prom:9090", "prom:9090", "http://", "http://user:pw@prom:9090"] {
            let e = Endpoint::parse(bad).unwrap_err().to_string();
            assert!(e.contains("--prometheus"), "{bad}: {e}");
        }
        assert!(Endpoint::parse("https://p").unwrap_err().to_string().contains("port-forward"));
    }

    #[test]
    fn durations() {
        for ok in ["15m", "1h", "90s", "1h30m", "500ms", "2d"] {
            assert!(is_duration(ok), "{ok}");
        }
        for bad in ["", "15", "m", "1x", "1h 2m", "-5m", "1.5h"] {
            assert!(!is_duration(bad), "{bad}");
        }
    }

    #[test]
    fn queries_sum_over_nodes() {
        let [e, a, b] = queries(None);
        assert_eq!(
            e,
            "sum by (caller_kind, caller_namespace, caller, caller_lane, namespace, service, backend_lane, outcome) \
             (tagger_lane_edges_total)"
        );
        assert!(
            a.starts_with("sum by (receiver_kind,") && a.ends_with("(tagger_lane_arrivals_total)"),
            "{a}"
        );
        assert_eq!(b, "max by (namespace, service, lane) (tagger_service_lane_backends)");
        let [e, ..] = queries(Some("15m"));
        assert!(e.ends_with("(increase(tagger_lane_edges_total[15m]))"), "{e}");
    }

    #[test]
    fn missing_labels_read_as_empty() {
        let m = serde_json::json!({"receiver_kind": "service", "receiver": "b", "pod_lane": "base", "kind": "untagged"});
        let l: ArrivalLabels = serde_json::from_value(m).unwrap();
        let a = l.arrival(3).unwrap();
        assert_eq!((a.caller_lane.as_str(), a.receiver.namespace.as_str(), a.connections), ("", "", 3));
    }
}
