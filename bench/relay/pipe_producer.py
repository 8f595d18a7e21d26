"""The classic pipe's second half: stdin lines (pg_recvlogical -P wal2json) into Kafka with
confluent-kafka (current librdkafka), idempotent and batching. It confirms nothing safely:
pg_recvlogical acknowledges the slot as soon as it wrote to the pipe."""
import sys
from confluent_kafka import Producer

brokers, topic = sys.argv[1], sys.argv[2]
p = Producer({"bootstrap.servers": brokers, "enable.idempotence": True, "linger.ms": 5,
              "batch.num.messages": 1000, "queue.buffering.max.messages": 200000})
errors = [0]


def on_delivery(err, _msg):
    if err is not None:
        errors[0] += 1

n = 0
for line in sys.stdin.buffer:
    line = line.rstrip(b"\n")
    if not line:
        continue
    while True:
        try:
            p.produce(topic, line, on_delivery=on_delivery)
            break
        except BufferError:
            p.poll(0.01)
    n += 1
    if n % 1000 == 0:
        p.poll(0)
p.flush(120)
print(n, errors[0], file=sys.stderr)
sys.exit(1 if errors[0] else 0)
