//! What the operators read and deploy, checked against the code: the compose files validate,
//! the images pin the workspace's versions and run the relay as non-root, the dashboard and
//! the metrics reference name exactly the exported metrics, the configuration reference is
//! `--help-config`, and the least-privilege roles the images create run the pipeline.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::*;
use saiki_tests::{exec, loopback_port, Broker, PgCluster};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Every `saiki_…` metric name in `text`, without histogram suffixes.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let re = regex::Regex::new(r"saiki_(source|sink|ingest|lake)_[a-z_]+").unwrap();
    re.find_iter(text)
        .map(|m| {
            let n = m.as_str();
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| n.strip_suffix(s))
                .unwrap_or(n)
                .to_string()
        })
        .collect()
}

#[test]
fn every_compose_file_validates_with_docker_compose_config() {
    let dir = root().join("docker");
    let files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.contains("compose") && (n.ends_with(".yml") || n.ends_with(".yaml"))
        })
        .collect();
    assert!(!files.is_empty(), "no compose file in docker/");
    for f in files {
        for profile in [None, Some("observability")] {
            let mut cmd = Command::new("docker-compose");
            cmd.arg("-f").arg(&f);
            if let Some(p) = profile {
                cmd.args(["--profile", p]);
            }
            let out = cmd
                .arg("config")
                .output()
                .expect("docker-compose (scripts/setup.sh installs Debian's)");
            assert!(
                out.status.success(),
                "{} ({profile:?}): {}",
                f.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            let text = String::from_utf8_lossy(&out.stdout);
            // Every published port on the host's loopback only.
            let mut in_ports = false;
            let mut checked = 0;
            for line in text.lines() {
                let t = line.trim();
                if t == "ports:" {
                    in_ports = true;
                    continue;
                }
                if in_ports && t.starts_with("- ") {
                    let spec = t.trim_start_matches("- ").trim_matches(['\'', '"']);
                    assert!(
                        spec.starts_with("127.0.0.1:"),
                        "{}: port {spec} is not bound to loopback",
                        f.display()
                    );
                    checked += 1;
                } else {
                    in_ports = false;
                }
            }
            assert!(checked >= 3, "{}: ports not found in\n{text}", f.display());
        }
    }
}

#[test]
fn the_relay_image_and_its_services_run_as_a_non_root_user() {
    let dockerfile = read("docker/relay/Dockerfile");
    let runtime = dockerfile
        .rsplit("\nFROM ")
        .next()
        .expect("a runtime stage");
    let user = runtime
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("the runtime stage sets USER");
    let uid = user.split(':').next().unwrap();
    assert!(
        uid != "0" && uid != "root" && !uid.is_empty(),
        "USER {user}"
    );
    assert!(
        runtime.contains("HEALTHCHECK") && runtime.contains("status\", \"--check"),
        "the image's health check is `saiki-relay status --check`"
    );
    let out = Command::new("docker-compose")
        .args([
            "-f",
            root().join("docker/compose.yml").to_str().unwrap(),
            "config",
        ])
        .output()
        .unwrap();
    let cfg: serde_json::Value =
        serde_json::to_value(serde_yaml_like(&String::from_utf8_lossy(&out.stdout))).unwrap();
    for svc in ["source-relay", "sink"] {
        assert_eq!(
            cfg[svc]["user"].as_str(),
            Some(format!("{uid}:{uid}").as_str()),
            "{svc} runs as the image's user: {cfg}"
        );
        assert_eq!(cfg[svc]["read_only"].as_str(), Some("true"), "{svc}: {cfg}");
    }
}

/// The few keys of `docker-compose config` output the test reads, per service, without a YAML
/// dependency: `services:` → `  name:` → `    key: value`.
fn serde_yaml_like(
    text: &str,
) -> std::collections::BTreeMap<String, std::collections::BTreeMap<String, String>> {
    let mut out = std::collections::BTreeMap::new();
    let mut in_services = false;
    let mut svc = String::new();
    for line in text.lines() {
        if !line.starts_with(' ') {
            in_services = line.trim_end() == "services:";
            continue;
        }
        if !in_services {
            continue;
        }
        if let Some(name) = line.strip_prefix("  ").filter(|l| !l.starts_with(' ')) {
            svc = name.trim_end_matches(':').to_string();
        } else if let Some(kv) = line.strip_prefix("    ").filter(|l| !l.starts_with(' ')) {
            if let Some((k, v)) = kv.split_once(": ") {
                out.entry(svc.clone())
                    .or_insert_with(std::collections::BTreeMap::new)
                    .insert(k.to_string(), v.trim_matches(['\'', '"']).to_string());
            }
        }
    }
    out
}

