//! A bare idempotent producer: N messages of SIZE bytes into TOPIC, as fast as librdkafka
//! takes them. Used to tell the broker's ceiling and librdkafka's own CPU from the relay's
//! (vendor/README.md measures the librdkafka fix with it).
//! `cargo run --release -p saiki-relay --example bare_producer -- BROKERS TOPIC N SIZE [headers] [PROPERTY=VALUE...]`

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
        let key = i.to_string();
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
