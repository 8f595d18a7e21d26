#!/usr/bin/env python3
"""bench/lake: the same 1,000,000 generated change records (bench/sink's generator: pgbench-like
accounts rows, 65 % inserts, 30 % updates, 5 % deletes, one commit day) preloaded into the
broker, then read by
1. a bare consumer (librdkafka, as the relay) that only counts them: the ceiling;
2. `saiki-relay lake`, into an Iceberg change-log table (local warehouse, SQL catalog in
   PostgreSQL), timed until its metric says every row is committed;
3. the reference writer (reference.py: confluent-kafka + pyarrow, the same rows as zstd Parquet
   files, no table format).
Then the engine-only figure, without the broker (which is the ceiling of all three above): the
same records from memory through the lake's write path (sink_bench lake: `LakeEngine`, the
relay's own round and commit) and through the reference writer (from a file read into memory
before its clock starts).
Prints records/s, the ratios lake/bare (goal >= 0.9) and lake/reference (goal >= 1.5), CPU
seconds and peak RSS of each process, and the lake's file count and sizes. PyIceberg then
counts the tables' rows: every record once.

Run through bench/lake/run.sh (release builds, confluent-kafka into /opt/saiki-py)."""
import argparse, glob, importlib.util, os, signal, subprocess, sys, time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "decode"))
import run as decode  # the throw-away cluster of bench/decode

spec = importlib.util.spec_from_file_location("relay_bench", os.path.join(HERE, "..", "relay", "run.py"))
relay_bench = importlib.util.module_from_spec(spec); spec.loader.exec_module(relay_bench)
spec = importlib.util.spec_from_file_location("sink_bench", os.path.join(HERE, "..", "sink", "run.py"))
sink_bench = importlib.util.module_from_spec(spec); spec.loader.exec_module(sink_bench)
metric = sink_bench.metric  # a metric of a relay's /metrics

ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
RELAY = os.path.join(ROOT, "target", "release", "saiki-relay")
HELPER = os.path.join(ROOT, "target", "release", "examples", "sink_bench")


