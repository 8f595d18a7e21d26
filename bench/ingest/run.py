#!/usr/bin/env python3
"""bench/ingest: `saiki-relay ingest` against a bare producer, on one fresh local broker.

1. The bare producer (relay/examples/bare_producer: the relay's librdkafka, idempotent, as
   fast as the broker takes them) sends N events of the same size: the ceiling.
2. The event API, fed by relay/examples/ingest_load (keep-alive HTTP/1.1 clients, no pacing)
   with batches of 1, 10 and 100 events: events accepted (answered 200, so acknowledged by
   Kafka) per second, and the share of the ceiling.
3. At half the best rate of batches of 100, paced: p50 and p99 request latency.
4. Overload: clients pace to 5x the best rate for OVERLOAD seconds; the relay's RSS is sampled
   every second. Flat means the second half's peak is within 10% of the first half's.

Run through bench/ingest/run.sh. The goal (issue #15): batches of 100 at >= 0.8x the bare
producer's events/s; p99 < 25 ms at half rate; memory flat under 5x overload."""
import argparse, importlib.util, json, os, subprocess, sys, tempfile, threading, time, urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
_spec = importlib.util.spec_from_file_location("relay_bench", os.path.join(ROOT, "bench", "relay", "run.py"))
relay_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(relay_bench)
decode = relay_bench.decode

RELAY = os.path.join(ROOT, "target", "release", "saiki-relay")
LOAD = os.path.join(ROOT, "target", "release", "examples", "ingest_load")
BARE = os.path.join(ROOT, "target", "release", "examples", "bare_producer")
ADMIN = "bench-admin-token-0123456789"


