//! Saiki's test rig: throw-away PostgreSQL 15 clusters for integration tests.
//!
//! Each [`PgCluster`] has its own data directory and loopback port, runs as the `postgres`
//! OS user (PostgreSQL refuses root), has `wal_level = logical`, and lets PostgreSQL load the
//! `saiki`, `wal2json` and `decoderbufs` output plugins. Dropping it stops the server and
//! removes the directory, also when the test panics.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

pub use postgres;

pub mod type_samples;

pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// Directory prefix of every cluster the rig creates; `scripts/test.sh` removes leftovers.
pub const DATA_PREFIX: &str = "/tmp/saiki-test-";

static SEQ: AtomicUsize = AtomicUsize::new(0);

pub struct PgCluster {
    pub dir: PathBuf,
    pub port: u16,
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed: {}\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// A command run as the `postgres` OS user when we are root, as ourselves otherwise.
pub fn as_postgres(program: &str) -> Command {
    // SAFETY-free check of the effective uid through `id -u`, to avoid a libc dependency.
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", program]);
        c
    } else {
        Command::new(program)
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl PgCluster {
    /// Starts a new cluster with the rig's settings plus `extra_conf` lines.
    pub fn start(extra_conf: &[&str]) -> PgCluster {
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let dir = PathBuf::from(format!("{DATA_PREFIX}{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        run(Command::new("chown").args(["postgres:postgres", dir.to_str().unwrap()]));
        let data = dir.join("data");
        run(as_postgres(&format!("{PG_BIN}/initdb")).args([
            "-D",
            data.to_str().unwrap(),
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ]));
        let mut conf = vec![
            "listen_addresses = '127.0.0.1'".to_string(),
            format!("unix_socket_directories = '{}'", dir.display()),
            "wal_level = logical".into(),
            "max_replication_slots = 20".into(),
            "max_wal_senders = 20".into(),
            "fsync = off".into(),
            "full_page_writes = off".into(),
            "shared_buffers = 128MB".into(),
            "max_wal_size = 4GB".into(),
            "timezone = 'UTC'".into(),
        ];
        if supports_output_plugin_libraries() {
            conf.push(
                "output_plugin_libraries = 'pgoutput, test_decoding, saiki, wal2json, decoderbufs'"
                    .into(),
            );
        }
        conf.extend(extra_conf.iter().map(|s| s.to_string()));
        let conf_path = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf_path).unwrap();
        text.push_str("\n# saiki test rig\n");
        text.push_str(&conf.join("\n"));
        text.push('\n');
        // Port last: retried below if another process took it meanwhile.
        let mut cluster = PgCluster { dir, port: 0 };
        for attempt in 0..5 {
            let port = free_port();
            std::fs::write(&conf_path, format!("{text}port = {port}\n")).unwrap();
            run(Command::new("chown").args(["postgres:postgres", conf_path.to_str().unwrap()]));
            let status = as_postgres(&format!("{PG_BIN}/pg_ctl"))
                .args(["-D", data.to_str().unwrap(), "-l"])
                .arg(cluster.dir.join("log"))
                .args(["-w", "-t", "60", "start"])
                .output()
                .unwrap();
            if status.status.success() {
                cluster.port = port;
                return cluster;
            }
            if attempt == 4 {
                let log = std::fs::read_to_string(cluster.dir.join("log")).unwrap_or_default();
                panic!(
                    "PostgreSQL did not start: {}\n{log}",
                    String::from_utf8_lossy(&status.stderr)
                );
            }
        }
        unreachable!()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// A connection string for `dbname` as the superuser `postgres`.
    pub fn dsn(&self, dbname: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={dbname}",
            self.port
        )
    }

    pub fn connect(&self, dbname: &str) -> postgres::Client {
        postgres::Client::connect(&self.dsn(dbname), postgres::NoTls)
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.dsn(dbname)))
    }

    /// Creates a database and returns a connection to it.
    pub fn create_db(&self, name: &str) -> postgres::Client {
        self.connect("postgres")
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap();
        self.connect(name)
    }

    /// Restarts the server (fast shutdown), logging to the cluster's log file, and waits
    /// until it accepts connections again.
    pub fn restart(&self) {
        self.pg_ctl(&["-m", "fast", "-w", "-t", "60", "restart"]);
    }

    /// Runs `pg_ctl -D <data> -l <log> <args>` as the `postgres` user (its output to
    /// nowhere: a server it starts keeps inherited pipes open); panics if it fails.
    fn pg_ctl(&self, args: &[&str]) {
        let status = as_postgres(&format!("{PG_BIN}/pg_ctl"))
            .args(["-D", self.data_dir().to_str().unwrap(), "-l"])
            .arg(self.dir.join("log"))
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("run pg_ctl");
        assert!(status.success(), "pg_ctl {args:?} failed:\n{}", self.log());
    }

    /// A streaming physical standby of this cluster (`pg_basebackup -R`), started on a port
    /// of its own; it follows this cluster until [`PgCluster::promote`].
    pub fn start_standby(&self) -> PgCluster {
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let dir = PathBuf::from(format!("{DATA_PREFIX}{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        run(Command::new("chown").args(["postgres:postgres", dir.to_str().unwrap()]));
        let data = dir.join("data");
        run(as_postgres(&format!("{PG_BIN}/pg_basebackup")).args([
            "-h",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-U",
            "postgres",
            "-D",
            data.to_str().unwrap(),
            "-R",
            "-X",
            "stream",
            "--no-sync",
        ]));
        let port = free_port();
        let conf = data.join("postgresql.conf");
        let text = std::fs::read_to_string(&conf).unwrap();
        std::fs::write(
            &conf,
            format!(
                "{text}\n# standby\nport = {port}\nunix_socket_directories = '{}'\n",
                dir.display()
            ),
        )
        .unwrap();
        let standby = PgCluster { dir, port };
        standby.pg_ctl(&["-w", "-t", "60", "start"]);
        standby
    }

    /// Stops the server at once (`-m immediate`: no shutdown checkpoint, as a crash).
    pub fn stop_immediately(&self) {
        self.pg_ctl(&["-m", "immediate", "-w", "stop"]);
    }

    /// Promotes a standby to a primary and waits until it accepts writes.
    pub fn promote(&self) {
        self.pg_ctl(&["-w", "-t", "60", "promote"]);
    }

    /// The server log so far, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    /// A PostgreSQL client program (`psql`, `pg_recvlogical`, …) aimed at this cluster.
    pub fn client_cmd(&self, program: &str) -> Command {
        let mut c = Command::new(Path::new(PG_BIN).join(program));
        c.env("PGHOST", "127.0.0.1")
            .env("PGPORT", self.port.to_string())
            .env("PGUSER", "postgres");
        c
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = as_postgres(&format!("{PG_BIN}/pg_ctl"))
            .args([
                "-D",
                self.data_dir().to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether this PostgreSQL has `output_plugin_libraries` (15.20 and later minors).
pub fn supports_output_plugin_libraries() -> bool {
    Command::new(format!("{PG_BIN}/postgres"))
        .arg("--describe-config")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("output_plugin_libraries"))
        .unwrap_or(false)
}

/// Reads and consumes a slot's changes through SQL, one string per output row.
pub fn get_changes(client: &mut postgres::Client, slot: &str, options: &[&str]) -> Vec<String> {
    let opts: Vec<String> = options.iter().map(|s| s.to_string()).collect();
    client
        .query(
            "SELECT data FROM pg_logical_slot_get_changes($1, NULL, NULL, VARIADIC $2::text[])",
            &[&slot, &opts],
        )
        .unwrap_or_else(|e| panic!("get_changes({slot}): {e}"))
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect()
}

/// Parses records, failing the test with the offending line if one is not valid JSON.
pub fn parse_records(lines: &[String]) -> Vec<saiki_core::record::Record> {
    lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a record ({e}): {l}")))
        .collect()
}

/// Runs each statement on its own, as autocommit does (a slot cannot be created in a
/// transaction that wrote), failing the test with the statement that failed.
pub fn exec(client: &mut postgres::Client, statements: &[&str]) {
    for s in statements {
        client
            .batch_execute(s)
            .unwrap_or_else(|e| panic!("{s}: {e}"));
    }
}

/// The server's current WAL insert position as text (`X/X`).
pub fn current_wal_lsn(client: &mut postgres::Client) -> String {
    client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .unwrap()
        .get(0)
}

/// Reads a slot over the walsender with `pg_recvlogical --start --endpos`, one string per
/// output line (a record), plugin options as `name=value`.
pub fn recvlogical(
    pg: &PgCluster,
    db: &str,
    slot: &str,
    endpos: &str,
    options: &[&str],
) -> Vec<String> {
    let mut cmd = pg.client_cmd("pg_recvlogical");
    cmd.args([
        "-d",
        db,
        "-S",
        slot,
        "--start",
        "--no-loop",
        "-f",
        "-",
        "--endpos",
        endpos,
    ]);
    for o in options {
        cmd.args(["-o", o]);
    }
    let out = cmd.output().expect("run pg_recvlogical");
    assert!(
        out.status.success(),
        "pg_recvlogical: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("UTF-8 output")
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// A throw-away Kafka-protocol broker: `tansu` with SQLite storage in its own directory, on
/// a loopback port. Survives `restart()` (the data is on disk); killed on drop.
pub struct Broker {
    pub dir: PathBuf,
    pub port: u16,
    /// The port the broker tells clients to use, when that is not its own (a TLS proxy in
    /// front of it).
    advertised: Option<u16>,
    /// Client authentication (SASL) required.
    authentication: bool,
    child: Option<std::process::Child>,
}

impl Broker {
    pub fn start() -> Broker {
        Broker::start_advertising(None)
    }

    /// A broker that advertises `port` (where a proxy listens) instead of its own.
    pub fn start_advertising(port: Option<u16>) -> Broker {
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let dir = PathBuf::from(format!("{DATA_PREFIX}broker-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut b = Broker {
            dir,
            port: free_port(),
            advertised: port,
            authentication: false,
            child: None,
        };
        b.spawn();
        b
    }

    /// Creates SCRAM-SHA-512 users (`tansu user create`) and restarts the broker requiring
    /// SASL authentication from every client.
    pub fn require_authentication(&mut self, users: &[(&str, &str)]) {
        let tansu = tansu_path();
        for (name, password) in users {
            let out = Command::new(&tansu)
                .args(["user", "create", "--broker"])
                .arg(format!("tcp://127.0.0.1:{}", self.port))
                .args([name, password])
                .output()
                .expect("tansu user create");
            assert!(
                out.status.success(),
                "tansu user create {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        self.authentication = true;
        self.restart();
    }

    fn spawn(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let advertised = format!("tcp://127.0.0.1:{}", self.advertised.unwrap_or(self.port));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("broker.log"))
            .unwrap();
        let child = Command::new(tansu_path())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &advertised,
            ])
            .args(["--storage-engine", "sqlite://log.db"])
            .args(self.authentication.then_some("--authentication"))
            .current_dir(&self.dir)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start tansu (scripts/setup.sh installs it)");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "tansu did not listen on {}",
                self.port
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        add_tansu_header_index(&self.dir.join("log.db"));
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

fn tansu_path() -> String {
    std::env::var("TANSU").unwrap_or_else(|_| {
        let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
        format!("{home}/.cargo/bin/tansu")
    })
}

/// tansu 0.6.0's SQLite schema has no index on `header (topition, offset_id)`, and its fetch
/// looks up the headers of every record it returns: with headers on every message
/// (docs/relay.md) each fetched record scans the whole header table, so reading a topic is quadratic and
/// a 200,000-message partition wedges the broker. The rig adds the index once tansu has
/// created its schema (it is kept in the database across restarts). See docs/testing.md.
pub fn add_tansu_header_index(db: &Path) {
    let script = format!(
        "import sqlite3, time\n\
         deadline = time.time() + 30\n\
         while True:\n\
         \x20   try:\n\
         \x20       c = sqlite3.connect({db:?}, timeout=30)\n\
         \x20       c.execute('create index if not exists saiki_header_topition_offset on header (topition, offset_id)')\n\
         \x20       c.commit()\n\
         \x20       break\n\
         \x20   except sqlite3.OperationalError:\n\
         \x20       if time.time() > deadline: raise\n\
         \x20       time.sleep(0.1)\n",
        db = db.display().to_string()
    );
    let out = Command::new("python3")
        .arg("-c")
        .arg(&script)
        .output()
        .expect("python3 (scripts/setup.sh installs it)");
    assert!(
        out.status.success(),
        "adding the header index to {}: {}",
        db.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            // A failed test keeps the broker's directory and shows the end of its log.
            let log = std::fs::read_to_string(self.dir.join("broker.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!(
                "--- broker log tail ({}) ---",
                self.dir.join("broker.log").display()
            );
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
            return;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A free loopback port (for the relay's HTTP endpoint in tests).
pub fn loopback_port() -> u16 {
    free_port()
}
