"""The broker's ceiling: N messages of SIZE bytes produced as fast as the client allows."""
import sys
import time

from kafka_client import make_producer, produce

brokers, topic, n, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
p, on_delivery, errors = make_producer(brokers)
msg = b"x" * size
t = time.perf_counter()
for i in range(n):
    produce(p, topic, msg, on_delivery)
    if i % 1000 == 0:
        p.poll(0)
p.flush(120)
print(f"{n / (time.perf_counter() - t):.0f}")
sys.exit(1 if errors[0] else 0)
