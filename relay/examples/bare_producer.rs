//! A bare idempotent producer: N messages of SIZE bytes into TOPIC, as fast as librdkafka
//! takes them. Used to tell the broker's ceiling and librdkafka's own CPU from the relay's
//! (vendor/README.md measures the librdkafka fix with it).
//! `cargo run --release -p saiki-relay --example bare_producer -- BROKERS TOPIC N SIZE [headers|event-headers] [PROPERTY=VALUE...]`
//!
//! `headers`: the source relay's `saiki.source` and `saiki.lsn`; `event-headers`: what the
//! event API puts on an event (`saiki.event_type`, `saiki.eid`, `saiki.flow_id`, and a key
//! that is a JSON array), for bench/ingest's "same events".

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let (brokers, topic, n, size) = (
        &a[1],
        &a[2],
        a[3].parse::<usize>().unwrap(),
        a[4].parse::<usize>().unwrap(),
    );
    let headers = a[5..].iter().any(|h| h == "headers");
    let event_headers = a[5..].iter().any(|h| h == "event-headers");
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "200000");
    // Any `key=value` argument is a librdkafka property.
    for (k, v) in a[5..].iter().filter_map(|kv| kv.split_once('=')) {
        cc.set(k, v);
    }
    let p: BaseProducer = cc.create().unwrap();
    let payload = vec![b'x'; size];
    let t = Instant::now();
    for i in 0..n {
        let key = if event_headers {
            format!("[\"P-{i}\"]")
        } else {
            i.to_string()
        };
        let eid = format!("00000000-0000-4000-8000-{i:012}");
        loop {
            let mut rec = BaseRecord::<str, [u8]>::to(topic)
                .payload(&payload)
                .key(&key);
            if headers {
                let h = OwnedHeaders::new()
                    .insert(Header {
                        key: "saiki.source",
                        value: Some("bench"),
                    })
                    .insert(Header {
                        key: "saiki.lsn",
                        value: Some("0/1"),
                    });
                rec = rec.headers(h);
            } else if event_headers {
                let h = OwnedHeaders::new()
                    .insert(Header {
                        key: "saiki.event_type",
                        value: Some("bench.event"),
                    })
                    .insert(Header {
                        key: "saiki.eid",
                        value: Some(eid.as_str()),
                    })
                    .insert(Header {
                        key: "saiki.flow_id",
                        value: Some("4f6c1c2e-7a51-4b8e-9d3a-0c5b2e8f1a77"),
                    });
                rec = rec.headers(h);
            }
            match p.send(rec) {
                Ok(()) => break,
                Err(_) => {
                    p.poll(Duration::from_millis(10));
                }
            }
        }
        if i % 1000 == 0 {
            p.poll(Duration::ZERO);
        }
    }
    p.flush(Duration::from_secs(120)).unwrap();
    println!("{:.0}", n as f64 / t.elapsed().as_secs_f64());
}
