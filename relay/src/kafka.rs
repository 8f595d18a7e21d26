//! The Kafka side of the source relay: an idempotent producer (`enable.idempotence`, acks=all,
//! so per-partition order survives retries) and topic creation through the admin API, since
//! many clusters, the local test broker among them, do not auto-create topics.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;

use crate::config::KafkaConfig;
use crate::error::RelayError;

const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// The first authentication or TLS verification failure librdkafka reported in this process.
/// librdkafka retries those by itself forever, and to the relay they look like a broker that
/// does not answer; but a wrong password or an untrusted certificate does not heal by
/// retrying, so [`refused`] turns the next Kafka error into a definite one.
static REFUSED: Mutex<Option<String>> = Mutex::new(None);

/// Every client's error callback (producers, admin clients, the sink's consumer): logs the
/// error and records it for [`refused`].
pub(crate) fn client_error(error: &KafkaError, reason: &str) {
    note_client_error(error, reason);
    tracing::error!(%error, reason, "librdkafka");
}

/// Records `error` if it says that the broker refused the relay's credentials or that the
/// broker's certificate failed verification.
fn note_client_error(error: &KafkaError, reason: &str) {
    let what = match error.rdkafka_error_code() {
        Some(RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SaslAuthenticationFailed) => {
            "the broker refused the relay's credentials: check sasl.mechanism, sasl.username and sasl.password in [kafka.properties]"
        }
        Some(RDKafkaErrorCode::SSL) if reason.contains("certificate verify failed") => {
            "the broker's TLS certificate failed verification: check ssl.ca.location in [kafka.properties] (and that the broker's certificate names the host in [kafka] brokers)"
        }
        _ => return,
    };
    let mut r = REFUSED.lock().unwrap_or_else(|p| p.into_inner());
    if r.is_none() {
        *r = Some(format!("{reason}: {what}"));
    }
}

/// A transient Kafka error after the broker refused the relay (see [`note_client_error`])
/// becomes a definite configuration error (exit 4); any other error is returned as it is.
pub(crate) fn refused(e: RelayError) -> RelayError {
    if !matches!(e, RelayError::Kafka(_)) {
        return e;
    }
    match REFUSED.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
        Some(why) => RelayError::KafkaConfig(why.clone()),
        None => e,
    }
}

/// The context of the relay's producers and admin clients: librdkafka's global errors go
/// through [`client_error`].
pub(crate) struct KafkaContext;

impl ClientContext for KafkaContext {
    fn error(&self, error: KafkaError, reason: &str) {
        client_error(&error, reason);
    }
}

pub struct Kafka {
    producer: FutureProducer<KafkaContext>,
    admin: AdminClient<KafkaContext>,
    /// Known topics and their partition counts (shared by the requests of the event API).
    topics: std::sync::Mutex<HashMap<String, i32>>,
    cfg: KafkaConfig,
}

/// One message to produce.
pub(crate) struct Outgoing<'a> {
    pub(crate) topic: &'a str,
    pub(crate) partition: Option<i32>,
    pub(crate) key: Option<&'a [u8]>,
    pub(crate) payload: Option<&'a [u8]>,
    pub(crate) headers: &'a [(&'static str, String)],
}