#[test]
fn the_dockerfiles_pin_the_workspace_toolchain_and_pgrx() {
    let workspace = read("Cargo.toml");
    let rust = workspace
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .unwrap()
        .trim_matches('"')
        .to_string();
    let pgrx = read("saiki_pg/Cargo.toml")
        .lines()
        .find_map(|l| l.strip_prefix("pgrx = "))
        .unwrap()
        .trim_matches(['"', '='])
        .to_string();
    for f in ["docker/relay/Dockerfile", "docker/postgres/Dockerfile"] {
        let text = read(f);
        let arg = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("ARG {name}=")))
                .map(str::to_string)
        };
        let r = arg("RUST_VERSION").unwrap_or_else(|| panic!("{f}: ARG RUST_VERSION"));
        assert!(
            r == rust || r.starts_with(&format!("{rust}.")),
            "{f}: RUST_VERSION {r}, workspace rust-version {rust}"
        );
        assert!(text.contains("--locked"), "{f} builds with Cargo.lock");
        if f.contains("postgres") {
            assert_eq!(arg("PGRX_VERSION"), Some(pgrx.clone()), "{f}");
        }
    }
}

#[test]
fn the_dockerfiles_copy_every_directory_the_workspace_manifest_names() {
    // Members and `[patch]` paths: cargo reads them all, whatever it builds.
    let workspace = read("Cargo.toml");
    let mut dirs: Vec<String> = Vec::new();
    for line in workspace.lines() {
        if let Some(list) = line.strip_prefix("members = ") {
            dirs.extend(
                list.trim_matches(['[', ']'])
                    .split(',')
                    .map(|m| m.trim().trim_matches('"').to_string()),
            );
        }
        if let Some((_, rest)) = line.split_once("path = \"") {
            let path = rest.split('"').next().unwrap();
            dirs.push(path.split('/').next().unwrap().to_string());
        }
    }
    assert!(dirs.iter().any(|d| d == "vendor"), "{dirs:?}");
    for f in ["docker/relay/Dockerfile", "docker/postgres/Dockerfile"] {
        let text = read(f);
        for d in &dirs {
            assert!(
                text.lines().any(|l| l.trim() == format!("COPY {d} {d}")),
                "{f} does not copy {d}/, which Cargo.toml names"
            );
        }
    }
}

#[test]
fn the_dashboard_and_the_metrics_reference_name_exactly_the_exported_metrics() {
    let exported: std::collections::BTreeSet<String> = saiki_relay::METRIC_NAMES
        .iter()
        .map(|s| s.to_string())
        .collect();
    // What the relays really render is what ALL lists.
    let sink = saiki_relay::SinkMetrics::new("g");
    let source = saiki_relay::SourceMetrics::default();
    source.snapshot_progress("public.orders", 10, 100); // per-table series appear with a snapshot
    use saiki_relay::Exporter;
    let ingest = saiki_relay::IngestMetrics::default();
    let lake = saiki_relay::LakeMetrics::default();
    let rendered = metric_names(&format!(
        "{}{}{}{}",
        sink.render(),
        source.render("s"),
        ingest.render(),
        lake.render()
    ));
    assert_eq!(rendered, exported, "metrics::ALL against /metrics");

    let dashboard = read("docker/grafana/saiki.json");
    let board: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard JSON");
    assert!(board["panels"].as_array().is_some_and(|p| p.len() > 5));
    let used = metric_names(&dashboard);
    let unknown: Vec<_> = used.difference(&exported).collect();
    assert!(
        unknown.is_empty(),
        "dashboard names unknown metrics {unknown:?}"
    );
    let unused: Vec<_> = exported.difference(&used).collect();
    assert!(unused.is_empty(), "dashboard leaves out {unused:?}");

    let doc = metric_names(&read("docs/metrics.md"));
    assert_eq!(doc, exported, "docs/metrics.md against metrics::ALL");
}

#[test]
fn the_configuration_reference_is_the_relays_help_config() {
    let out = Command::new(BIN).arg("--help-config").output().unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    let doc = read("docs/configuration.md");
    let block = doc
        .split("```toml\n")
        .nth(1)
        .and_then(|b| b.split("\n```").next())
        .expect("a toml block in docs/configuration.md");
    assert_eq!(
        block.trim_end(),
        help.trim_end(),
        "docs/configuration.md is stale: run scripts/config-reference.sh"
    );
}

