#!/usr/bin/env python3
"""bench/decode: one WAL backlog decoded by saiki, wal2json (format-version 2), test_decoding,
decoderbufs and pgoutput, each with `pg_recvlogical --endpos` into a byte counter, in the same
run on the same server. Prints changes/s, walsender CPU per change and output bytes for each,
and the ratios saiki/wal2json and saiki/pgoutput.

Backlog (after issue #2's sizing): pgbench -i -s SCALE, TXNS pgbench transactions, WIDE wide
rows (text, numeric, jsonb) with updates and deletes of part of them.

Run as root after scripts/setup.sh and a release install of the extension
(scripts/bench-decode.sh does both). Everything runs on 127.0.0.1 and is torn down at exit.
"""
import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

PG_BIN = "/usr/lib/postgresql/15/bin"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def as_postgres(args):
    return ["runuser", "-u", "postgres", "--"] + args if os.geteuid() == 0 else args


class Cluster:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="saiki-bench-")
        shutil.chown(self.dir, "postgres", "postgres")
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        data = os.path.join(self.dir, "data")
        sh(as_postgres([f"{PG_BIN}/initdb", "-D", data, "-A", "trust", "-U", "postgres", "-E", "UTF8",
                        "--locale=C", "--no-sync"]), stdout=subprocess.DEVNULL)
        with open(os.path.join(data, "postgresql.conf"), "a") as f:
            f.write(f"""
listen_addresses = '127.0.0.1'
port = {self.port}
unix_socket_directories = '{self.dir}'
wal_level = logical
max_replication_slots = 40
max_wal_senders = 10
fsync = off
full_page_writes = off
shared_buffers = 512MB
max_wal_size = 8GB
checkpoint_timeout = 30min
timezone = 'UTC'
output_plugin_libraries = 'pgoutput, test_decoding, saiki, wal2json, decoderbufs'
""")
        sh(as_postgres([f"{PG_BIN}/pg_ctl", "-D", data, "-l", os.path.join(self.dir, "log"), "-w", "start"]),
           stdout=subprocess.DEVNULL)
        self.env = dict(os.environ, PGHOST="127.0.0.1", PGPORT=str(self.port), PGUSER="postgres")

    def psql(self, sql, db="bench"):
        out = subprocess.run([f"{PG_BIN}/psql", "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-d", db,
                              "-c", sql], check=True, env=self.env, capture_output=True, text=True)
        return out.stdout.strip()

    def stop(self):
        subprocess.run(as_postgres([f"{PG_BIN}/pg_ctl", "-D", os.path.join(self.dir, "data"), "-m",
                                    "immediate", "stop"]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(self.dir, ignore_errors=True)


DECODERS = {
    # name: (plugin, pg_recvlogical -o options)
    "saiki": ("saiki", []),
    # The same records, several per replication message (the relay's mode): far fewer sends.
    "saiki-batch": ("saiki", ["batch-bytes=65536"]),
    "wal2json": ("wal2json", ["format-version=2", "include-types=false", "include-xids=true",
                              "include-lsn=true"]),
    "test_decoding": ("test_decoding", []),
    "decoderbufs": ("decoderbufs", []),
    "pgoutput": ("pgoutput", ["proto_version=1", "publication_names=bench_pub"]),
}


def slot_name(decoder, run):
    return f"b_{decoder.replace('-', '_')}_{run}"


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def walsender_pid(c, slot, deadline):
    while time.time() < deadline:
        pid = c.psql(f"SELECT active_pid FROM pg_replication_slots WHERE slot_name = '{slot}' AND active")
        if pid:
            return int(pid)
        time.sleep(0.005)
    return None


def drain(c, name, slot, endpos):
    plugin, opts = DECODERS[name]
    cmd = [f"{PG_BIN}/pg_recvlogical", "-d", "bench", "-S", slot, "--start", "--no-loop", "-f", "-",
           "--endpos", endpos]
    for o in opts:
        cmd += ["-o", o]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=c.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    nbytes = [0]

    def count():
        while True:
            b = p.stdout.read(1 << 20)
            if not b:
                break
            nbytes[0] += len(b)

    t = threading.Thread(target=count)
    t.start()
    pid = walsender_pid(c, slot, time.time() + 10)
    cpu = 0.0
    # Poll the walsender's CPU until it exits; the last reading before exit is its total
    # (sampling every 10 ms: under 1% of a run of a second or more).
    while pid:
        try:
            cpu = cpu_seconds(pid)
        except (FileNotFoundError, ProcessLookupError):
            break
        if p.poll() is not None:
            break
        time.sleep(0.01)
    p.wait()
    t.join()
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"{name}: pg_recvlogical failed: {p.stderr.read().decode()}")
    return wall, cpu, nbytes[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=int, default=3)
    ap.add_argument("--txns", type=int, default=3000)
    ap.add_argument("--wide", type=int, default=200000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--decoders", default="saiki,saiki-batch,wal2json,test_decoding,decoderbufs,pgoutput")
    args = ap.parse_args()
    names = args.decoders.split(",")
    if "saiki" not in names:
        sys.exit("--decoders must include saiki (the changes are counted through it)")

    c = Cluster()
    try:
        c.psql("CREATE DATABASE bench", db="postgres")
        c.psql("""CREATE TABLE wide (id bigint PRIMARY KEY, title text, body text, price numeric(12,2),
                  qty int, tags text[], meta jsonb, created timestamptz)""")
        c.psql("CREATE PUBLICATION bench_pub FOR ALL TABLES")
        for n in names:
            for r in range(args.runs):
                c.psql(f"SELECT pg_create_logical_replication_slot('{slot_name(n, r)}', '{DECODERS[n][0]}')")
        sh([f"{PG_BIN}/pgbench", "-i", "-q", "-s", str(args.scale), "-n", "bench"], env=c.env,
           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        sh([f"{PG_BIN}/pgbench", "-n", "-c", "2", "-t", str(args.txns // 2), "bench"], env=c.env,
           stdout=subprocess.DEVNULL)
        c.psql(f"""INSERT INTO wide SELECT g, 'title ' || g, repeat('body text ', 20) || g, g * 1.25, g % 100,
                  ARRAY['a', 'b', g::text], jsonb_build_object('g', g, 'name', 'n' || g, 'tags', jsonb_build_array(1, 2, 3)),
                  '2026-01-01'::timestamptz + g * interval '1 second'
                  FROM generate_series(1, {args.wide}) g""")
        c.psql(f"UPDATE wide SET qty = qty + 1, price = price * 2 WHERE id % 4 = 0")
        c.psql(f"DELETE FROM wide WHERE id % 10 = 0")
        endpos = c.psql("SELECT pg_current_wal_lsn()")
        # Count the changes once, through saiki's first slot without consuming it: every
        # decoder drains the same backlog. (I, U, D records; B/C left out.)
        changes = int(c.psql(f"""SELECT count(*) FROM pg_logical_slot_peek_changes('{slot_name("saiki", 0)}', '{endpos}', NULL,
                                 'include-transaction', '0')"""))
        print(f"backlog: {changes} changes (pgbench -s {args.scale}, {args.txns} transactions, "
              f"{args.wide} wide rows with updates and deletes), end LSN {endpos}")
        results = {}
        for r in range(args.runs):
            for n in names:  # interleaved, so drift on the machine hits every decoder alike
                wall, cpu, nbytes = drain(c, n, slot_name(n, r), endpos)
                results.setdefault(n, []).append((wall, cpu, nbytes))
        print(f"\n{'decoder':<14} {'changes/s':>12} {'wall s':>8} {'CPU us/change':>14} {'output MB':>10}")
        summary = {}
        for n in names:
            wall = statistics.median(x[0] for x in results[n])
            cpu = statistics.median(x[1] for x in results[n])
            nbytes = results[n][0][2]
            summary[n] = (changes / wall, cpu / changes * 1e6, nbytes)
            print(f"{n:<14} {changes / wall:>12,.0f} {wall:>8.2f} {cpu / changes * 1e6:>14.2f} {nbytes / 1e6:>10.1f}")
        print(f"(median of {args.runs} runs each; CPU = the walsender's user+system time)")
        for mine in ("saiki", "saiki-batch"):
            for peer in ("wal2json", "pgoutput", "test_decoding", "decoderbufs"):
                if mine in summary and peer in summary:
                    s, p = summary[mine], summary[peer]
                    print(f"{mine}/{peer}: {s[0] / p[0]:.2f}x changes/s, {s[1] / p[1]:.2f}x CPU per change, "
                          f"{s[2] / p[2]:.2f}x bytes")
    finally:
        c.stop()


if __name__ == "__main__":
    main()
