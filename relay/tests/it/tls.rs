//! TLS to PostgreSQL with libpq's sslmode semantics, on both of the relay's connections: the
//! source's replication stream and the sink's ODS connection. Certificates are made for each
//! run with the openssl command-line tool: a test CA, a server certificate for 127.0.0.1, and a
//! second CA that signed nothing the server shows. The same certificates serve Kafka over
//! SASL_SSL: tansu 0.6.0 requiring SCRAM-SHA-512, behind stunnel for TLS (tansu accepts
//! --cert and --key but serves plain TCP).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;
use saiki_tests::{exec, loopback_port, Broker, PgCluster};

pub(crate) struct Certs {
    dir: PathBuf,
}

impl Certs {
    pub(crate) fn make() -> Certs {
        let dir = PathBuf::from(format!(
            "/tmp/saiki-test-tls-{}-{}",
            std::process::id(),
            loopback_port()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .output()
                .expect("openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        for ca in ["ca", "other-ca"] {
            let (key, pem, subj) = (
                format!("{ca}.key"),
                format!("{ca}.pem"),
                format!("/CN=saiki test {ca}"),
            );
            let mut a = vec!["req", "-x509"];
            a.extend(ec);
            a.extend(["-keyout", &key, "-out", &pem, "-days", "2", "-subj", &subj]);
            ssl(&a);
        }
        let mut a = vec!["req"];
        a.extend(ec);
        a.extend([
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=saiki-test-server",
        ]);
        ssl(&a);
        std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
        ssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ]);
        for f in ["server.crt", "server.key"] {
            let p = dir.join(f);
            Command::new("chown")
                .args(["postgres:postgres", p.to_str().unwrap()])
                .status()
                .unwrap();
        }
        Command::new("chmod")
            .args(["0600", dir.join("server.key").to_str().unwrap()])
            .status()
            .unwrap();
        Command::new("chmod")
            .args(["0755", dir.to_str().unwrap()])
            .status()
            .unwrap();
        Certs { dir }
    }

    pub(crate) fn path(&self, f: &str) -> String {
        self.dir.join(f).display().to_string()
    }

