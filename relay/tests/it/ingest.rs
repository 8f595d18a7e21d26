//! `saiki-relay ingest` (issue #15) over real HTTP, spoken by curl (HTTP/1.1 and HTTP/2),
//! with its registry in a real PostgreSQL and its events read back from tansu.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::*;
use saiki_tests::{loopback_port, Broker, PgCluster};

pub(crate) const ADMIN: &str = "test-admin-token-0123456789";
const TOPIC: &str = "saiki.events.parcel.packed";

/// A response: status, body, and the `x-flow-id` header.
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) body: String,
    flow_id: Option<String>,
    /// `1.1` or `2`.
    http_version: String,
}

impl Answer {
    pub(crate) fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: not JSON: {}", self.body))
    }
}

/// One request with curl to `http://127.0.0.1:{port}{path}`.
pub(crate) fn curl(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&[u8]>,
    extra: &[&str],
) -> Answer {
    request(
        &format!("http://127.0.0.1:{port}{path}"),
        method,
        token,
        body,
        extra,
    )
}

/// One request with curl; `-w` reports the status code and the HTTP version.
fn request(
    url: &str,
    method: &str,
    token: Option<&str>,
    body: Option<&[u8]>,
    extra: &[&str],
) -> Answer {
    let dir = std::env::temp_dir().join(format!(
        "saiki-curl-{}-{}",
        std::process::id(),
        loopback_port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let (out, hdr) = (dir.join("body"), dir.join("headers"));
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-S", "--max-time", "30", "-X", method])
        .arg("-o")
        .arg(&out)
        .arg("-D")
        .arg(&hdr)
        .args(["-w", "%{http_code} %{http_version}"])
        .args(extra)
        .arg(url);
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
    let w = String::from_utf8_lossy(&o.stdout).into_owned();
    let mut w = w.split_whitespace();
    let status: u16 = w.next().and_then(|c| c.parse().ok()).unwrap_or(0);
    let http_version = w.next().unwrap_or_default().to_string();
    let headers = std::fs::read_to_string(&hdr).unwrap_or_default();
    let flow_id = headers.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("x-flow-id")
            .then(|| v.trim().to_string())
    });
    let answer = Answer {
        status,
        body: std::fs::read_to_string(&out).unwrap_or_default(),
        flow_id,
        http_version,
    };
    let _ = std::fs::remove_dir_all(&dir);
    answer
}

