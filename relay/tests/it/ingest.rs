//! `saiki-relay ingest` (issue #15) over real HTTP, spoken by curl (HTTP/1.1 and HTTP/2),
//! with its registry in a real PostgreSQL and its events read back from tansu.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::*;
use saiki_tests::{loopback_port, Broker, PgCluster};

const ADMIN: &str = "test-admin-token-0123456789";
const TOPIC: &str = "saiki.events.parcel.packed";

/// A response: status, body, and the `x-flow-id` header.
struct Answer {
    status: u16,
    body: String,
    flow_id: Option<String>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: not JSON: {}", self.body))
    }
}

/// One request with curl (`--http2-prior-knowledge` with `h2`).
fn curl(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&[u8]>,
    extra: &[&str],
) -> Answer {
    let dir = std::env::temp_dir().join(format!("saiki-curl-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (out, hdr) = (dir.join("body"), dir.join("headers"));
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-S", "--max-time", "30", "-X", method])
        .arg("-o")
        .arg(&out)
        .arg("-D")
        .arg(&hdr)
        .args(["-w", "%{http_code}"])
        .args(extra)
        .arg(format!("http://127.0.0.1:{port}{path}"));
    if let Some(t) = token {
        cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    if body.is_some() {
        cmd.args([
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            "@-",
        ]);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("curl");
    let mut stdin = child.stdin.take().unwrap();
    if let Some(b) = body {
        stdin.write_all(b).unwrap();
    }
    drop(stdin);
    let o = child.wait_with_output().unwrap();
    let status: u16 = String::from_utf8_lossy(&o.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    let headers = std::fs::read_to_string(&hdr).unwrap_or_default();
    let flow_id = headers.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("x-flow-id")
            .then(|| v.trim().to_string())
    });
    Answer {
        status,
        body: std::fs::read_to_string(&out).unwrap_or_default(),
        flow_id,
    }
}

fn ingest_config(pg: &PgCluster, broker: &Broker, api: u16, http: u16, extra: &str) -> String {
    format!(
        r#"[ingest]
dsn = "host=127.0.0.1 port={} user=postgres dbname=registry"
admin_token = "{ADMIN}"
listen = "127.0.0.1:{api}"
registry_cache = "100ms"
max_body_bytes = 65536
max_batch_events = 50
{extra}

[kafka]
brokers = "{}"
topic_prefix = "saiki"

[http]
listen = "127.0.0.1:{http}"
"#,
        pg.port,
        broker.addr()
    )
}

/// Waits until the API answers.
fn wait_api(api: u16, relay: &Relay) {
    wait_until(Duration::from_secs(60), relay, || {
        let a = curl(api, "GET", "/event-types", Some(ADMIN), None, &[]);
        (a.status != 200).then(|| format!("GET /event-types: {} {}", a.status, a.body))
    });
}

fn parcel_type() -> Value {
    json!({
        "name": "parcel.packed",
        "owning_team": "warehouse",
        "schema": {
            "type": "object",
            "required": ["parcel_id", "warehouse"],
            "properties": {
                "parcel_id": {"type": "string"},
                "warehouse": {"type": "string"},
                "items": {"type": "integer", "minimum": 1}
            }
        },
        "partition_key": ["/parcel_id"],
        "compatibility": "forward"
    })
}

fn body(v: &Value) -> Vec<u8> {
    v.to_string().into_bytes()
}

#[test]
fn event_types_are_registered_and_their_valid_batches_reach_kafka_whole() {
    let pg = PgCluster::start(&[]);
    let _registry = pg.create_db("registry");
    let broker = Broker::start();
    let (api, http) = (loopback_port(), loopback_port());
    let mut relay = Relay::start_ingest(&pg.dir, &ingest_config(&pg, &broker, api, http, ""), http);
    wait_api(api, &relay);

    // Registering: admin only, a valid schema, no duplicate.
    let t = body(&parcel_type());
    assert_eq!(
        curl(api, "POST", "/event-types", None, Some(&t), &[]).status,
        401
    );
    let created = curl(api, "POST", "/event-types", Some(ADMIN), Some(&t), &[]);
    assert_eq!(created.status, 201, "{}", created.body);
    assert_eq!(created.json()["schema_version"], 1);
    assert_eq!(
        curl(api, "POST", "/event-types", Some(ADMIN), Some(&t), &[]).status,
        409
    );
    let mut bad = parcel_type();
    bad["name"] = json!("bad.schema");
    bad["schema"] = json!({"type": 12});
    let refused = curl(
        api,
        "POST",
        "/event-types",
        Some(ADMIN),
        Some(&body(&bad)),
        &[],
    );
    assert_eq!(refused.status, 422, "{}", refused.body);
    assert!(refused.json()["detail"]
        .as_str()
        .unwrap()
        .contains("not a valid JSON Schema"));
    let got = curl(
        api,
        "GET",
        "/event-types/parcel.packed",
        Some(ADMIN),
        None,
        &[],
    );
    assert_eq!(got.json()["partition_key"], json!(["/parcel_id"]));
    assert_eq!(
        curl(api, "GET", "/event-types/nope", Some(ADMIN), None, &[]).status,
        404
    );

    // Tokens with scopes.
    let token = |scopes: Value| {
        let a = curl(
            api,
            "POST",
            "/tokens",
            Some(ADMIN),
            Some(&body(&json!({"scopes": scopes}))),
            &[],
        );
        assert_eq!(a.status, 201, "{}", a.body);
        a.json()["token"].as_str().unwrap().to_string()
    };
    let writer = token(json!(["write:parcel.packed"]));
    let reader = token(json!(["read"]));
    let bad_scope = curl(
        api,
        "POST",
        "/tokens",
        Some(ADMIN),
        Some(br#"{"scopes":["delete"]}"#),
        &[],
    );
    assert_eq!(bad_scope.status, 422);
    assert_eq!(
        curl(api, "GET", "/event-types", Some(&reader), None, &[]).status,
        200
    );
    assert_eq!(
        curl(api, "GET", "/event-types", Some("sk_unknown"), None, &[]).status,
        401
    );
    assert_eq!(
        curl(api, "POST", "/event-types", Some(&writer), Some(&t), &[]).status,
        403
    );

    // A valid batch: 200 only once Kafka has it, metadata added, keyed by the partition key.
    let eid = "8e4ed6a2-5c3b-4a0e-9d5c-4c1f6c2a7b10";
    let batch = json!([
        {"parcel_id": "P1", "warehouse": "BER", "items": 2,
         "metadata": {"eid": eid, "occurred_at": "2026-11-30T23:59:59+01:00"}},
        {"parcel_id": "P2", "warehouse": "BER"},
        {"parcel_id": "P3", "warehouse": "HAM", "items": 1}
    ]);
    let path = "/event-types/parcel.packed/events";
    assert_eq!(
        curl(api, "POST", path, Some(&reader), Some(&body(&batch)), &[]).status,
        403
    );
    assert_eq!(
        curl(api, "POST", path, None, Some(&body(&batch)), &[]).status,
        401
    );
    let ok = curl(
        api,
        "POST",
        path,
        Some(&writer),
        Some(&body(&batch)),
        &["-H", "X-Flow-Id: f-42"],
    );
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(ok.flow_id.as_deref(), Some("f-42"));
    let msgs = consume(&broker.addr(), &[TOPIC], 3, Duration::from_secs(5));
    assert_eq!(msgs.len(), 3, "{}", relay.log_text());
    let first = msgs.iter().find(|m| m.json()["parcel_id"] == "P1").unwrap();
    assert_eq!(first.key.as_deref(), Some(&br#"["P1"]"#[..]));
    let meta = &first.json()["metadata"];
    assert_eq!(meta["eid"], eid);
    assert_eq!(meta["occurred_at"], "2026-11-30T23:59:59+01:00");
    assert_eq!(
        (&meta["event_type"], &meta["version"], &meta["flow_id"]),
        (&json!("parcel.packed"), &json!("1"), &json!("f-42"))
    );
    assert!(meta["received_at"]
        .as_str()
        .is_some_and(|s| s.ends_with('Z')));
    assert_eq!(first.headers["saiki.eid"], eid);
    let second = msgs
        .iter()
        .find(|m| m.json()["parcel_id"] == "P2")
        .unwrap()
        .json();
    assert!(uuid_like(second["metadata"]["eid"].as_str().unwrap()));
    assert_eq!(
        second["metadata"]["occurred_at"],
        second["metadata"]["received_at"]
    );

    // A retry of an acknowledged event (same eid) is answered 200 and not produced again;
    // so is an eid given twice in one batch.
    let retry = json!([batch[0].clone(), batch[0].clone()]);
    let again = curl(api, "POST", path, Some(&writer), Some(&body(&retry)), &[]);
    assert_eq!(again.status, 200, "{}", again.body);

    // One bad event refuses the whole batch, with a report of every event.
    let mixed = json!([
        {"parcel_id": "P4", "warehouse": "BER"},
        {"parcel_id": "P5"},
        {"parcel_id": "P6", "warehouse": "BER", "items": 0, "metadata": {"eid": "not-a-uuid"}},
        [1]
    ]);
    let refused = curl(api, "POST", path, Some(&writer), Some(&body(&mixed)), &[]);
    assert_eq!(refused.status, 422, "{}", refused.body);
    let report = refused.json();
    let status: Vec<&str> = report
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["publishing_status"].as_str().unwrap())
        .collect();
    assert_eq!(status, ["aborted", "failed", "failed", "failed"]);
    assert!(
        report[1]["detail"].as_str().unwrap().contains("warehouse"),
        "{report}"
    );
    let pointers: Vec<&str> = report[2]["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["pointer"].as_str().unwrap())
        .collect();
    assert!(
        pointers.contains(&"/metadata/eid") && pointers.contains(&"/items"),
        "{pointers:?}"
    );

    // Bad bodies: a clear 4xx each, nothing produced.
    assert_eq!(
        curl(api, "POST", path, Some(&writer), Some(b"{not json"), &[]).status,
        400
    );
    assert_eq!(
        curl(
            api,
            "POST",
            path,
            Some(&writer),
            Some(br#"{"parcel_id":"P"}"#),
            &[]
        )
        .status,
        400
    );
    let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    assert_eq!(
        curl(api, "POST", path, Some(&writer), Some(deep.as_bytes()), &[]).status,
        400
    );
    let huge = json!([{"parcel_id": "P", "warehouse": "x".repeat(70_000)}]);
    assert_eq!(
        curl(api, "POST", path, Some(&writer), Some(&body(&huge)), &[]).status,
        413
    );
    let many: Vec<Value> = (0..51)
        .map(|i| json!({"parcel_id": format!("M{i}"), "warehouse": "BER"}))
        .collect();
    assert_eq!(
        curl(
            api,
            "POST",
            path,
            Some(&writer),
            Some(&body(&json!(many))),
            &[]
        )
        .status,
        413
    );
    let unknown = curl(
        api,
        "POST",
        "/event-types/nope/events",
        Some(ADMIN),
        Some(b"[]"),
        &[],
    );
    assert_eq!(unknown.status, 404);

    // A compatible schema change makes version 2; a breaking one is refused with what breaks.
    let mut v2 = parcel_type();
    v2["schema"]["properties"]["note"] = json!({"type": "string"});
    let put = curl(
        api,
        "PUT",
        "/event-types/parcel.packed",
        Some(ADMIN),
        Some(&body(&v2)),
        &[],
    );
    assert_eq!(
        (put.status, &put.json()["schema_version"]),
        (200, &json!(2)),
        "{}",
        put.body
    );
    let mut v3 = v2.clone();
    v3["schema"]["required"] = json!(["parcel_id", "warehouse", "carrier"]);
    let breaking = curl(
        api,
        "PUT",
        "/event-types/parcel.packed",
        Some(ADMIN),
        Some(&body(&v3)),
        &[],
    );
    assert_eq!(breaking.status, 422, "{}", breaking.body);
    assert!(breaking.json()["breaks"][0]
        .as_str()
        .unwrap()
        .starts_with("/carrier: newly required"));

    // Over HTTP/2 (cleartext, prior knowledge), with the new version.
    let later = json!([{"parcel_id": "P7", "warehouse": "HAM", "note": "fragile"}]);
    std::thread::sleep(Duration::from_millis(200)); // the registry cache (100 ms)
    let h2 = curl(
        api,
        "POST",
        path,
        Some(&writer),
        Some(&body(&later)),
        &["--http2-prior-knowledge"],
    );
    assert_eq!(h2.status, 200, "{}", h2.body);
    let msgs = consume(&broker.addr(), &[TOPIC], 5, Duration::from_secs(5));
    assert_eq!(msgs.len(), 4, "only the valid batches are in Kafka");
    let last = msgs
        .iter()
        .find(|m| m.json()["parcel_id"] == "P7")
        .unwrap()
        .json();
    assert_eq!(last["metadata"]["version"], "2");

    let metrics = relay.http_get("/metrics").unwrap_or_default();
    assert_eq!(
        metric(&metrics, "saiki_ingest_events_published_total"),
        Some(4.0),
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "saiki_ingest_events_rejected_total"),
        Some(4.0 + 1.0 + 51.0),
        "{metrics}"
    );
    assert!(relay.terminate(Duration::from_secs(30)).success());
}

#[test]
fn a_broker_outage_is_answered_503_and_publishing_resumes_after_it() {
    let pg = PgCluster::start(&[]);
    let _registry = pg.create_db("registry");
    let mut broker = Broker::start();
    let (api, http) = (loopback_port(), loopback_port());
    let relay = Relay::start_ingest(
        &pg.dir,
        &ingest_config(
            &pg,
            &broker,
            api,
            http,
            "ack_timeout = \"3s\"\nmax_in_flight_events = 50",
        ),
        http,
    );
    wait_api(api, &relay);
    assert_eq!(
        curl(
            api,
            "POST",
            "/event-types",
            Some(ADMIN),
            Some(&body(&parcel_type())),
            &[]
        )
        .status,
        201
    );
    let path = "/event-types/parcel.packed/events";
    let one = |id: &str| body(&json!([{"parcel_id": id, "warehouse": "BER"}]));
    assert_eq!(
        curl(api, "POST", path, Some(ADMIN), Some(&one("A")), &[]).status,
        200
    );

    broker.stop();
    // A batch that fills the in-flight window waits for Kafka; meanwhile another is told 429.
    let full: Vec<Value> = (0..50)
        .map(|i| json!({"parcel_id": format!("B{i}"), "warehouse": "BER"}))
        .collect();
    let waiting = std::thread::spawn(move || {
        curl(
            api,
            "POST",
            path,
            Some(ADMIN),
            Some(&body(&json!(full))),
            &[],
        )
    });
    std::thread::sleep(Duration::from_millis(800));
    let throttled = curl(api, "POST", path, Some(ADMIN), Some(&one("X")), &[]);
    assert_eq!(throttled.status, 429, "{}", throttled.body);
    let down = waiting.join().unwrap();
    assert_eq!(down.status, 503, "{}", down.body);
    assert!(down.json()["detail"].as_str().unwrap().contains("retry"));

    broker.restart();
    let started = Instant::now();
    loop {
        let a = curl(api, "POST", path, Some(ADMIN), Some(&one("C")), &[]);
        if a.status == 200 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "still {} after the broker came back: {}\n{}",
            a.status,
            a.body,
            relay.log_text()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // The B batch was answered 503: its events may or may not have reached Kafka after the
    // restart.
    let ids: Vec<String> = consume(&broker.addr(), &[TOPIC], 60, Duration::from_secs(5))
        .iter()
        .map(|m| m.json()["parcel_id"].as_str().unwrap().to_string())
        .collect();
    assert!(
        ids.contains(&"A".to_string()) && ids.contains(&"C".to_string()),
        "{ids:?}"
    );
    assert!(!ids.contains(&"X".to_string()), "a 429 produces nothing");
    let metrics = relay.http_get("/metrics").unwrap_or_default();
    assert_eq!(
        metric(&metrics, "saiki_ingest_throttled_total"),
        Some(1.0),
        "{metrics}"
    );
}

fn uuid_like(s: &str) -> bool {
    s.len() == 36 && s.chars().filter(|c| *c == '-').count() == 4
}