    fn server_conf(&self) -> Vec<String> {
        vec![
            "ssl = on".into(),
            format!("ssl_cert_file = '{}'", self.path("server.crt")),
            format!("ssl_key_file = '{}'", self.path("server.key")),
        ]
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_tls_cluster(certs: &Certs) -> PgCluster {
    let conf = certs.server_conf();
    PgCluster::start(&conf.iter().map(String::as_str).collect::<Vec<_>>())
}

/// The exit status and log of a relay that must stop by itself within `within`.
fn exits_within(mut r: Relay, within: Duration) -> (std::process::ExitStatus, String) {
    let deadline = Instant::now() + within;
    loop {
        if let Some(s) = r.child.try_wait().unwrap() {
            return (s, r.log_text());
        }
        if Instant::now() > deadline {
            let log = r.log_text();
            r.kill9();
            panic!("still running after {within:?}:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn first_row(db: &mut saiki_tests::postgres::Client, sql: &str) -> Vec<Option<String>> {
    text_rows(db, sql).into_iter().next().unwrap_or_default()
}

#[test]
fn the_pipeline_runs_over_verified_tls_to_the_source_and_the_ods() {
    let certs = Certs::make();
    let pg = start_tls_cluster(&certs);
    let broker = Broker::start();
    let mut db = pg.create_db("shop");
    let mut ods = pg.create_db("ods");
    exec(
        &mut db,
        &[
            "CREATE EXTENSION saiki",
            "CREATE TABLE orders (id int PRIMARY KEY, qty int)",
        ],
    );
    let tls = format!("sslmode=verify-full sslrootcert={}", certs.path("ca.pem"));
    let port = loopback_port();
    let cfg = relay_config(&pg, "shop", &broker, port, "")
        .replace("dbname=shop", &format!("dbname=shop {tls}"));
    let relay = Relay::start(&pg.dir, &cfg, port);
    wait_slot_active(&mut db, &relay);
    let sport = loopback_port();
    let scfg = sink_config(&pg, "ods", &broker, sport, "")
        .replace("dbname=ods", &format!("dbname=ods {tls}"));
    let sink = Relay::start_sink(&pg.dir, &scfg, sport);
    exec(
        &mut db,
        &["INSERT INTO orders SELECT g, g FROM generate_series(1, 100) g"],
    );
    wait_until(Duration::from_secs(90), &sink, || {
        let got = ods
            .query("SELECT count(*)::int FROM ods.orders", &[])
            .ok()
            .map(|r| r[0].get::<_, i32>(0));
        (got != Some(100)).then(|| format!("ODS has {got:?} rows"))
    });
    // Both connections are encrypted, as the server sees them.
    assert_eq!(
        first_row(
            &mut db,
            "SELECT s.ssl::text FROM pg_stat_replication r JOIN pg_stat_ssl s USING (pid)"
        ),
        vec![Some("true".to_string())],
        "the walsender's connection"
    );
    assert_eq!(
        first_row(
            &mut ods,
            "SELECT bool_and(s.ssl)::text, count(*)::text FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) WHERE a.application_name = 'saiki-relay sink'"
        ),
        vec![Some("true".to_string()), Some("1".to_string())],
        "the sink's ODS connection"
    );
    assert!(
        relay.log_text().contains("tls=true"),
        "{}",
        relay.log_text()
    );
}

#[test]
fn a_certificate_the_root_did_not_sign_stops_both_relays_with_a_clear_error() {
    let certs = Certs::make();
    let pg = start_tls_cluster(&certs);
    let broker = Broker::start();
    let mut db = pg.create_db("shop");
    pg.create_db("ods");
    exec(&mut db, &["CREATE EXTENSION saiki"]);
    let wrong = format!(
        "sslmode=verify-ca sslrootcert={}",
        certs.path("other-ca.pem")
    );
    let port = loopback_port();
    let cfg = relay_config(&pg, "shop", &broker, port, "")
        .replace("dbname=shop", &format!("dbname=shop {wrong}"));
    let (status, log) = exits_within(Relay::start(&pg.dir, &cfg, port), Duration::from_secs(30));
    assert_eq!(status.code(), Some(3), "{log}");
    assert!(
        log.contains("TLS to") && log.contains("sslrootcert"),
        "{log}"
    );
    let sport = loopback_port();
    let scfg = sink_config(&pg, "ods", &broker, sport, "")
        .replace("dbname=ods", &format!("dbname=ods {wrong}"));
    let (status, log) = exits_within(
        Relay::start_sink(&pg.dir, &scfg, sport),
        Duration::from_secs(30),
    );
    assert_eq!(status.code(), Some(6), "{log}");
    assert!(log.contains("TLS"), "{log}");
    // No slot was created by the refused relay.
    assert!(text_rows(&mut db, "SELECT slot_name FROM pg_replication_slots").is_empty());
}

#[test]
fn verify_ca_ignores_the_host_name_and_verify_full_does_not() {
    let certs = Certs::make();
    let pg = start_tls_cluster(&certs);
    let broker = Broker::start();
    let mut db = pg.create_db("shop");
    exec(&mut db, &["CREATE EXTENSION saiki"]);
    // The certificate names 127.0.0.1; "localhost" reaches the same server by another name.
    let by_name = |mode: &str| {
        relay_config(&pg, "shop", &broker, 0, "")
            .replace("host=127.0.0.1", "host=localhost")
            .replace(
                "dbname=shop",
                &format!(
                    "dbname=shop sslmode={mode} sslrootcert={}",
                    certs.path("ca.pem")
                ),
            )
    };
    let port = loopback_port();
    let cfg = fix_listen(&by_name("verify-full"), port);
    let (status, log) = exits_within(Relay::start(&pg.dir, &cfg, port), Duration::from_secs(30));
    assert_eq!(
        status.code(),
        Some(3),
        "verify-full refuses the name:\n{log}"
    );
    assert!(
        log.contains("NotValidForName") || log.contains("not valid for name"),
        "{log}"
    );

    let port = loopback_port();
    let cfg = fix_listen(&by_name("verify-ca"), port);
    let mut relay = Relay::start(&pg.dir, &cfg, port);
    wait_slot_active(&mut db, &relay);
    assert!(relay.terminate(Duration::from_secs(20)).success());
}

/// Points the config's http.listen at `port`.
fn fix_listen(cfg: &str, port: u16) -> String {
    cfg.lines()
        .map(|l| {
            if l.starts_with("listen = ") {
                format!("listen = \"127.0.0.1:{port}\"")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn sslmode_require_refuses_a_server_without_tls_and_prefer_falls_back() {
    let pg = PgCluster::start(&[]);
    let broker = Broker::start();
    let mut db = pg.create_db("shop");
    exec(&mut db, &["CREATE EXTENSION saiki"]);
    let port = loopback_port();
    let cfg = relay_config(&pg, "shop", &broker, port, "")
        .replace("dbname=shop", "dbname=shop sslmode=require");
    let (status, log) = exits_within(Relay::start(&pg.dir, &cfg, port), Duration::from_secs(30));
    assert_eq!(status.code(), Some(3), "{log}");
    assert!(log.contains("does not accept TLS"), "{log}");

    let port = loopback_port();
    let cfg = relay_config(&pg, "shop", &broker, port, "")
        .replace("dbname=shop", "dbname=shop sslmode=prefer");
    let mut relay = Relay::start(&pg.dir, &cfg, port);
    wait_slot_active(&mut db, &relay);
    assert!(
        relay.log_text().contains("tls=false"),
        "{}",
        relay.log_text()
    );
    assert!(relay.terminate(Duration::from_secs(20)).success());
}

/// stunnel terminating TLS (the test server certificate) in front of a broker.
struct TlsProxy {
    child: std::process::Child,
    port: u16,
}

impl TlsProxy {
    fn start(certs: &Certs, port: u16, backend: u16) -> TlsProxy {
        let conf = certs.dir.join(format!("stunnel-{port}.conf"));
        std::fs::write(
            &conf,
            format!(
                "foreground = yes\npid =\n[kafka]\naccept = 127.0.0.1:{port}\nconnect = 127.0.0.1:{backend}\ncert = {}\nkey = {}\n",
                certs.path("server.crt"),
                certs.path("server.key")
            ),
        )
        .unwrap();
        let log = std::fs::File::create(certs.dir.join(format!("stunnel-{port}.log"))).unwrap();
        let child = Command::new("stunnel4")
            .arg(&conf)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("stunnel4 (scripts/setup.sh installs it)");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "stunnel did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        TlsProxy { child, port }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A broker that requires SCRAM-SHA-512 (user `saiki`, password `kafka-s3cret`) behind TLS.
struct SecureBroker {
    broker: Broker,
    proxy: TlsProxy,
}

impl SecureBroker {
    fn start(certs: &Certs) -> SecureBroker {
        let port = loopback_port();
        let mut broker = Broker::start_advertising(Some(port));
        broker.require_authentication(&[("saiki", "kafka-s3cret")]);
        let proxy = TlsProxy::start(certs, port, broker.port);
        SecureBroker { broker, proxy }
    }

    /// `cfg` (made for the plain broker) pointed at the proxy, with the client's security
    /// properties.
    fn client_config(&self, cfg: &str, password: &str, ca: &str) -> String {
        format!(
            "{}\n[kafka.properties]\n\"security.protocol\" = \"SASL_SSL\"\n\"sasl.mechanism\" = \"SCRAM-SHA-512\"\n\"sasl.username\" = \"saiki\"\n\"sasl.password\" = \"{password}\"\n\"ssl.ca.location\" = \"{ca}\"\n",
            cfg.replace(&self.broker.addr(), &self.proxy.addr())
        )
    }
}

#[test]
fn the_pipeline_runs_over_sasl_ssl_with_scram_to_kafka() {
    let certs = Certs::make();
    let kafka = SecureBroker::start(&certs);
    let broker = &kafka.broker;
    let pg = PgCluster::start(&[]);
    let mut db = pg.create_db("shop");
    let mut ods = pg.create_db("ods");
    exec(
        &mut db,
        &["CREATE TABLE orders (id int PRIMARY KEY, qty int)"],
    );
    let ca = certs.path("ca.pem");
    let secure = |cfg: String| kafka.client_config(&cfg, "kafka-s3cret", &ca);
    let port = loopback_port();
    let relay = Relay::start(
        &pg.dir,
        &secure(relay_config(&pg, "shop", broker, port, "")),
        port,
    );
    wait_slot_active(&mut db, &relay);
    let sport = loopback_port();
    let sink = Relay::start_sink(
        &pg.dir,
        &secure(sink_config(&pg, "ods", broker, sport, "")),
        sport,
    );
    exec(
        &mut db,
        &[
            "INSERT INTO orders SELECT g, g FROM generate_series(1, 100) g",
            "UPDATE orders SET qty = qty * 10 WHERE id <= 10",
            "DELETE FROM orders WHERE id > 90",
        ],
    );
    wait_until(Duration::from_secs(90), &sink, || {
        let got = ods
            .query("SELECT count(*)::int, sum(qty)::int FROM ods.orders", &[])
            .ok()
            .map(|r| (r[0].get::<_, i32>(0), r[0].get::<_, i32>(1)));
        // 90 rows: 1..90, the first ten times ten.
        let want = (90, (1..=90).sum::<i32>() + 9 * (1..=10).sum::<i32>());
        (got != Some(want)).then(|| format!("ODS has {got:?}, want {want:?}"))
    });
    // Nothing reached the broker but through the proxy: its plain port refuses a client
    // without credentials.
    let plain = rdkafka::config::ClientConfig::new()
        .set("bootstrap.servers", broker.addr())
        .create::<rdkafka::producer::BaseProducer>()
        .unwrap();
    use rdkafka::producer::Producer;
    assert!(plain
        .client()
        .fetch_metadata(None, Duration::from_secs(3))
        .is_err());
}

#[test]
fn a_wrong_kafka_password_or_an_untrusted_broker_certificate_stops_the_relays_with_exit_4() {
    let certs = Certs::make();
    let kafka = SecureBroker::start(&certs);
    let broker = &kafka.broker;
    let pg = PgCluster::start(&[]);
    let mut db = pg.create_db("shop");
    pg.create_db("ods");
    // A change waits in the slot, so the relay has something to produce.
    exec(
        &mut db,
        &[
            "CREATE TABLE orders (id int PRIMARY KEY, qty int)",
            "SELECT pg_create_logical_replication_slot('saiki_test', 'saiki')",
            "INSERT INTO orders VALUES (1, 1)",
        ],
    );
    let port = loopback_port();
    let cfg = kafka.client_config(
        &relay_config(&pg, "shop", broker, port, ""),
        "not-the-password",
        &certs.path("ca.pem"),
    );
    let (status, log) = exits_within(Relay::start(&pg.dir, &cfg, port), Duration::from_secs(90));
    assert_eq!(status.code(), Some(4), "{log}");
    assert!(
        log.contains("the broker refused the relay's credentials: check sasl.mechanism, sasl.username and sasl.password"),
        "{log}"
    );
    assert!(
        !log.contains("not-the-password"),
        "the password is logged:\n{log}"
    );
    // Nothing was confirmed past what Kafka has (it has nothing): the insert is still there.
    let pending = text_rows(
        &mut db,
        "SELECT count(*)::text FROM pg_logical_slot_peek_changes('saiki_test', NULL, NULL)",
    );
    assert_ne!(
        pending[0][0].as_deref(),
        Some("0"),
        "the slot lost the insert"
    );

    let sport = loopback_port();
    let scfg = kafka.client_config(
        &sink_config(&pg, "ods", broker, sport, ""),
        "kafka-s3cret",
        &certs.path("other-ca.pem"),
    );
    let (status, log) = exits_within(
        Relay::start_sink(&pg.dir, &scfg, sport),
        Duration::from_secs(90),
    );
    assert_eq!(status.code(), Some(4), "{log}");
    assert!(
        log.contains("the broker's TLS certificate failed verification: check ssl.ca.location"),
        "{log}"
    );
}

/// A lake relay whose SQL catalog is database `lakecat` with `tls` in its DSN.
fn lake_with_catalog_tls(pg: &PgCluster, broker: &Broker, tls: &str) -> Relay {
    let port = loopback_port();
    let warehouse = format!("warehouse = \"{}\"", pg.dir.join("lake").display());
    let cfg = crate::lake::lake_config(pg, broker, &warehouse, "saiki-lake", port)
        .replace("dbname=ods\"", &format!("dbname=lakecat {tls}\""));
    Relay::start_lake(&pg.dir, &cfg, port)
}

#[test]
fn the_lake_reaches_its_sql_catalog_over_verified_tls_and_stops_on_an_untrusted_certificate() {
    let certs = Certs::make();
    let pg = start_tls_cluster(&certs);
    let broker = Broker::start();
    let mut db = pg.create_db("shop");
    let mut cat = pg.create_db("lakecat");
    exec(
        &mut db,
        &["CREATE TABLE orders (id int PRIMARY KEY, qty int)"],
    );
    let port = loopback_port();
    let source = Relay::start(&pg.dir, &relay_config(&pg, "shop", &broker, port, ""), port);
    wait_slot_active(&mut db, &source);

    // An untrusted certificate is definite: exit 6, the message says what to check.
    let wrong = format!(
        "sslmode=verify-full sslrootcert={}",
        certs.path("other-ca.pem")
    );
    let (status, log) = exits_within(
        lake_with_catalog_tls(&pg, &broker, &wrong),
        Duration::from_secs(60),
    );
    assert_eq!(status.code(), Some(6), "{log}");
    assert!(
        log.contains("TLS") && log.contains("lake.catalog_dsn"),
        "{log}"
    );

    let good = format!("sslmode=verify-full sslrootcert={}", certs.path("ca.pem"));
    let lake = lake_with_catalog_tls(&pg, &broker, &good);
    exec(
        &mut db,
        &["INSERT INTO orders SELECT g, g FROM generate_series(1, 50) g"],
    );
    wait_until(Duration::from_secs(120), &lake, || {
        let m = lake.http_get("/metrics").unwrap_or_default();
        (metric(&m, "saiki_lake_rows_written_total").unwrap_or(0.0) < 50.0)
            .then(|| format!("not all rows written: {m}"))
    });
    // Every connection of the catalog's pool is TLS.
    assert_eq!(
        first_row(
            &mut cat,
            "SELECT bool_and(s.ssl)::text, (count(*) > 0)::text FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) WHERE a.datname = 'lakecat' AND a.pid <> pg_backend_pid()"
        ),
        vec![Some("true".to_string()), Some("true".to_string())],
        "the catalog's connections"
    );
}
