#!/usr/bin/env python3
"""bench/snapshot: one 2,000,000-row table (pgbench_accounts-like) brought into the broker by
`saiki-relay source` with `snapshot = "initial"` (watermarked chunks through
saiki.snapshot_chunk, R records, progress recorded after Kafka has each chunk), against the
ceiling of the same table read by `COPY (SELECT row_to_json(t) ...) TO STDOUT` into the same
stdin -> Kafka producer as bench/relay's pipe (confluent-kafka, idempotent, batching), in the
same run, same broker, both without headers. A pgbench workload writes another table of the
same database at a fixed rate during both. Goal: the snapshot at >= 70 % of the ceiling's
rows/s.

Run through bench/snapshot/run.sh (setup, release builds, confluent-kafka)."""
import argparse, os, subprocess, sys, time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "decode"))
import run as decode  # the throw-away cluster of bench/decode
import importlib.util
spec = importlib.util.spec_from_file_location("relay_bench", os.path.join(os.path.dirname(__file__), "..", "relay", "run.py"))
relay_bench = importlib.util.module_from_spec(spec); spec.loader.exec_module(relay_bench)

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
RELAY = os.path.join(ROOT, "target", "release", "saiki-relay")
PIPE = os.path.join(ROOT, "bench", "relay", "pipe_producer.py")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--chunk", type=int, default=10_000, help="source.snapshot_chunk_rows")
    ap.add_argument("--workload-rate", type=int, default=200, help="pgbench tx/s on the side table")
    args = ap.parse_args()
    c = decode.Cluster()
    broker, bdir, brokers = relay_bench.start_broker()
    load = None
    try:
        c.psql("CREATE DATABASE bench", db="postgres")
        c.psql("CREATE EXTENSION saiki")
        c.psql("CREATE TABLE accounts (aid bigint PRIMARY KEY, bid int, abalance int, filler char(84))")
        c.psql("CREATE TABLE side (id bigserial PRIMARY KEY, v int)")
        step = 500_000
        for lo in range(1, args.rows + 1, step):
            c.psql(f"INSERT INTO accounts SELECT g, g % 100, 0, '' FROM generate_series({lo}, {min(lo + step - 1, args.rows)}) g")
        c.psql("VACUUM ANALYZE accounts")
        from confluent_kafka.admin import AdminClient, NewTopic  # the broker does not auto-create
        admin = AdminClient({"bootstrap.servers": brokers})
        for f in admin.create_topics([NewTopic("copy.accounts", 1, 1)]).values():
            f.result(30)
        script = os.path.join(c.dir, "side.sql")
        with open(script, "w") as f:
            f.write("INSERT INTO side (v) VALUES (1);\n")
        load = subprocess.Popen([f"{decode.PG_BIN}/pgbench", "-n", "-c", "1", "-R", str(args.workload_rate),
                                 "-T", "3600", "-f", script, "bench"], env=c.env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print(f"# {args.rows:,} rows (pgbench_accounts-like), chunks of {args.chunk:,}; a {args.workload_rate} tx/s "
              f"insert workload on another table meanwhile; PostgreSQL 15 (fsync off), tansu 0.6.0 (SQLite), "
              f"{os.cpu_count()} cores", flush=True)

        # 1. The ceiling: COPY of the rows as JSON into the pipe's producer.
        t0 = time.perf_counter()
        copy = subprocess.Popen([f"{decode.PG_BIN}/psql", "-X", "-q", "-d", "bench", "-c",
                                 "COPY (SELECT row_to_json(t) FROM accounts t) TO STDOUT"],
                                env=c.env, stdout=subprocess.PIPE)
        prod = subprocess.Popen([sys.executable, PIPE, brokers, "copy.accounts"], stdin=copy.stdout,
                                stderr=subprocess.PIPE, cwd=os.path.dirname(PIPE))
        copy.stdout.close()
        w1, w2 = relay_bench.ProcWatch(copy.pid), relay_bench.ProcWatch(prod.pid)
        copy.wait(); prod.wait()
        copy_wall = time.perf_counter() - t0
        if prod.returncode != 0:
            sys.exit(f"producer failed: {prod.stderr.read().decode()}")
        copy_cpu = w1.cpu + w2.cpu
        w1.stop(); w2.stop()
        print(f"COPY | producer: {copy_wall:.2f} s, {copy_cpu:.2f} CPU s (psql + producer)", flush=True)

        # 2. The relay's incremental snapshot, until Kafka has every chunk (state done).
        http = relay_bench.free_port()
        cfg = os.path.join(c.dir, "relay.toml")
        with open(cfg, "w") as f:
            f.write(f'[source]\nname = "bench"\ndsn = "host=127.0.0.1 port={c.port} user=postgres dbname=bench"\n'
                    f'slot = "snap"\nsnapshot = "initial"\nsnapshot_chunk_rows = {args.chunk}\n'
                    f'tables = ["public.accounts"]\n'
                    f'[kafka]\nbrokers = "{brokers}"\nheaders = false\n'
                    f'[http]\nlisten = "127.0.0.1:{http}"\n[log]\nlevel = "warn"\n')
        t0 = time.perf_counter()
        rp = subprocess.Popen([RELAY, "--config", cfg, "source"], stdout=subprocess.DEVNULL,
                              stderr=open(os.path.join(c.dir, "relay.log"), "w"))
        w = relay_bench.ProcWatch(rp.pid)
        max_retained = 0
        while True:
            st = c.psql("SELECT state FROM saiki.snapshots WHERE table_name = 'public.accounts'")
            if st == "done":
                break
            if st == "failed" or rp.poll() is not None:
                sys.exit(f"snapshot failed; log in {c.dir}/relay.log")
            r = c.psql("SELECT coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn), 0)::bigint "
                       "FROM pg_replication_slots WHERE slot_name = 'snap'")
            max_retained = max(max_retained, int(r or 0))
            time.sleep(0.1)
        snap_wall = time.perf_counter() - t0
        snap_cpu, snap_rss = w.cpu, w.hwm
        rp.terminate(); rp.wait(); w.stop()
        print(f"saiki-relay snapshot: {snap_wall:.2f} s, {snap_cpu:.2f} CPU s, {snap_rss / 1024:.0f} MB peak RSS, "
              f"slot retained at most {max_retained / 1048576:.1f} MiB of WAL", flush=True)

        n = args.rows
        print(f"\n{'path':<34} {'rows/s':>10} {'CPU s/M rows':>13}")
        print(f"{'saiki-relay snapshot':<34} {n / snap_wall:>10,.0f} {snap_cpu / n * 1e6:>13.2f}")
        print(f"{'COPY | producer (ceiling)':<34} {n / copy_wall:>10,.0f} {copy_cpu / n * 1e6:>13.2f}")
        print(f"snapshot / ceiling = {copy_wall / snap_wall:.2f} (goal >= 0.70)")
    finally:
        if load:
            load.kill(); load.wait()
        broker.kill(); broker.wait()
        import shutil; shutil.rmtree(bdir, ignore_errors=True)
        c.stop()


if __name__ == "__main__":
    main()
