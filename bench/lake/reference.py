"""bench/lake's reference writer: what a team writes by hand instead of the lake relay.
confluent-kafka (librdkafka, as the relay) reads the change topic, json parses each record,
and pyarrow writes the same rows (the lake's six _saiki_* columns and the table's columns) as
zstd Parquet files of about --file-rows rows. No table format, no catalog, no exactly once:
a floor of the work, not a peer with the same guarantees.

With --from-file, the records come from a file of one record per line (sink_bench dump), read
into memory before the clock starts: the engine-only figure, without the broker.

Prints `result engine=reference rows=N seconds=S files=F bytes=B`."""
import argparse, json, os, time
from datetime import datetime

import pyarrow as pa
import pyarrow.parquet as pq
from confluent_kafka import Consumer

SCHEMA = pa.schema([
    ("_saiki_action", pa.string()), ("_saiki_source", pa.string()),
    ("_saiki_commit_lsn", pa.int64()), ("_saiki_seq", pa.int64()),
    ("_saiki_commit_ts", pa.timestamp("us", tz="UTC")), ("_saiki_unchanged", pa.list_(pa.string())),
    ("aid", pa.int64()), ("bid", pa.int32()), ("abalance", pa.int32()), ("filler", pa.string()),
])


def lsn(s):
    hi, lo = s.split("/")
    return (int(hi, 16) << 32) + int(lo, 16)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--brokers")
    ap.add_argument("--from-file", help="records from this file (one per line), not from Kafka")
    ap.add_argument("--topic", default="saiki.public.accounts")
    ap.add_argument("--rows", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--file-rows", type=int, default=500_000)
    ap.add_argument("--fetch-wait-ms", default="500")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    lines = None
    if a.from_file:
        with open(a.from_file, "rb") as f:
            lines = f.read().splitlines()[:a.rows]
    started = time.time()
    cols = {f.name: [] for f in SCHEMA}
    n = files = size = 0

    def flush():
        nonlocal files, size, cols
        if not cols["aid"]:
            return
        path = os.path.join(a.out, f"part-{files:05}.parquet")
        pq.write_table(pa.table(cols, schema=SCHEMA), path, compression="zstd")
        files += 1
        size += os.path.getsize(path)
        cols = {f.name: [] for f in SCHEMA}

    def take(value):
        nonlocal n
        r = json.loads(value)
        row = r.get("columns") or r.get("identity") or {}
        ts = r.get("commit_ts")
        cols["_saiki_action"].append(r["action"])
        cols["_saiki_source"].append(r.get("source"))
        cols["_saiki_commit_lsn"].append(lsn(r["commit_lsn"]))
        cols["_saiki_seq"].append(r["seq"])
        cols["_saiki_commit_ts"].append(datetime.fromisoformat(ts) if ts else None)
        cols["_saiki_unchanged"].append(r.get("unchanged_toast"))
        for k in ("aid", "bid", "abalance", "filler"):
            cols[k].append(row.get(k))
        n += 1
        if len(cols["aid"]) >= a.file_rows:
            flush()

    if lines is not None:
        for value in lines:
            take(value)
    else:
        c = Consumer({"bootstrap.servers": a.brokers, "group.id": "reference-writer",
                      "group.instance.id": "reference-writer-1", "enable.auto.commit": False,
                      "auto.offset.reset": "earliest", "fetch.wait.max.ms": a.fetch_wait_ms})
        c.subscribe([a.topic])
        while n < a.rows:
            msgs = c.consume(10_000, 60)
            if not msgs:
                raise SystemExit(f"no message for 60 s after {n}")
            for m in msgs:
                if not m.error():
                    take(m.value())
        c.close()
    flush()
    print(f"result engine=reference rows={n} seconds={time.time() - started:.3f} files={files} bytes={size}")


if __name__ == "__main__":
    main()
