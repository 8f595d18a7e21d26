"""The classic pipe's second half: stdin lines (pg_recvlogical -P wal2json) into Kafka with
confluent-kafka (current librdkafka), idempotent and batching. It confirms nothing safely:
pg_recvlogical acknowledges the slot as soon as it wrote to the pipe."""
import sys

from kafka_client import make_producer, produce

brokers, topic = sys.argv[1], sys.argv[2]
p, on_delivery, errors = make_producer(brokers)
n = 0
for line in sys.stdin.buffer:
    line = line.rstrip(b"\n")
    if not line:
        continue
    produce(p, topic, line, on_delivery)
    n += 1
    if n % 1000 == 0:
        p.poll(0)
p.flush(120)
print(n, errors[0], file=sys.stderr)
sys.exit(1 if errors[0] else 0)
