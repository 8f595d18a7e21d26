#!/usr/bin/env python3
"""The Rust bare producer (relay/examples/bare_producer, the relay's librdkafka) on one fresh
local broker, once per argument: rate and CPU seconds per million messages (user+system from
/usr/bin/time). Each argument is `none` or comma-separated librdkafka properties, e.g.

    cargo build --release -p saiki-relay --example bare_producer
    python3 bench/relay/bare_rust.py none enable.idempotence=false headers

vendor/README.md's figures come from this script."""
import importlib.util, os, subprocess, sys, time

# bench/relay/run.py under its own name (it imports bench/decode/run.py as `run`).
_spec = importlib.util.spec_from_file_location("relay_bench", os.path.join(os.path.dirname(os.path.abspath(__file__)), "run.py"))
relay_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(relay_bench)

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BARE = os.path.join(ROOT, "target", "release", "examples", "bare_producer")
N = int(os.environ.get("N", "300000"))


def main():
    runs = sys.argv[1:] or ["none"]
    broker, _, brokers = relay_bench.start_broker()
    try:
        from confluent_kafka.admin import AdminClient, NewTopic  # the broker does not auto-create
        admin = AdminClient({"bootstrap.servers": brokers})
        for f in admin.create_topics([NewTopic(f"t{i}", 1, 1) for i in range(len(runs))]).values():
            f.result(30)
        for i, arg in enumerate(runs):
            extra = [] if arg == "none" else arg.split(",")
            t0 = time.time()
            p = subprocess.run(["/usr/bin/time", "-f", "%U %S %M", BARE, brokers, f"t{i}", str(N), "300"] + extra,
                               capture_output=True, text=True)
            if p.returncode != 0:
                sys.exit(p.stderr)
            user, system, rss = p.stderr.strip().split("\n")[-1].split()
            cpu = (float(user) + float(system)) / (N / 1e6)
            print(f"{arg:<40} {float(p.stdout):>9,.0f} msg/s {cpu:>7.2f} CPU s/M  {int(rss) // 1024} MB  {time.time() - t0:.1f} s",
                  flush=True)
    finally:
        broker.kill()


if __name__ == "__main__":
    main()
