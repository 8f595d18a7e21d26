"""The broker's ceiling: N messages of SIZE bytes produced as fast as the client allows."""
import sys, time
from confluent_kafka import Producer

brokers, topic, n, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
p = Producer({"bootstrap.servers": brokers, "enable.idempotence": True, "linger.ms": 5,
              "batch.num.messages": 1000, "queue.buffering.max.messages": 200000})
errors = [0]


def on_delivery(err, _msg):
    if err is not None:
        errors[0] += 1

msg = b"x" * size
t = time.perf_counter()
for i in range(n):
    while True:
        try:
            p.produce(topic, msg, on_delivery=on_delivery)
            break
        except BufferError:
            p.poll(0.01)
    if i % 1000 == 0:
        p.poll(0)
p.flush(120)
print(f"{n / (time.perf_counter() - t):.0f}")
sys.exit(1 if errors[0] else 0)