pub(crate) fn ingest_config(
    pg: &PgCluster,
    broker: &Broker,
    api: u16,
    http: u16,
    extra: &str,
) -> String {
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
pub(crate) fn wait_api(api: u16, relay: &Relay) {
    wait_until(Duration::from_secs(60), relay, || {
        let a = curl(api, "GET", "/event-types", Some(ADMIN), None, &[]);
        (a.status != 200).then(|| format!("GET /event-types: {} {}", a.status, a.body))
    });
}

pub(crate) fn parcel_type() -> Value {
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

pub(crate) fn body(v: &Value) -> Vec<u8> {
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

#[test]
fn the_sink_materializes_events_appended_by_eid_or_upserted_by_key_exactly_once() {
    let pg = PgCluster::start(&[]);
    let mut ods = pg.create_db("ods");
    let broker = Broker::start();
    let (api, http) = (loopback_port(), loopback_port());
    // The registry lives in the ODS database, as by default.
    let icfg = ingest_config(&pg, &broker, api, http, "").replace("dbname=registry", "dbname=ods");
    let ingest = Relay::start_ingest(&pg.dir, &icfg, http);
    wait_api(api, &ingest);
    let post = |path: &str, v: &Value| curl(api, "POST", path, Some(ADMIN), Some(&body(v)), &[]);

    let mut parcels = parcel_type();
    parcels["schema"]["properties"]["packed_at"] = json!({"type": "string", "format": "date-time"});
    parcels["schema"]["properties"]["tags"] = json!({"type": "array", "items": {"type": "string"}});
    assert_eq!(post("/event-types", &parcels).status, 201);
    let stock = json!({
        "name": "stock.level", "owning_team": "warehouse", "key": ["/sku"],
        "schema": {"type": "object", "required": ["sku", "level"],
                   "properties": {"sku": {"type": "string"}, "level": {"type": "integer"}}}
    });
    let created = post("/event-types", &stock);
    assert_eq!(created.status, 201, "{}", created.body);
    // Partitioned by the key unless told otherwise, so that a key's events keep their order.
    assert_eq!(created.json()["partition_key"], json!(["/sku"]));

    // What the ODS could not hold is refused when the type is registered.
    let mut bad = stock.clone();
    bad["name"] = json!("stock.bad");
    bad["key"] = json!(["/level"]);
    bad["schema"]["required"] = json!(["sku"]);
    let r = post("/event-types", &bad);
    assert_eq!(r.status, 422, "{}", r.body);
    assert!(r.body.contains("required"), "{}", r.body);
    bad["key"] = json!(["/sku"]);
    bad["partition_key"] = json!(["/level"]);
    assert_eq!(post("/event-types", &bad).status, 422);
    let mut clash = parcel_type();
    clash["name"] = json!("parcel_packed");
    let r = post("/event-types", &clash);
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(r.body.contains("ev_parcel_packed"), "{}", r.body);
    let mut reserved = parcel_type();
    reserved["name"] = json!("parcel.other");
    reserved["schema"]["properties"]["eid"] = json!({"type": "string"});
    assert_eq!(post("/event-types", &reserved).status, 422);
    let mut rekey = stock.clone();
    rekey["key"] = json!(["/sku", "/level"]);
    let r = curl(
        api,
        "PUT",
        "/event-types/stock.level",
        Some(ADMIN),
        Some(&body(&rekey)),
        &[],
    );
    assert_eq!(r.status, 422, "{}", r.body);

    let sport = loopback_port();
    let scfg = sink_config(&pg, "ods", &broker, sport, "");
    let mut sink = Relay::start_sink(&pg.dir, &scfg, sport);

    let eid = |i: u32| format!("00000000-0000-4000-8000-{i:012}");
    let parcel = |i: u32| {
        json!({"parcel_id": format!("P-{i}"), "warehouse": "BER", "items": i,
               "packed_at": "2026-12-01T08:00:00Z", "tags": ["fragile"],
               "metadata": {"eid": eid(i), "occurred_at": "2026-12-01T07:59:00Z"}})
    };
    let batch1: Vec<Value> = (1..=10).map(parcel).collect();
    let batch2: Vec<Value> = (11..=20).map(parcel).collect();
    let events = "/event-types/parcel.packed/events";
    for b in [&batch1, &batch2, &batch1] {
        let a = post(events, &json!(b));
        assert_eq!(a.status, 200, "{}", a.body);
    }
    let stock_events = "/event-types/stock.level/events";
    assert_eq!(
        post(
            stock_events,
            &json!([{"sku": "A", "level": 1}, {"sku": "B", "level": 2}])
        )
        .status,
        200
    );
    assert_eq!(
        post(stock_events, &json!([{"sku": "A", "level": 3}])).status,
        200
    );

    // A copy of an event reaches Kafka again (a client's retry after a restart of the API):
    // still one row.
    let copies = consume(&broker.addr(), &[TOPIC], 20, Duration::from_secs(3));
    let first = copies
        .iter()
        .find(|m| m.json()["parcel_id"] == "P-1")
        .expect("P-1 in Kafka");
    produce_raw(
        &broker.addr(),
        TOPIC,
        &[(first.key.as_deref(), first.payload.as_deref())],
    );

    wait_rows(
        &mut ods,
        &sink,
        "SELECT count(*)::text, count(DISTINCT eid)::text, sum(items)::text FROM ods.ev_parcel_packed",
        vec![vec![Some("20".into()), Some("20".into()), Some("210".into())]],
    );
    wait_rows(
        &mut ods,
        &sink,
        "SELECT sku, level::text FROM ods.ev_stock_level ORDER BY sku",
        vec![
            vec![Some("A".into()), Some("3".into())],
            vec![Some("B".into()), Some("2".into())],
        ],
    );
    // Columns typed from the schema, metadata beside them; the key is the primary key.
    let types = text_rows(
        &mut ods,
        "SELECT string_agg(column_name || ' ' || data_type, ', ' ORDER BY ordinal_position) FROM information_schema.columns WHERE table_schema = 'ods' AND table_name = 'ev_parcel_packed' AND column_name NOT LIKE '\\_saiki%'",
    );
    assert_eq!(
        types[0][0].as_deref(),
        Some("parcel_id text, warehouse text, items numeric, packed_at timestamp with time zone, tags jsonb, eid uuid, occurred_at timestamp with time zone, received_at timestamp with time zone, flow_id text, schema_version integer")
    );
    let mut pk = |t: &str| {
        text_rows(
            &mut ods,
            &format!("SELECT string_agg(a.attname, ',') FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) WHERE i.indisprimary AND i.indrelid = 'ods.{t}'::regclass"),
        )[0][0]
            .clone()
    };
    assert_eq!(pk("ev_parcel_packed").as_deref(), Some("eid"));
    assert_eq!(pk("ev_stock_level").as_deref(), Some("sku"));
    assert_eq!(
        text_rows(&mut ods, "SELECT occurred_at = '2026-12-01T07:59:00Z' AND schema_version = 1 AND tags = '[\"fragile\"]' FROM ods.ev_parcel_packed WHERE parcel_id = 'P-7'")[0][0].as_deref(),
        Some("t")
    );

    // A new schema version adds a column; the sink, killed and restarted meanwhile, applies
    // what follows once.
    sink.kill9();
    let mut v2 = parcels.clone();
    v2["schema"]["properties"]["carrier"] = json!({"type": "string"});
    let r = curl(
        api,
        "PUT",
        "/event-types/parcel.packed",
        Some(ADMIN),
        Some(&body(&v2)),
        &[],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    std::thread::sleep(Duration::from_millis(300)); // ingest.registry_cache
    let mut p21 = parcel(21);
    p21["carrier"] = json!("DHL");
    assert_eq!(post(events, &json!([p21])).status, 200);
    assert_eq!(
        post(stock_events, &json!([{"sku": "B", "level": 5}])).status,
        200
    );
    sink = Relay::start_sink(&pg.dir, &scfg, sport);
    wait_rows(
        &mut ods,
        &sink,
        "SELECT count(*)::text, count(carrier)::text, max(schema_version)::text FROM ods.ev_parcel_packed",
        vec![vec![Some("21".into()), Some("1".into()), Some("2".into())]],
    );
    wait_rows(
        &mut ods,
        &sink,
        "SELECT string_agg(sku || '=' || level, ',' ORDER BY sku) FROM ods.ev_stock_level",
        vec![vec![Some("A=3,B=5".into())]],
    );
    // Nothing went to the dead-letter topic.
    let m = sink.http_get("/metrics").unwrap_or_default();
    assert_eq!(
        metric(&m, "saiki_sink_dead_letters_total"),
        Some(0.0),
        "{m}"
    );
}

#[test]
fn the_api_speaks_https_with_http2_and_serves_its_openapi_document() {
    let certs = crate::tls::Certs::make();
    let pg = PgCluster::start(&[]);
    let _registry = pg.create_db("registry");
    let broker = Broker::start();
    let (api, http) = (loopback_port(), loopback_port());
    let tls = format!(
        "tls_cert = \"{}\"\ntls_key = \"{}\"",
        certs.path("server.crt"),
        certs.path("server.key")
    );
    let relay = Relay::start_ingest(&pg.dir, &ingest_config(&pg, &broker, api, http, &tls), http);
    let base = format!("https://127.0.0.1:{api}");
    let ca = certs.path("ca.pem");
    let trusted = ["--cacert", ca.as_str()];
    wait_until(Duration::from_secs(60), &relay, || {
        let a = request(&format!("{base}/openapi.json"), "GET", None, None, &trusted);
        (a.status != 200).then(|| format!("GET /openapi.json: {} {}", a.status, a.body))
    });
    // ALPN picks HTTP/2 when the client offers it; HTTP/1.1 still works.
    for (flag, version) in [("--http2", "2"), ("--http1.1", "1.1")] {
        let a = request(
            &format!("{base}/event-types"),
            "GET",
            Some(ADMIN),
            None,
            &[&trusted[..], &[flag]].concat(),
        );
        assert_eq!(
            (a.status, a.http_version.as_str()),
            (200, version),
            "{}",
            a.body
        );
    }
    // A client that does not trust the certificate gets nowhere; plain HTTP neither.
    let other = certs.path("other-ca.pem");
    assert_eq!(
        request(
            &format!("{base}/event-types"),
            "GET",
            Some(ADMIN),
            None,
            &["--cacert", &other]
        )
        .status,
        0
    );
    assert_ne!(
        curl(api, "GET", "/event-types", Some(ADMIN), None, &[]).status,
        200
    );

    // The OpenAPI document: every path and method it lists is served (an unknown path is the
    // fallback's 404 problem, an unknown method 405), and it lists every route.
    let doc = request(&format!("{base}/openapi.json"), "GET", None, None, &trusted).json();
    assert_eq!(doc["openapi"], "3.1.0");
    let mut listed = Vec::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for method in ops
            .as_object()
            .unwrap()
            .keys()
            .filter(|m| *m != "parameters")
        {
            let url = format!("{base}{}", path.replace("{name}", "parcel.packed"));
            let a = request(
                &url,
                &method.to_uppercase(),
                Some(ADMIN),
                Some(b"{}"),
                &trusted,
            );
            assert!(
                a.status != 405 && !a.body.contains("no such resource"),
                "{method} {path}: {} {}",
                a.status,
                a.body
            );
            listed.push(format!("{} {path}", method.to_uppercase()));
        }
    }
    listed.sort();
    assert_eq!(
        listed,
        [
            "GET /event-types",
            "GET /event-types/{name}",
            "GET /openapi.json",
            "POST /event-types",
            "POST /event-types/{name}/events",
            "POST /tokens",
            "PUT /event-types/{name}",
        ]
    );
    let a = request(
        &format!("{base}/nothing-here"),
        "GET",
        Some(ADMIN),
        None,
        &trusted,
    );
    assert!(
        a.status == 404 && a.body.contains("no such resource"),
        "{}",
        a.body
    );

    // A token made on the command line (saiki-relay token) works over the API, within its
    // scopes; refusals are counted by reason.
    let dsn = format!(
        "host=127.0.0.1 port={} user=postgres dbname=registry",
        pg.port
    );
    let out = Command::new(BIN)
        .args(["token", "--dsn", &dsn, "--scope", "read"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reader = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let a = request(
        &format!("{base}/event-types"),
        "GET",
        Some(&reader),
        None,
        &trusted,
    );
    assert_eq!(a.status, 200, "{}", a.body);
    let t = body(&parcel_type());
    assert_eq!(
        request(
            &format!("{base}/event-types"),
            "POST",
            Some(ADMIN),
            Some(&t),
            &trusted
        )
        .status,
        201
    );
    let events = format!("{base}/event-types/parcel.packed/events");
    let one = br#"[{"parcel_id": "P-1", "warehouse": "BER"}]"#;
    assert_eq!(
        request(&events, "POST", Some(&reader), Some(one), &trusted).status,
        403
    );
    assert_eq!(
        request(&events, "POST", None, Some(one), &trusted).status,
        401
    );
    assert_eq!(
        request(&events, "POST", Some(ADMIN), Some(b"[{}]"), &trusted).status,
        422
    );
    assert_eq!(
        request(&events, "POST", Some(ADMIN), Some(one), &trusted).status,
        200
    );
    let m = relay.http_get("/metrics").unwrap_or_default();
    let refused = |reason: &str| {
        m.lines()
            .find(|l| {
                l.starts_with("saiki_ingest_requests_refused_total")
                    && l.contains(&format!("reason=\"{reason}\""))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    assert_eq!(
        (
            refused("forbidden"),
            refused("unauthorized"),
            refused("invalid"),
            refused("too_large")
        ),
        (Some(1.0), Some(1.0), Some(1.0), Some(0.0)),
        "{m}"
    );
    assert_eq!(
        metric(&m, "saiki_ingest_events_in_flight"),
        Some(0.0),
        "{m}"
    );
    let bad = Command::new(BIN)
        .args(["token", "--dsn", &dsn, "--scope", "write"])
        .output()
        .unwrap();
    assert_eq!(
        bad.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}

#[test]
fn every_event_answered_200_survives_a_kill_of_the_api_and_retries_add_no_rows() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    const CLIENTS: u32 = 3;
    const BATCHES: u32 = 40;
    const EVENTS: u32 = 50;
    let total = (CLIENTS * BATCHES * EVENTS) as usize;

    let pg = PgCluster::start(&[]);
    let mut ods = pg.create_db("ods");
    let broker = Broker::start();
    let (api, http) = (loopback_port(), loopback_port());
    let icfg = ingest_config(&pg, &broker, api, http, "").replace("dbname=registry", "dbname=ods");
    let mut ingest = Relay::start_ingest(&pg.dir, &icfg, http);
    wait_api(api, &ingest);
    let t = body(&parcel_type());
    assert_eq!(
        curl(api, "POST", "/event-types", Some(ADMIN), Some(&t), &[]).status,
        201
    );
    let sport = loopback_port();
    let sink = Relay::start_sink(&pg.dir, &sink_config(&pg, "ods", &broker, sport, ""), sport);

    // Clients post batches with their own eids and retry each until it is answered 200.
    let accepted: Arc<Mutex<Vec<String>>> = Arc::default();
    let (answered, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let gave_up = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (accepted, answered, failed, gave_up) =
                (accepted.clone(), answered.clone(), failed.clone(), gave_up.clone());
            std::thread::spawn(move || {
                for b in 0..BATCHES {
                    let eids: Vec<String> = (0..EVENTS)
                        .map(|i| format!("{c:08x}-{b:04x}-4000-8000-{i:012x}"))
                        .collect();
                    let batch: Vec<Value> = eids
                        .iter()
                        .enumerate()
                        .map(|(i, e)| json!({"parcel_id": format!("P-{c}-{b}-{i}"), "warehouse": "BER", "items": 1, "metadata": {"eid": e}}))
                        .collect();
                    let started = Instant::now();
                    loop {
                        let a = curl(api, "POST", "/event-types/parcel.packed/events", Some(ADMIN), Some(&body(&json!(batch))), &["--max-time", "15"]);
                        if a.status == 200 {
                            answered.fetch_add(EVENTS as usize, Ordering::Relaxed);
                            accepted.lock().unwrap().extend(eids.iter().cloned());
                            break;
                        }
                        failed.fetch_add(1, Ordering::Relaxed);
                        if started.elapsed() > Duration::from_secs(90) {
                            gave_up.store(true, Ordering::Relaxed);
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(200));
                    }
                }
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    while answered.load(Ordering::Relaxed) < total / 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    ingest.kill9();
    std::thread::sleep(Duration::from_millis(500));
    let ingest = Relay::start_ingest(&pg.dir, &icfg, http);
    for c in clients {
        c.join().unwrap();
    }
    assert!(
        !gave_up.load(Ordering::Relaxed),
        "a client gave up:\n{}",
        ingest.log_text()
    );
    assert!(
        failed.load(Ordering::Relaxed) > 0,
        "the kill interrupted no request"
    );
    let accepted = accepted.lock().unwrap().clone();
    assert_eq!(accepted.len(), total);

    // Kafka has every event answered 200, some perhaps twice (retried after the kill).
    let msgs = consume(&broker.addr(), &[TOPIC], total * 2, Duration::from_secs(5));
    let in_kafka: std::collections::HashSet<String> = msgs
        .iter()
        .map(|m| m.json()["metadata"]["eid"].as_str().unwrap().to_string())
        .collect();
    let missing: Vec<&String> = accepted.iter().filter(|e| !in_kafka.contains(*e)).collect();
    assert!(
        missing.is_empty(),
        "{} events answered 200 are not in Kafka, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(3)]
    );
    eprintln!(
        "{} events in Kafka for {total} accepted ({} copies from retries)",
        msgs.len(),
        msgs.len() - in_kafka.len()
    );
    // The ODS holds each event once.
    wait_rows(
        &mut ods,
        &sink,
        "SELECT count(*)::text, count(DISTINCT eid)::text FROM ods.ev_parcel_packed",
        vec![vec![Some(total.to_string()), Some(total.to_string())]],
    );
}