def api(port, method, path, body=None):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"null")


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_s(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / decode.CLK_TCK


def load(url, token, clients, batch, seconds, rate=0, watch=()):
    """One load run; adds the CPU seconds per million accepted events of each watched pid."""
    before = [cpu_s(p) for p in watch]
    out = subprocess.run([LOAD, url, token, str(clients), str(batch), str(seconds), str(rate)],
                         capture_output=True, text=True, check=True)
    r = json.loads(out.stdout)
    r["cpu_per_m"] = [(cpu_s(p) - b) / max(r["accepted"], 1) * 1e6 for p, b in zip(watch, before)]
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10, help="per load run")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--overload", type=float, default=20, help="seconds of 5x overload")
    ap.add_argument("--bare", type=int, default=300_000, help="events the bare producer sends")
    args = ap.parse_args()
    c = decode.Cluster()
    broker, bdir, brokers = relay_bench.start_broker()
    relay = None
    try:
        c.psql("CREATE DATABASE registry", db="postgres")
        port, http = relay_bench.free_port(), relay_bench.free_port()
        cfg = os.path.join(c.dir, "ingest.toml")
        with open(cfg, "w") as f:
            f.write(f'[ingest]\ndsn = "host=127.0.0.1 port={c.port} user=postgres dbname=registry"\n'
                    f'admin_token = "{ADMIN}"\nlisten = "127.0.0.1:{port}"\n'
                    f'[kafka]\nbrokers = "{brokers}"\ntopic_prefix = "bench"\n'
                    f'[http]\nlisten = "127.0.0.1:{http}"\n[log]\nlevel = "warn"\n')
        relay = subprocess.Popen([RELAY, "--config", cfg, "ingest"], stderr=open(os.path.join(c.dir, "ingest.log"), "w"))
        for _ in range(300):
            try:
                api(port, "GET", "/event-types"); break
            except OSError:
                time.sleep(0.1)
        api(port, "POST", "/event-types", {
            "name": "bench.event", "owning_team": "bench", "partition_key": ["/parcel_id"],
            "schema": {"type": "object", "required": ["parcel_id", "warehouse"],
                       "properties": {"parcel_id": {"type": "string"}, "warehouse": {"type": "string"},
                                      "items": {"type": "integer", "minimum": 1}, "packed_by": {"type": "string"},
                                      "note": {"type": "string"}}}})
        token = api(port, "POST", "/tokens", {"scopes": ["write:bench.event"]})["token"]
        url = f"http://127.0.0.1:{port}/event-types/bench.event/events"
        warm = load(url, token, 4, 100, 2)
        size = warm["event_bytes"]
        from confluent_kafka import Consumer
        cons = Consumer({"bootstrap.servers": brokers, "group.id": "bench-size", "auto.offset.reset": "earliest"})
        cons.subscribe(["bench.events.bench.event"])
        m = None
        while m is None or m.error():
            m = cons.poll(5)
        enriched = len(m.value())
        cons.close()

        # 1. The ceiling: the bare producer, events of the same size, on the same broker.
        from confluent_kafka.admin import AdminClient, NewTopic  # the broker does not auto-create
        admin = AdminClient({"bootstrap.servers": brokers})
        for f in admin.create_topics([NewTopic("bare", 1, 1)]).values():
            f.result(30)
        # The event API's messages carry 3 headers (event type, eid, flow id), a JSON-array key
        # and the metadata: the bare producer runs with events as posted, and with the same
        # events as the API produces them (size, key and headers), which is the comparison.
        b0 = cpu_s(broker.pid)
        out = subprocess.run([BARE, brokers, "bare", str(args.bare), str(size)], capture_output=True, text=True, check=True)
        bare = float(out.stdout)
        bare_cpu = (cpu_s(broker.pid) - b0) / args.bare * 1e6
        for f in admin.create_topics([NewTopic("bare_h", 1, 1)]).values():
            f.result(30)
        b0 = cpu_s(broker.pid)
        out = subprocess.run([BARE, brokers, "bare_h", str(args.bare), str(enriched), "event-headers"], capture_output=True, text=True, check=True)
        bare_h = float(out.stdout)
        bare_h_cpu = (cpu_s(broker.pid) - b0) / args.bare * 1e6
        print(f"events of {size} bytes as posted, {enriched} as produced; {args.clients} clients, {args.seconds:.0f} s per run; "
              f"CPU s per million events: relay / broker")
        print(f"{'bare producer':<28} {bare:>10,.0f} events/s   1.00          broker {bare_cpu:.1f}")
        print(f"{'bare, the same events':<28} {bare_h:>10,.0f} events/s   {bare_h / bare:.2f}          broker {bare_h_cpu:.1f}")
        watch = (relay.pid, broker.pid)

        # 2. The API, unpaced, by batch size.
        best = {}
        for batch in (1, 10, 100):
            r = load(url, token, args.clients, batch, args.seconds, watch=watch)
            best[batch] = r["events_per_s"]
            print(f"{'ingest, batches of ' + str(batch):<28} {r['events_per_s']:>10,.0f} events/s   "
                  f"{r['events_per_s'] / bare_h:.2f}x same   relay {r['cpu_per_m'][0]:.1f} / broker {r['cpu_per_m'][1]:.1f}   "
                  f"p50 {r['p50_ms']:.1f} ms  p99 {r['p99_ms']:.1f} ms  {r['statuses']}")

        # 3. Latency at half the best rate (batches of 100, paced).
        half = best[100] / 2
        r = load(url, token, args.clients, 100, args.seconds, half)
        print(f"{'half rate, batches of 100':<28} {r['events_per_s']:>10,.0f} events/s   "
              f"p50 {r['p50_ms']:.1f} ms  p99 {r['p99_ms']:.1f} ms  max {r['max_ms']:.1f} ms  {r['statuses']}")

        # 4. Overload: 5x the best rate; the relay's memory, sampled each second.
        samples, stop = [], threading.Event()

        def sample():
            while not stop.is_set():
                samples.append(rss_kb(relay.pid)); time.sleep(1)
        t = threading.Thread(target=sample); t.start()
        before = rss_kb(relay.pid)
        # More clients than the in-flight window holds (ingest.max_in_flight_events = 10,000
        # = 100 batches), each pacing to its share of 5x the best rate.
        r = load(url, token, args.clients * 8, 100, args.overload, best[100] * 5)
        stop.set(); t.join()
        n = len(samples) // 2
        first, second = max(samples[:n] or [0]), max(samples[n:] or [0])
        flat = second <= first * 1.1
        print(f"{'overload 5x, batch 100':<28} {r['events_per_s']:>10,.0f} events/s accepted  {r['statuses']}  "
              f"RSS before {before // 1024} MB, peak first half {first // 1024} MB, second half {second // 1024} MB: "
              f"{'flat' if flat else 'GROWING'}")
        print(f"goal: batches of 100 at >= 0.80x the bare producer of the same events: {best[100] / bare_h:.2f}x "
              f"({best[100] / bare:.2f}x the bare producer of the events as posted, without headers)")
    finally:
        if relay:
            relay.terminate(); relay.wait(30)
        broker.terminate(); broker.wait(30)
        c.stop()


if __name__ == "__main__":
    main()
