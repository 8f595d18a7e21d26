//! bench/ingest's load generator: CLIENTS keep-alive HTTP/1.1 connections post batches of
//! BATCH events of about 300 bytes to the event API for SECONDS, as fast as answered or paced
//! to RATE events/s (0: unpaced). Prints one JSON line: events accepted per second, answers
//! by status, and the latency of the 200s (p50, p99, max, in ms).
//!
//! `ingest_load URL TOKEN CLIENTS BATCH SECONDS RATE`
//! (URL: `http://127.0.0.1:8080/event-types/bench.event/events`)

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

struct Tally {
    accepted: u64,
    statuses: BTreeMap<u16, u64>,
    latencies: Vec<f64>,
    errors: u64,
}

fn batch(client: usize, seq: u64, n: usize) -> Bytes {
    let events: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            serde_json::json!({
                "parcel_id": format!("P-{client}-{seq}-{i}"),
                "warehouse": "BER",
                "items": (i % 9) + 1,
                "packed_by": "picker-0815",
                "note": "x".repeat(180),
            })
        })
        .collect();
    Bytes::from(serde_json::to_vec(&events).unwrap())
}

async fn client(
    id: usize,
    clients: usize,
    url: hyper::Uri,
    token: String,
    n: usize,
    until: Instant,
    interval: Option<Duration>,
) -> Tally {
    let mut t = Tally {
        accepted: 0,
        statuses: BTreeMap::new(),
        latencies: Vec::new(),
        errors: 0,
    };
    let authority = url.authority().unwrap().clone();
    let mut sender = None;
    // Paced clients start spread over one interval, so that their batches do not arrive
    // together.
    let mut next = Instant::now()
        + interval
            .unwrap_or_default()
            .mul_f64(id as f64 / clients as f64);
    let mut seq = 0u64;
    while Instant::now() < until {
        if let Some(iv) = interval {
            tokio::time::sleep_until(next.into()).await;
            next += iv;
        }
        if sender.is_none() {
            let Ok(stream) = tokio::net::TcpStream::connect(authority.as_str()).await else {
                t.errors += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            stream.set_nodelay(true).unwrap();
            let (s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .unwrap();
            tokio::spawn(conn);
            sender = Some(s);
        }
        let s = sender.as_mut().unwrap();
        let req = hyper::Request::post(url.path())
            .header("host", authority.as_str())
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .body(Full::new(batch(id, seq, n)))
            .unwrap();
        seq += 1;
        let sent = Instant::now();
        match s.send_request(req).await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let _ = resp.into_body().collect().await;
                *t.statuses.entry(status).or_default() += 1;
                if status == 200 {
                    t.accepted += n as u64;
                    t.latencies.push(sent.elapsed().as_secs_f64() * 1e3);
                } else if status == 429 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            Err(_) => {
                t.errors += 1;
                sender = None;
            }
        }
    }
    t
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.len() != 7 {
        eprintln!("usage: ingest_load URL TOKEN CLIENTS BATCH SECONDS RATE");
        std::process::exit(2);
    }
    let url: hyper::Uri = a[1].parse().expect("URL");
    let token = a[2].clone();
    let clients: usize = a[3].parse().expect("CLIENTS");
    let n: usize = a[4].parse().expect("BATCH");
    let seconds: f64 = a[5].parse().expect("SECONDS");
    let rate: f64 = a[6].parse().expect("RATE");
    let interval = (rate > 0.0).then(|| Duration::from_secs_f64(clients as f64 * n as f64 / rate));
    let started = Instant::now();
    let until = started + Duration::from_secs_f64(seconds);
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            tokio::spawn(client(
                i,
                clients,
                url.clone(),
                token.clone(),
                n,
                until,
                interval,
            ))
        })
        .collect();
    let mut all = Tally {
        accepted: 0,
        statuses: BTreeMap::new(),
        latencies: Vec::new(),
        errors: 0,
    };
    for t in tasks {
        let t = t.await.unwrap();
        all.accepted += t.accepted;
        all.errors += t.errors;
        all.latencies.extend(t.latencies);
        for (k, v) in t.statuses {
            *all.statuses.entry(k).or_default() += v;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.latencies.sort_by(f64::total_cmp);
    let out = serde_json::json!({
        "events_per_s": all.accepted as f64 / elapsed,
        "accepted": all.accepted,
        "statuses": all.statuses.iter().map(|(k, v)| (k.to_string(), *v)).collect::<BTreeMap<_, _>>(),
        "errors": all.errors,
        "p50_ms": percentile(&all.latencies, 0.5),
        "p99_ms": percentile(&all.latencies, 0.99),
        "max_ms": all.latencies.last().copied().unwrap_or(0.0),
        "event_bytes": batch(0, 0, 1).len() - 2,
    });
    println!("{out}");
}