/// Runs an init script of the images against a test cluster, as the postgres entrypoint would.
fn run_init_script(script: &str, pg: &PgCluster, db: &str, env: &[(&str, &str)]) {
    let out = Command::new("bash")
        .arg(root().join(script))
        .env(
            "PATH",
            format!(
                "/usr/lib/postgresql/15/bin:{}",
                std::env::var("PATH").unwrap()
            ),
        )
        .env("PGHOST", "127.0.0.1")
        .env("PGPORT", pg.port.to_string())
        .env("POSTGRES_USER", "postgres")
        .env("POSTGRES_DB", db)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_least_privilege_roles_of_the_images_run_the_pipeline() {
    let pg = PgCluster::start(&[]);
    let broker = Broker::start();
    let mut db = pg.create_db("shop");
    let mut ods = pg.create_db("ods");
    run_init_script(
        "docker/postgres/initdb-saiki.sh",
        &pg,
        "shop",
        &[("SAIKI_RELAY_PASSWORD", "relay-pw")],
    );
    run_init_script(
        "docker/ods/initdb-ods.sh",
        &pg,
        "ods",
        &[
            ("SAIKI_SINK_PASSWORD", "sink-pw"),
            ("SAIKI_INGEST_PASSWORD", "ingest-pw"),
            ("SAIKI_LAKE_PASSWORD", "lake-pw"),
        ],
    );
    let roles = |c: &mut saiki_tests::postgres::Client| {
        text_rows(
            c,
            "SELECT rolname, rolsuper::text, rolreplication::text FROM pg_roles WHERE rolname IN ('saiki_relay', 'saiki_sink', 'saiki_ingest') ORDER BY 1",
        )
    };
    let s = |v: &str| Some(v.to_string());
    assert_eq!(
        roles(&mut db),
        vec![
            vec![s("saiki_ingest"), s("false"), s("false")],
            vec![s("saiki_relay"), s("false"), s("true")],
            vec![s("saiki_sink"), s("false"), s("false")],
        ]
    );
    // Rows from before the relay: its initial snapshot brings them, with the role's grants.
    exec(
        &mut db,
        &[
            "CREATE TABLE orders (id int PRIMARY KEY, article text, qty int)",
            "INSERT INTO orders SELECT g, 'shoe', g FROM generate_series(1, 50) g",
        ],
    );

    let port = loopback_port();
    let cfg = relay_config(&pg, "shop", &broker, port, "snapshot = \"initial\"").replace(
        "user=postgres dbname=shop",
        "user=saiki_relay password=relay-pw dbname=shop",
    );
    let relay = Relay::start(&pg.dir, &cfg, port);
    wait_slot_active(&mut db, &relay);
    let sport = loopback_port();
    let scfg = sink_config(&pg, "ods", &broker, sport, "").replace(
        "user=postgres dbname=ods",
        "user=saiki_sink password=sink-pw dbname=ods",
    );
    let sink = Relay::start_sink(&pg.dir, &scfg, sport);
    exec(
        &mut db,
        &[
            "UPDATE orders SET qty = 0 WHERE id <= 10",
            "DELETE FROM orders WHERE id > 40",
        ],
    );
    wait_until(Duration::from_secs(90), &sink, || {
        // Until the sink has created it, the table is missing: an error, not yet a result.
        let got = ods
            .query("SELECT count(*)::text, sum(qty)::text FROM ods.orders", &[])
            .ok()
            .and_then(|r| {
                r.first()
                    .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
            });
        (got != Some(("40".into(), "765".into())))
            .then(|| format!("ODS has {got:?}\nsource log:\n{}", relay.log_text()))
    });
    // The ODS objects belong to the sink's role, and the slot to the relay's.
    assert_eq!(
        text_rows(
            &mut ods,
            "SELECT tableowner::text FROM pg_tables WHERE schemaname = 'ods' AND tablename = 'orders'"
        ),
        vec![vec![s("saiki_sink")]]
    );
    let status = Command::new(BIN)
        .args([
            "status",
            "--json",
            "--dsn",
            &format!(
                "host=127.0.0.1 port={} user=saiki_relay password=relay-pw dbname=shop",
                pg.port
            ),
        ])
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "the relay's role reads saiki.slot_status(): {}",
        String::from_utf8_lossy(&status.stderr)
    );
    let st: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(st["slots"][0]["slot"], "saiki_test", "{st}");

    // The lake's role keeps the Iceberg catalog in the ODS database and commits the changes.
    let lport = loopback_port();
    let lcfg = format!(
        "[lake]\nwarehouse = \"file://{}/lake\"\ncatalog_dsn = \"host=127.0.0.1 port={} user=saiki_lake password=lake-pw dbname=ods\"\ncommit_interval = \"1s\"\n[kafka]\nbrokers = \"{}\"\n[http]\nlisten = \"127.0.0.1:{lport}\"\n",
        pg.dir.display(),
        pg.port,
        broker.addr()
    );
    let lake = Relay::start_lake(&pg.dir, &lcfg, lport);
    wait_until(Duration::from_secs(90), &lake, || {
        let m = lake.http_get("/metrics").unwrap_or_default();
        // The snapshot's rows (40 to 50, as it met the deletes), 10 updates, 10 deletes.
        (metric(&m, "saiki_lake_rows_written_total").unwrap_or(0.0) < 60.0)
            .then(|| format!("lake rows: {m}"))
    });
    assert_eq!(
        text_rows(
            &mut ods,
            "SELECT tableowner::text FROM pg_tables WHERE tablename = 'iceberg_tables'"
        ),
        vec![vec![s("saiki_lake")]]
    );

    // The event API's role creates its registry in the ODS database and publishes.
    let (api, iport) = (loopback_port(), loopback_port());
    let icfg = format!(
        "[ingest]\ndsn = \"host=127.0.0.1 port={} user=saiki_ingest password=ingest-pw dbname=ods\"\nadmin_token = \"least-privilege-admin-token\"\nlisten = \"127.0.0.1:{api}\"\n[kafka]\nbrokers = \"{}\"\n[http]\nlisten = \"127.0.0.1:{iport}\"\n",
        pg.port,
        broker.addr()
    );
    let ingest = Relay::start_ingest(&pg.dir, &icfg, iport);
    let curl = |args: &[&str]| {
        Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-H"])
            .arg("Authorization: Bearer least-privilege-admin-token")
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    let base = format!("http://127.0.0.1:{api}");
    wait_until(Duration::from_secs(60), &ingest, || {
        let code = curl(&[&format!("{base}/event-types")]);
        (code != "200").then(|| format!("GET /event-types: {code}"))
    });
    let et = r#"{"name": "t.done", "owning_team": "t", "schema": {"type": "object", "properties": {"n": {"type": "integer"}}}}"#;
    assert_eq!(
        curl(&[
            "-X",
            "POST",
            "--data-binary",
            et,
            &format!("{base}/event-types")
        ]),
        "201"
    );
    let events = format!("{base}/event-types/t.done/events");
    assert_eq!(
        curl(&["-X", "POST", "--data-binary", r#"[{"n": 1}]"#, &events]),
        "200"
    );
    assert_eq!(
        text_rows(
            &mut ods,
            "SELECT tableowner::text FROM pg_tables WHERE schemaname = 'saiki_ingest' AND tablename = 'event_types'"
        ),
        vec![vec![s("saiki_ingest")]]
    );
    // The sink's role reads event types and schemas, not tokens, and materializes the event.
    assert_eq!(
        text_rows(
            &mut ods,
            "SELECT has_table_privilege('saiki_sink', 'saiki_ingest.schemas', 'SELECT')::text, has_table_privilege('saiki_sink', 'saiki_ingest.tokens', 'SELECT')::text"
        ),
        vec![vec![s("true"), s("false")]]
    );
    wait_until(Duration::from_secs(90), &sink, || {
        let got = ods
            .query(
                "SELECT count(*)::text, sum(n)::text FROM ods.ev_t_done",
                &[],
            )
            .ok()
            .and_then(|r| {
                r.first()
                    .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
            });
        (got != Some(("1".into(), "1".into()))).then(|| format!("ods.ev_t_done has {got:?}"))
    });
    // The lake's role reads them too, and keeps the event in the Iceberg table
    // saiki.ev_t_done, which the catalog lists once its first commit is in.
    wait_until(Duration::from_secs(90), &lake, || {
        let got = text_rows(
            &mut ods,
            "SELECT table_name FROM iceberg_tables WHERE table_name = 'ev_t_done'",
        );
        (got != vec![vec![s("ev_t_done")]]).then(|| format!("catalog: {got:?}"))
    });
}
