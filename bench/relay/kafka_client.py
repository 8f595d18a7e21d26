"""The producer both benchmark clients use (confluent-kafka, current librdkafka): idempotent,
batching, with delivery errors counted so that a run that lost messages says so."""
from confluent_kafka import Producer


def make_producer(brokers):
    """Returns (producer, on_delivery, errors): pass on_delivery to produce(); errors[0] counts
    the messages Kafka refused."""
    p = Producer({"bootstrap.servers": brokers, "enable.idempotence": True, "linger.ms": 5,
                  "batch.num.messages": 1000, "queue.buffering.max.messages": 200000})
    errors = [0]

    def on_delivery(err, _msg):
        if err is not None:
            errors[0] += 1

    return p, on_delivery, errors


def produce(p, topic, value, on_delivery):
    """Produces one message, waiting out a full local queue (never dropping)."""
    while True:
        try:
            p.produce(topic, value, on_delivery=on_delivery)
            return
        except BufferError:
            p.poll(0.01)
