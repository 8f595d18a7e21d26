#!/usr/bin/env python3
"""bench/sink: the same generated change records (1,000,000 by default: 30 % updates of
earlier keys, 5 % deletes, pgbench-like accounts rows) in two figures of the same run:

1. The apply engine: records already in memory, applied by the sink's apply path (planner,
   COPY into a staging table, one merge per table and batch, offsets in the same transaction;
   batch N+1 planned while batch N is applied, as `saiki-relay sink` does)
   against the ceiling (the same ODS rows, with docs/sink.md's bookkeeping columns and key, by COPY
   into a staging table plus one INSERT ... ON CONFLICT merge) and against one-row-at-a-time
   upserts into a plain table (a 50,000 sample).
   Goal: >= 70 % of the ceiling's rows/s.
2. End to end from the broker: the records preloaded into the broker, consumed and applied by
   `saiki-relay sink`, against a bare consumer that only reads them. Goal: >= 0.9x.

Run through bench/sink/run.sh (builds the release relay and bench/sink's helper,
relay/examples/sink_bench.rs)."""
import argparse, os, re, subprocess, sys, time, urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "decode"))
import run as decode  # the throw-away cluster of bench/decode
import importlib.util
spec = importlib.util.spec_from_file_location("relay_bench", os.path.join(os.path.dirname(__file__), "..", "relay", "run.py"))
relay_bench = importlib.util.module_from_spec(spec); spec.loader.exec_module(relay_bench)

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
RELAY = os.path.join(ROOT, "target", "release", "saiki-relay")
HELPER = os.path.join(ROOT, "target", "release", "examples", "sink_bench")


def results(out):
    res = {}
    for line in out.splitlines():
        if line.startswith("result "):
            kv = dict(x.split("=", 1) for x in line.split()[1:])
            res[kv.get("engine", "produce")] = kv
    return res


def metric(port, name):
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=10_000, help="sink.batch_max_rows")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of sink and ceiling (best counts)")
    args = ap.parse_args()
    c = decode.Cluster()
    broker, bdir, brokers = relay_bench.start_broker()
    sink = None
    try:
        c.psql("CREATE DATABASE ods", db="postgres")
        c.psql("CREATE DATABASE ods2", db="postgres")
        dsn = f"host=127.0.0.1 port={c.port} user=postgres dbname=ods"
        print(f"# {args.rows:,} change records; PostgreSQL 15 (fsync off), tansu 0.6.0 (SQLite), {os.cpu_count()} cores", flush=True)

        # 1. The apply engine.
        out = subprocess.run([HELPER, "apply", "--dsn", dsn, "--rows", str(args.rows), "--batch", str(args.batch),
                              "--rounds", str(args.rounds)],
                             check=True, capture_output=True, text=True).stdout
        r = results(out)
        rate = {k: int(v["rows"]) / float(v["seconds"]) for k, v in r.items()}
        print("\n## apply engine (records in memory -> ODS)")
        print(f"{'engine':<28}{'records':>10}{'seconds':>10}{'records/s':>12}{'share':>9}")
        for k, label in [("sink", f"saiki sink (batch {args.batch})"), ("ceiling", "COPY + one merge (ceiling)"),
                         ("single", "one-row upserts (sample)")]:
            v = r[k]
            print(f"{label:<28}{int(v['rows']):>10,}{float(v['seconds']):>10.2f}{rate[k]:>12,.0f}{rate[k] / rate['ceiling']:>9.2f}")
        print(f"(best of {len(r['sink']['rounds'].split(','))} alternating rounds, each from an empty ODS: "
              f"sink {r['sink']['rounds']} s, ceiling {r['ceiling']['rounds']} s. In its best round the sink "
              f"planned for {float(r['sink']['planning']):.2f} s in all, each batch N+1 while the ODS applied batch N "
              f"({float(r['sink']['applying']):.2f} s); the two ODS tables were checked equal in every round)")
        print(f"sink / ceiling = {rate['sink'] / rate['ceiling']:.2f} (goal >= 0.70); "
              f"sink / one-row upserts = {rate['sink'] / rate['single']:.1f}x")

        # 2. End to end from the broker.
        # The topic first (the sink only reads what exists).
        cfg = os.path.join(bdir, "sink.toml")
        port = relay_bench.free_port()
        with open(cfg, "w") as f:
            f.write(f"""[sink]
dsn = "host=127.0.0.1 port={c.port} user=postgres dbname=ods2"
instance_id = "bench-sink"
batch_max_rows = {args.batch}
topic_refresh = "200ms"
[kafka]
brokers = "{brokers}"
topic_prefix = "saiki"
partitions = 1
[http]
listen = "127.0.0.1:{port}"
""")
        create = subprocess.run([sys.executable, "-c", f"""
from confluent_kafka.admin import AdminClient, NewTopic
a = AdminClient({{'bootstrap.servers': '{brokers}'}})
[f.result() for f in a.create_topics([NewTopic('saiki.public.accounts', 1, 1)]).values()]
"""], capture_output=True, text=True)
        if create.returncode != 0:
            raise SystemExit(f"creating the topic: {create.stderr}")
        t = time.time()
        subprocess.run([HELPER, "produce", "--brokers", brokers, "--rows", str(args.rows)], check=True,
                       capture_output=True, text=True)
        print(f"\n## end to end from the broker (preloaded {args.rows:,} messages in {time.time() - t:.1f} s)")
        out = subprocess.run([HELPER, "consume", "--brokers", brokers, "--rows", str(args.rows)], check=True,
                             capture_output=True, text=True).stdout
        bare = results(out)["bare_consumer"]
        bare_rate = int(bare["rows"]) / float(bare["seconds"])
        t0 = time.time()
        sink = subprocess.Popen([RELAY, "--config", cfg, "sink"], stdout=subprocess.DEVNULL,
                                stderr=open(os.path.join(bdir, "sink.log"), "w"))
        watch = relay_bench.ProcWatch(sink.pid)
        while True:
            n = metric(port, "saiki_sink_records_consumed_total") or 0
            if n >= args.rows:
                break
            if sink.poll() is not None:
                raise SystemExit(f"the sink exited: see {bdir}/sink.log")
            time.sleep(0.05)
        sink_s = time.time() - t0
        watch.stop()
        sink_rate = args.rows / sink_s
        rows = c.psql("SELECT count(*) FROM ods.accounts", db="ods2")
        print(f"{'reader':<28}{'messages':>10}{'seconds':>10}{'msgs/s':>12}")
        print(f"{'bare consumer':<28}{args.rows:>10,}{float(bare['seconds']):>10.2f}{bare_rate:>12,.0f}")
        print(f"{'saiki-relay sink':<28}{args.rows:>10,}{sink_s:>10.2f}{sink_rate:>12,.0f}")
        print(f"sink / bare consumer = {sink_rate / bare_rate:.2f} (goal >= 0.90); sink CPU {watch.cpu:.1f} s, "
              f"peak RSS {watch.hwm / 1024:.0f} MiB; ODS rows {int(rows):,}")
    finally:
        if sink and sink.poll() is None:
            sink.kill()
        broker.kill()
        c.stop()


if __name__ == "__main__":
    main()