impl Kafka {
    /// Builds the clients. Properties from `[kafka.properties]` are applied last, so they can
    /// override the relay's defaults; an unknown property is a definite configuration error.
    pub(crate) fn new(cfg: &KafkaConfig, max_in_flight: usize) -> Result<Kafka, RelayError> {
        let mut cc = ClientConfig::new();
        cc.set("bootstrap.servers", &cfg.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set(
                "queue.buffering.max.messages",
                (max_in_flight + 10_000).to_string(),
            )
            .set("queue.buffering.max.kbytes", "1048576")
            .set("message.timeout.ms", "120000")
            .set("client.id", "saiki-relay");
        for (k, v) in &cfg.properties {
            cc.set(k, v);
        }
        let producer: FutureProducer<KafkaContext> = cc
            .create_with_context(KafkaContext)
            .map_err(|e| RelayError::KafkaConfig(format!("{e}: check [kafka.properties]")))?;
        let admin: AdminClient<KafkaContext> = cc
            .create_with_context(KafkaContext)
            .map_err(|e| RelayError::KafkaConfig(format!("{e}: check [kafka.properties]")))?;
        Ok(Kafka {
            producer,
            admin,
            topics: std::sync::Mutex::new(HashMap::new()),
            cfg: cfg.clone(),
        })
    }

    /// Makes sure the topic exists (creating it with the configured partitions and
    /// replication factor) and returns its partition count.
    /// Concurrent callers may both create it; the second finds it there.
    pub(crate) async fn ensure_topic(&self, topic: &str) -> Result<i32, RelayError> {
        if let Some(n) = self.known(topic) {
            return Ok(n);
        }
        if let Some(n) = self.partitions(topic).await? {
            self.remember(topic, n);
            return Ok(n);
        }
        let new = NewTopic::new(
            topic,
            self.cfg.partitions,
            TopicReplication::Fixed(self.cfg.replication_factor),
        );
        let opts = AdminOptions::new().operation_timeout(Some(Timeout::After(METADATA_TIMEOUT)));
        let results = self
            .admin
            .create_topics([&new], &opts)
            .await
            .map_err(|e| RelayError::Kafka(format!("create topic {topic}: {e}")))?;
        for r in results {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => {
                    let msg = format!("create topic {name}: {code}");
                    return Err(match code {
                        RDKafkaErrorCode::TopicAuthorizationFailed
                        | RDKafkaErrorCode::InvalidReplicationFactor
                        | RDKafkaErrorCode::InvalidPartitions
                        | RDKafkaErrorCode::InvalidTopic => RelayError::KafkaConfig(format!(
                            "{msg}: check [kafka] partitions, replication_factor and ACLs"
                        )),
                        _ => RelayError::Kafka(msg),
                    });
                }
            }
        }
        // Metadata can lag the creation by a moment.
        for _ in 0..50 {
            if let Some(n) = self.partitions(topic).await? {
                self.remember(topic, n);
                return Ok(n);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(RelayError::Kafka(format!(
            "topic {topic} was created but does not appear in the metadata"
        )))
    }

    fn known(&self, topic: &str) -> Option<i32> {
        let topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        topics.get(topic).copied()
    }

    fn remember(&self, topic: &str, partitions: i32) {
        let mut topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        topics.insert(topic.to_string(), partitions);
    }

    async fn partitions(&self, topic: &str) -> Result<Option<i32>, RelayError> {
        let p = self.producer.clone();
        let t = topic.to_string();
        let md = tokio::task::spawn_blocking(move || {
            p.client().fetch_metadata(Some(&t), METADATA_TIMEOUT)
        })
        .await
        .map_err(|e| RelayError::Kafka(format!("metadata task: {e}")))?
        .map_err(|e| RelayError::Kafka(format!("metadata for {topic}: {e}")))?;
        Ok(md
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
            .map(|t| t.partitions().len() as i32))
    }

    /// Hands one message to the producer; the future resolves when Kafka acknowledged it or
    /// gave up. A full local queue is waited out (backpressure), never dropped.
    pub(crate) async fn send(&self, m: &Outgoing<'_>) -> Result<DeliveryFuture, RelayError> {
        let headers = headers(m.headers.iter().map(|(k, v)| (*k, Some(v.as_bytes()))));
        self.send_owned(m.topic, m.partition, m.key, m.payload, headers)
            .await
    }

    /// [`Kafka::send`] with headers already built ([`headers`]) (the sink's dead letters keep the
    /// original message's headers).
    pub(crate) async fn send_owned(
        &self,
        topic: &str,
        partition: Option<i32>,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: OwnedHeaders,
    ) -> Result<DeliveryFuture, RelayError> {
        loop {
            let mut rec: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(topic).headers(headers.clone());
            if let Some(p) = partition {
                rec = rec.partition(p);
            }
            if let Some(k) = key {
                rec = rec.key(k);
            }
            if let Some(p) = payload {
                rec = rec.payload(p);
            }
            match self.producer.send_result(rec) {
                Ok(f) => return Ok(f),
                Err((e, _)) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => return Err(RelayError::Kafka(format!("produce to {topic}: {e}"))),
            }
        }
    }
}

/// Which topics a consumer of change topics (the sink, the lake) reads: those its pattern
/// matches (`{section}.topics`; default every `{topic_prefix}.` topic), but never the
/// dead-letter, transactions and messages topics, nor Kafka's internal `__` topics.
pub(crate) struct TopicFilter {
    pattern: regex::Regex,
    excluded: Vec<String>,
}

impl TopicFilter {
    /// `key` names the setting in errors (`sink.topics`, `lake.topics`).
    pub(crate) fn new(
        key: &str,
        pattern: Option<&str>,
        kafka: &crate::config::KafkaConfig,
        dead_letter_topic: &str,
    ) -> Result<TopicFilter, RelayError> {
        let pattern = pattern
            .map(str::to_string)
            .unwrap_or_else(|| format!("^{}\\.", regex::escape(&kafka.topic_prefix)));
        let compiled = regex::Regex::new(&pattern)
            .map_err(|e| RelayError::Config(format!("{key} = {pattern:?}: {e}")))?;
        Ok(TopicFilter {
            pattern: compiled,
            excluded: vec![
                dead_letter_topic.to_string(),
                format!("{}.transactions", kafka.topic_prefix),
                format!("{}.messages", kafka.topic_prefix),
            ],
        })
    }

    pub(crate) fn wants(&self, topic: &str) -> bool {
        self.pattern.is_match(topic)
            && !self.excluded.iter().any(|t| t == topic)
            && !topic.starts_with("__")
    }
}

/// Lists the broker's topics and subscribes `consumer` to those `wants` accepts, if they differ
/// from `subscribed` (sorted; updated). Returns whether the subscription changed. A broker
/// that refuses the relay's credentials is a definite error; any other failure to list is
/// logged and left to the next call. The sink and the lake list topics themselves instead of
/// a regex subscription, so that a topic created later is picked up on their own schedule.
pub(crate) fn subscribe_matching<C: rdkafka::consumer::ConsumerContext + 'static>(
    consumer: &rdkafka::consumer::StreamConsumer<C>,
    wants: impl Fn(&str) -> bool,
    subscribed: &mut Vec<String>,
) -> Result<bool, RelayError> {
    use rdkafka::consumer::Consumer;
    let md = match tokio::task::block_in_place(|| consumer.fetch_metadata(None, METADATA_TIMEOUT)) {
        Ok(md) => md,
        Err(e) => {
            let e = refused(RelayError::Kafka(format!("listing topics: {e}")));
            if !e.is_transient() {
                return Err(e);
            }
            tracing::warn!(error = %e, "listing topics");
            return Ok(false);
        }
    };
    let mut names: Vec<String> = md
        .topics()
        .iter()
        .map(|t| t.name().to_string())
        .filter(|t| wants(t))
        .collect();
    names.sort();
    if names == *subscribed {
        return Ok(false);
    }
    if names.is_empty() {
        consumer.unsubscribe();
    } else {
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        consumer
            .subscribe(&refs)
            .map_err(|e| RelayError::Kafka(format!("subscribe: {e}")))?;
    }
    tracing::info!(topics = names.len(), "subscribed: {}", names.join(", "));
    *subscribed = names;
    Ok(true)
}

/// Kafka headers from names and values, in order: the one place they are built (the source's
/// headers of every message, the sink's dead letters).
pub(crate) fn headers<'a>(
    pairs: impl IntoIterator<Item = (&'a str, Option<&'a [u8]>)>,
) -> OwnedHeaders {
    let pairs = pairs.into_iter();
    let mut headers = OwnedHeaders::new_with_capacity(pairs.size_hint().0);
    for (key, value) in pairs {
        headers = headers.insert(Header { key, value });
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(props: &[(&str, &str)]) -> Result<Kafka, RelayError> {
        let mut cfg = KafkaConfig {
            brokers: "127.0.0.1:9".into(),
            ..Default::default()
        };
        for (k, v) in props {
            cfg.properties.insert(k.to_string(), v.to_string());
        }
        Kafka::new(&cfg, 10)
    }

    /// What docs/operations.md says of this build's librdkafka (OpenSSL, no Kerberos).
    #[test]
    fn tls_and_scram_are_accepted_and_kerberos_is_refused_as_a_configuration_error() {
        for (protocol, mechanism) in [
            ("SASL_PLAINTEXT", "PLAIN"),
            ("SASL_PLAINTEXT", "SCRAM-SHA-256"),
            ("SASL_SSL", "SCRAM-SHA-512"),
            ("SSL", ""),
        ] {
            let mut props = vec![("security.protocol", protocol)];
            if !mechanism.is_empty() {
                props.extend([
                    ("sasl.mechanism", mechanism),
                    ("sasl.username", "u"),
                    ("sasl.password", "p"),
                ]);
            }
            if let Err(e) = with(&props) {
                panic!("{protocol} {mechanism}: {e}");
            }
        }
        match with(&[
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanism", "GSSAPI"),
        ]) {
            Err(RelayError::KafkaConfig(m)) => assert!(m.contains("kafka.properties"), "{m}"),
            Err(e) => panic!("GSSAPI: {e}"),
            Ok(_) => panic!("GSSAPI accepted by a build without Kerberos"),
        }
        assert!(matches!(
            with(&[("no.such.property", "1")]),
            Err(RelayError::KafkaConfig(_))
        ));
    }

    /// One test, because what it checks is process-wide.
    #[test]
    fn a_refused_login_turns_the_next_kafka_error_definite_and_nothing_else_does() {
        let kafka = || RelayError::Kafka("metadata: timed out".into());
        let transport = KafkaError::Global(RDKafkaErrorCode::BrokerTransportFailure);
        note_client_error(&transport, "connection refused");
        let ssl = KafkaError::Global(RDKafkaErrorCode::SSL);
        note_client_error(&ssl, "SSL handshake failed: unexpected eof");
        assert!(refused(kafka()).is_transient(), "nothing refused yet");
        let auth = KafkaError::Global(RDKafkaErrorCode::Authentication);
        note_client_error(&auth, "SASL authentication error: invalid-proof");
        match refused(kafka()) {
            RelayError::KafkaConfig(m) => {
                assert!(
                    m.starts_with("SASL authentication error: invalid-proof"),
                    "{m}"
                );
                assert!(m.contains("sasl.password"), "{m}");
            }
            e => panic!("{e:?}"),
        }
        // Errors of other parts stay what they are.
        let connect = RelayError::Connect {
            target: "db:5432".into(),
            source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        };
        assert!(matches!(refused(connect), RelayError::Connect { .. }));
    }
}