def timed(cmd, **kw):
    """Runs cmd to its end; returns (stdout, seconds, cpu seconds, peak RSS KiB)."""
    t = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, **kw)
    w = relay_bench.ProcWatch(p.pid)
    out, _ = p.communicate()
    s = time.time() - t
    w.stop()
    if p.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({p.returncode})")
    return out, s, w.cpu, w.hwm


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--commit-interval", default="5s", help="lake.commit_interval")
    ap.add_argument("--target-file-size", type=int, default=64 << 20, help="lake.target_file_size")
    ap.add_argument("--fetch-wait-ms", default="10",
                    help="librdkafka's fetch.wait.max.ms for all three readers (tansu answers a fetch only after it)")
    args = ap.parse_args()
    c = decode.Cluster()
    broker, bdir, brokers = relay_bench.start_broker()
    lake = None
    try:
        c.psql("CREATE DATABASE ods", db="postgres")
        from confluent_kafka.admin import AdminClient, NewTopic
        a = AdminClient({"bootstrap.servers": brokers})
        [f.result() for f in a.create_topics([NewTopic("saiki.public.accounts", 1, 1)]).values()]
        t = time.time()
        subprocess.run([HELPER, "produce", "--brokers", brokers, "--rows", str(args.rows), "--commit-ts"],
                       check=True, capture_output=True, text=True)
        print(f"# {args.rows:,} change records preloaded in {time.time() - t:.1f} s; tansu 0.6.0 (SQLite), "
              f"PostgreSQL 15 (fsync off) for the catalog, {os.cpu_count()} cores; "
              f"fetch.wait.max.ms {args.fetch_wait_ms}", flush=True)

        out, bare_s, bare_cpu, bare_rss = timed([HELPER, "consume", "--brokers", brokers, "--rows", str(args.rows),
                                                       "--fetch-wait-ms", args.fetch_wait_ms])
        bare_bytes = int(sink_bench.results(out)["bare_consumer"]["bytes"])

        warehouse = os.path.join(bdir, "lake")
        port = relay_bench.free_port()
        cfg = os.path.join(bdir, "lake.toml")
        with open(cfg, "w") as f:
            f.write(f"""[lake]
warehouse = "file://{warehouse}"
catalog_dsn = "host=127.0.0.1 port={c.port} user=postgres dbname=ods"
group = "bench-lake"
instance_id = "bench-lake-1"
commit_interval = "{args.commit_interval}"
target_file_size = {args.target_file_size}
[kafka]
brokers = "{brokers}"
topic_prefix = "saiki"
[kafka.properties]
"fetch.wait.max.ms" = "{args.fetch_wait_ms}"
[http]
listen = "127.0.0.1:{port}"
""")
        t0 = time.time()
        lake = subprocess.Popen([RELAY, "--config", cfg, "lake"], stdout=subprocess.DEVNULL,
                                stderr=open(os.path.join(bdir, "lake.log"), "w"))
        watch = relay_bench.ProcWatch(lake.pid)
        while (metric(port, "saiki_lake_rows_written_total") or 0) < args.rows:
            if lake.poll() is not None:
                raise SystemExit(f"the lake relay exited: see {bdir}/lake.log")
            if time.time() - t0 > 1800:
                raise SystemExit(f"the lake relay took over 30 min: see {bdir}/lake.log")
            time.sleep(0.05)
        lake_s = time.time() - t0
        watch.stop()
        lake.send_signal(signal.SIGTERM)
        lake.wait(60)
        files = sorted(glob.glob(os.path.join(warehouse, "saiki", "accounts_changes", "data", "**", "*.parquet"),
                             recursive=True))
        sizes = [os.path.getsize(p) for p in files]

        ref_dir = os.path.join(bdir, "reference")
        out, ref_s, ref_cpu, ref_rss = timed([sys.executable, os.path.join(HERE, "reference.py"), "--brokers", brokers,
                                              "--rows", str(args.rows), "--out", ref_dir,
                                              "--fetch-wait-ms", args.fetch_wait_ms])
        ref = sink_bench.results(out)["reference"]

        # Engine only: no broker. The lake's own clock starts after the records are generated
        # in memory; the reference's after it read the same records from a file into memory.
        dump = os.path.join(bdir, "records.jsonl")
        subprocess.run([HELPER, "dump", "--rows", str(args.rows), "--out", dump], check=True,
                       capture_output=True, text=True)
        ecfg = os.path.join(bdir, "engine.toml")
        with open(cfg) as f, open(ecfg, "w") as g:
            g.write(f.read().replace("[lake]\n", "[lake]\nnamespace = \"engine\"\n"))
        out, _, eng_cpu, eng_rss = timed([HELPER, "lake", "--rows", str(args.rows), "--config", ecfg])
        eng = sink_bench.results(out)["lake"]
        out, _, refe_cpu, refe_rss = timed([sys.executable, os.path.join(HERE, "reference.py"),
                                            "--from-file", dump, "--rows", str(args.rows),
                                            "--out", os.path.join(bdir, "reference-engine")])
        refe = sink_bench.results(out)["reference"]

        from pyiceberg.catalog.sql import SqlCatalog
        cat = SqlCatalog("saiki", uri=f"postgresql+psycopg2://postgres@127.0.0.1:{c.port}/ods")
        rows = cat.load_table("saiki.accounts_changes").scan().to_arrow().num_rows
        eng_rows = cat.load_table("engine.accounts_changes").scan().to_arrow().num_rows

        rate = lambda s: args.rows / s
        print(f"\n{'reader':<34}{'records':>10}{'seconds':>9}{'records/s':>11}{'CPU s':>8}{'peak RSS':>10}")
        for label, s, cpu, rss in [("bare consumer (ceiling)", bare_s, bare_cpu, bare_rss),
                                   ("saiki-relay lake (Iceberg)", lake_s, watch.cpu, watch.hwm),
                                   ("reference (confluent-kafka+pyarrow)", ref_s, ref_cpu, ref_rss)]:
            print(f"{label:<34}{args.rows:>10,}{s:>9.2f}{rate(s):>11,.0f}{cpu:>8.1f}{rss / 1024:>8.0f} MiB")
        print(f"lake / bare consumer = {bare_s / lake_s:.2f} (goal >= 0.90); "
              f"lake / reference = {ref_s / lake_s:.2f}x (goal >= 1.5); "
              f"CPU per record: reference / lake = {ref_cpu / watch.cpu:.2f}x")
        print(f"lake: {len(files)} data files, {sum(sizes) / 2**20:.1f} MiB "
              f"(smallest {min(sizes) / 2**20:.1f}, largest {max(sizes) / 2**20:.1f} MiB), "
              f"commit_interval {args.commit_interval}, target_file_size {args.target_file_size >> 20} MiB; "
              f"reference: {ref['files']} files, {int(ref['bytes']) / 2**20:.1f} MiB; "
              f"the records in Kafka: {bare_bytes / 2**20:.1f} MiB")
        eng_s, refe_s = float(eng["seconds"]), float(refe["seconds"])
        print(f"\nengine only (records from memory, no broker)")
        print(f"{'writer':<34}{'records':>10}{'seconds':>9}{'records/s':>11}{'CPU s':>8}{'peak RSS':>10}")
        print(f"{'saiki-relay lake (LakeEngine)':<34}{args.rows:>10,}{eng_s:>9.2f}{rate(eng_s):>11,.0f}"
              f"{eng_cpu:>8.1f}{eng_rss / 1024:>8.0f} MiB")
        print(f"{'reference (json + pyarrow)':<34}{args.rows:>10,}{refe_s:>9.2f}{rate(refe_s):>11,.0f}"
              f"{refe_cpu:>8.1f}{refe_rss / 1024:>8.0f} MiB")
        print(f"engine only: lake / reference = {refe_s / eng_s:.2f}x (goal >= 1.5); "
              f"lake: {eng['files']} data files in {eng['commits']} commits")
        print("(CPU s and peak RSS of the engine-only processes include generating or reading the records)")
        print(f"PyIceberg reads {rows:,} rows from the table and {eng_rows:,} from the engine's "
              f"({'every record once' if rows == eng_rows == args.rows else 'NOT every record once'})")
        if rows != args.rows or eng_rows != args.rows:
            sys.exit(1)
    finally:
        if lake and lake.poll() is None:
            lake.kill()
        broker.kill()
        c.stop()


if __name__ == "__main__":
    main()
