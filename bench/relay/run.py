#!/usr/bin/env python3
"""bench/relay: one WAL backlog (>= 1,000,000 changes) drained into the same broker by
`saiki-relay source` (ack discipline on) and by the classic pipe `pg_recvlogical -P wal2json |
confluent-kafka producer`, plus a bare producer of as many messages as the broker's ceiling.
Prints changes/s, CPU seconds per million changes (the relay's process; the pipe's two
processes), peak RSS, each rate as a share of the ceiling, and the ratios relay/pipe.

Run through bench/relay/run.sh (builds the release relay, installs confluent-kafka)."""
import argparse, os, shutil, socket, subprocess, sys, tempfile, threading, time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "decode"))
import run as decode  # the throw-away cluster of bench/decode

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
RELAY = os.path.join(ROOT, "target", "release", "saiki-relay")
HERE = os.path.dirname(os.path.abspath(__file__))


def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p


class ProcWatch:
    """Samples a process's CPU (user+system) and peak RSS until it exits."""
    def __init__(self, pid):
        self.pid, self.cpu, self.hwm, self.done = pid, 0.0, 0, False
        self.t = threading.Thread(target=self.loop, daemon=True); self.t.start()

    def loop(self):
        while not self.done:
            try:
                with open(f"/proc/{self.pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                self.cpu = (int(fields[11]) + int(fields[12])) / decode.CLK_TCK
                with open(f"/proc/{self.pid}/status") as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            self.hwm = max(self.hwm, int(line.split()[1]))
            except (FileNotFoundError, ProcessLookupError, IndexError):
                return
            time.sleep(0.02)

    def stop(self):
        self.done = True; self.t.join()


def start_broker():
    d = tempfile.mkdtemp(prefix="saiki-bench-broker-")
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    p = subprocess.Popen([os.path.expanduser("~/.cargo/bin/tansu"), "broker", "--listener-url", url,
                          "--advertised-listener-url", url, "--storage-engine", "sqlite://log.db"],
                         cwd=d, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close(); break
        except OSError:
            time.sleep(0.05)
    import sqlite3  # tansu 0.6.0 lacks this index (docs/testing.md)
    for _ in range(300):
        try:
            c = sqlite3.connect(os.path.join(d, "log.db"), timeout=30)
            c.execute("create index if not exists saiki_header_topition_offset on header (topition, offset_id)")
            c.commit(); break
        except sqlite3.OperationalError:
            time.sleep(0.1)
    return p, d, f"127.0.0.1:{port}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--relay-property", action="append", default=[], metavar="KEY=VALUE",
                    help="a librdkafka property for saiki-relay's [kafka.properties] (repeatable)")
    args = ap.parse_args()
    c = decode.Cluster()
    broker, bdir, brokers = start_broker()
    try:
        c.psql("CREATE DATABASE bench", db="postgres")
        c.psql("CREATE TABLE accounts (aid bigint PRIMARY KEY, bid int, abalance int, filler char(84))")
        c.psql("SELECT pg_create_logical_replication_slot('relay_slot', 'saiki')")
        c.psql("SELECT pg_create_logical_replication_slot('relay_slot2', 'saiki')")
        c.psql("SELECT pg_create_logical_replication_slot('pipe_slot', 'wal2json')")
        step = 100_000
        for lo in range(1, args.rows + 1, step):
            c.psql(f"INSERT INTO accounts SELECT g, g % 100, 0, '' FROM generate_series({lo}, {min(lo + step - 1, args.rows)}) g")
        end = c.psql("SELECT pg_current_wal_lsn()")
        from confluent_kafka.admin import AdminClient, NewTopic  # the broker does not auto-create
        admin = AdminClient({"bootstrap.servers": brokers})
        for f in admin.create_topics([NewTopic("pipe.changes", 1, 1), NewTopic("bare", 1, 1)]).values():
            f.result(30)
        n = args.rows
        print(f"backlog: {n} inserts (pgbench_accounts-like rows) in {len(range(1, n + 1, step))} transactions, end LSN {end}")

        # 1. saiki-relay source, with DESIGN's four headers and without (like the pipe's
        #    messages): time until the slot is confirmed to the end (everything acknowledged).
        relay_runs = []
        for headers, slot in ((True, "relay_slot"), (False, "relay_slot2")):
            http = free_port()
            cfg = os.path.join(c.dir, f"relay-{slot}.toml")
            with open(cfg, "w") as f:
                f.write(f'[source]\nname = "bench"\ndsn = "host=127.0.0.1 port={c.port} user=postgres dbname=bench"\n'
                        f'slot = "{slot}"\nstatus_interval = "100ms"\n[kafka]\nbrokers = "{brokers}"\n'
                        f'topic_prefix = "relay{int(headers)}"\nheaders = {str(headers).lower()}\n'
                        f'[http]\nlisten = "127.0.0.1:{http}"\n[log]\nlevel = "warn"\n')
                if args.relay_property:
                    f.write("[kafka.properties]\n")
                    for kv in args.relay_property:
                        k, v = kv.split("=", 1)
                        f.write(f'"{k}" = "{v}"\n')
            t0 = time.perf_counter()
            rp = subprocess.Popen([RELAY, "--config", cfg, "source"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            w = ProcWatch(rp.pid)
            while True:
                done = c.psql(f"SELECT confirmed_flush_lsn >= '{end}' FROM pg_replication_slots WHERE slot_name = '{slot}'")
                if done == "t":
                    break
                if rp.poll() is not None:
                    sys.exit("saiki-relay exited early")
                time.sleep(0.05)
            wall = time.perf_counter() - t0
            relay_runs.append((headers, wall, w.cpu, w.hwm))
            rp.terminate(); rp.wait(); w.stop()
            print(f"relay (headers {'on' if headers else 'off'}): {wall:.2f} s, {w.cpu:.2f} CPU s, {w.hwm / 1024:.0f} MB peak RSS", flush=True)

        # 2. The pipe: pg_recvlogical -P wal2json | confluent-kafka producer, until both exit.
        t0 = time.perf_counter()
        recv = subprocess.Popen([f"{decode.PG_BIN}/pg_recvlogical", "-d", "bench", "-S", "pipe_slot", "--start",
                                 "--no-loop", "-f", "-", "--endpos", end, "-o", "format-version=2"],
                                env=c.env, stdout=subprocess.PIPE)
        prod = subprocess.Popen([sys.executable, os.path.join(HERE, "pipe_producer.py"), brokers, "pipe.changes"],
                                stdin=recv.stdout, stderr=subprocess.PIPE)
        recv.stdout.close()
        w1, w2 = ProcWatch(recv.pid), ProcWatch(prod.pid)
        recv.wait(); prod.wait()
        pipe_wall = time.perf_counter() - t0
        if prod.returncode != 0:
            sys.exit(f"pipe producer failed: {prod.stderr.read().decode()}")
        pipe_cpu, pipe_rss = w1.cpu + w2.cpu, w1.hwm + w2.hwm
        w1.stop(); w2.stop()
        print(f"pipe: {pipe_wall:.2f} s, {pipe_cpu:.2f} CPU s, {pipe_rss / 1024:.0f} MB peak RSS", flush=True)

        # 3. The broker's ceiling: a bare producer of as many ~300-byte messages.
        out = subprocess.run([sys.executable, os.path.join(HERE, "bare_producer.py"), brokers, "bare", str(n), "300"],
                             capture_output=True, text=True, check=True)
        ceiling = float(out.stdout.strip())

        rows = [(f"saiki-relay, headers {'on' if h else 'off'}", n / wall, cpu, rss) for h, wall, cpu, rss in relay_runs]
        rows.append(("pipe (wal2json | producer)", n / pipe_wall, pipe_cpu, pipe_rss))
        print(f"\n{'path':<28} {'changes/s':>10} {'of ceiling':>10} {'CPU s/M changes':>16} {'peak RSS MB':>12}")
        for name, rate, cpu, rss in rows:
            print(f"{name:<28} {rate:>10,.0f} {rate / ceiling:>9.0%} {cpu / n * 1e6:>16.2f} {rss / 1024:>12.1f}")
        print(f"{'bare producer (ceiling)':<28} {ceiling:>10,.0f} {1:>9.0%}")
        pipe = rows[-1]
        for r in rows[:-1]:
            print(f"{r[0]} / pipe: {r[1] / pipe[1]:.2f}x changes/s, {r[2] / pipe[2]:.2f}x CPU per change, "
                  f"{r[3] / max(pipe[3], 1):.2f}x peak RSS")
    finally:
        broker.kill(); broker.wait(); shutil.rmtree(bdir, ignore_errors=True)
        c.stop()


if __name__ == "__main__":
    main()
