//! The operations files, checked with the real tools that run here (promtool, amtool,
//! logrotate, openssl, the Kafka CLI on the test broker) and against each other: every name,
//! port, path and variable one file expects of another is there. Docker, Grafana, Elasticsearch,
//! Kibana, Filebeat and Traefik do not run on these machines, so their files are checked for
//! syntax and consistency only.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{repo, tool};
use serde_json::Value as Json;
use serde_yaml::Value as Yaml;

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn yaml(path: &str) -> Yaml {
    serde_yaml::from_str(&read(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn json(path: &str) -> Json {
    serde_json::from_str(&read(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

fn strs(v: &Yaml) -> Vec<String> {
    v.as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Every `${NAME}` (with or without `:-default` / `:?message`) in a text.
fn variables(text: &str) -> BTreeMap<String, bool> {
    let mut out = BTreeMap::new();
    let code: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    let mut rest = code.as_str();
    while let Some(i) = rest.find("${") {
        rest = &rest[i + 2..];
        let end = rest.find('}').unwrap();
        let inner = &rest[..end];
        let name_end = inner.find([':', '-']).unwrap_or(inner.len());
        let has_default = inner[name_end..].starts_with(":-");
        out.insert(inner[..name_end].to_string(), has_default);
        rest = &rest[end..];
    }
    out
}

struct Compose(Yaml);

impl Compose {
    fn load() -> Self {
        Self(yaml("docker-compose.yml"))
    }
    fn services(&self) -> BTreeMap<String, &Yaml> {
        self.0["services"]
            .as_mapping()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.as_str().unwrap().to_string(), v))
            .collect()
    }
    fn service(&self, name: &str) -> &Yaml {
        let s = &self.0["services"][name];
        assert!(s.is_mapping(), "no service {name}");
        s
    }
    fn env(&self, service: &str) -> BTreeMap<String, String> {
        self.service(service)["environment"]
            .as_mapping()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| {
                        let v = match v {
                            Yaml::String(s) => s.clone(),
                            other => serde_yaml::to_string(other).unwrap().trim().to_string(),
                        };
                        (k.as_str().unwrap().to_string(), v)
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
    /// (source, target) of each volume entry.
    fn mounts(&self, service: &str) -> Vec<(String, String)> {
        strs(&self.service(service)["volumes"])
            .iter()
            .map(|m| {
                let mut parts = m.split(':');
                (
                    parts.next().unwrap().to_string(),
                    parts.next().unwrap().to_string(),
                )
            })
            .collect()
    }
    fn networks(&self, service: &str) -> BTreeSet<String> {
        let n = strs(&self.service(service)["networks"]);
        if n.is_empty() {
            BTreeSet::from(["default".to_string()])
        } else {
            n.into_iter().collect()
        }
    }
    /// The host path a container path of `service` comes from: the repository path for a bind
    /// mount, `volume:<name>/<rest>` for a named volume.
    fn source_of(&self, service: &str, container_path: &str) -> Option<String> {
        self.mounts(service)
            .into_iter()
            .filter(|(_, target)| {
                container_path == target || container_path.starts_with(&format!("{target}/"))
            })
            .max_by_key(|(_, target)| target.len())
            .map(|(source, target)| {
                let rest = container_path[target.len()..].trim_start_matches('/');
                match source.strip_prefix("./") {
                    Some(local) if rest.is_empty() => local.to_string(),
                    Some(local) => format!("{local}/{rest}"),
                    None if rest.is_empty() => format!("volume:{source}"),
                    None => format!("volume:{source}/{rest}"),
                }
            })
    }
    /// Asserts that `from` can reach `to` (they share a network).
    fn assert_reachable(&self, from: &str, to: &str) {
        let shared: Vec<_> = self
            .networks(from)
            .intersection(&self.networks(to))
            .cloned()
            .collect();
        assert!(!shared.is_empty(), "{from} and {to} share no network");
    }
}

/// The certificate files make-certs.sh creates, as `volume:certs/<path>` strings, plus the
/// htpasswd file the certs service writes.
fn certs_made(compose: &Compose) -> BTreeSet<String> {
    let dir = tempfile::tempdir().unwrap();
    run(Command::new("sh")
        .arg(repo().join("logging/make-certs.sh"))
        .arg(dir.path()));
    let mut files = BTreeSet::new();
    fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.insert(format!(
                    "volume:certs/{}",
                    p.strip_prefix(root).unwrap().display()
                ));
            }
        }
    }
    walk(dir.path(), dir.path(), &mut files);
    let command = strs(&compose.service("certs")["command"]).join(" ");
    let htpasswd = command
        .split("make-htpasswd.sh ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .expect("the certs service writes the htpasswd file");
    files.insert(compose.source_of("certs", htpasswd).unwrap());
    files
}

// ---- Prometheus, Alertmanager, logrotate: the real tools -------------------------------------

#[test]
fn promtool_accepts_the_prometheus_config_and_its_rules() {
    let Some(promtool) = tool("promtool") else {
        return;
    };
    let out = run(Command::new(promtool)
        .args(["check", "config"])
        .arg(repo().join("monitoring/prometheus.yml")));
    assert!(out.contains("SUCCESS"), "{out}");
}

/// vigil's rules and the alerting path's own (monitoring/rules/meta.yml), each with its tests.
const RULE_FILES: [&str; 2] = ["vigil", "meta"];

#[test]
fn rule_unit_tests_make_every_alert_fire_and_resolve() {
    let Some(promtool) = tool("promtool") else {
        return;
    };
    for name in RULE_FILES {
        run(Command::new(&promtool)
            .args(["test", "rules"])
            .arg(repo().join(format!("monitoring/rules/{name}.test.yml"))));

        // Coverage: each alert has a case where it fires and a later one where it is gone —
        // but the dead man's switch, which must fire at every time tested.
        let rules = yaml(&format!("monitoring/rules/{name}.yml"));
        let alerts: BTreeSet<String> = rules["groups"]
            .as_sequence()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_sequence().unwrap())
            .filter_map(|r| r["alert"].as_str().map(str::to_string))
            .collect();
        assert!(alerts.len() >= 5, "{alerts:?}");
        let tests = yaml(&format!("monitoring/rules/{name}.test.yml"));
        let mut fired: BTreeMap<String, Vec<(String, bool)>> = BTreeMap::new();
        for t in tests["tests"].as_sequence().unwrap() {
            for case in t["alert_rule_test"].as_sequence().unwrap() {
                let alert = case["alertname"].as_str().unwrap().to_string();
                let firing = case["exp_alerts"]
                    .as_sequence()
                    .is_some_and(|a| !a.is_empty());
                let at = case["eval_time"].as_str().unwrap().to_string();
                fired.entry(alert).or_default().push((at, firing));
            }
        }
        let minutes = |t: &str| t.trim_end_matches('m').parse::<u32>().unwrap();
        for alert in &alerts {
            let cases = fired
                .get(alert)
                .unwrap_or_else(|| panic!("{alert} is not tested"));
            if alert == "Watchdog" {
                assert!(
                    cases.len() >= 2 && cases.iter().all(|(_, f)| *f),
                    "{cases:?}"
                );
                continue;
            }
            let first_fire = cases
                .iter()
                .filter(|(_, f)| *f)
                .map(|(t, _)| minutes(t))
                .min()
                .unwrap_or_else(|| panic!("{alert} never fires in the tests"));
            assert!(
                cases.iter().any(|(t, f)| !f && minutes(t) > first_fire),
                "{alert} never resolves in the tests"
            );
        }
        // Every alert's runbook is a section of docs/operations.md.
        let runbook = read("docs/operations.md");
        let anchors: BTreeSet<String> = runbook
            .lines()
            .filter_map(|l| l.strip_prefix("## "))
            .map(|h| h.trim().to_lowercase().replace(' ', "-"))
            .collect();
        for rule in rules["groups"]
            .as_sequence()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_sequence().unwrap())
            .filter(|r| r["alert"].is_string())
        {
            let link = rule["annotations"]["runbook"].as_str().unwrap();
            let anchor = link.strip_prefix("docs/operations.md#").unwrap();
            assert!(anchors.contains(anchor), "{link}: no such section");
        }
        // Prometheus loads exactly these files.
        assert!(read("monitoring/prometheus.yml").contains(&format!("rules/{name}.yml")));
    }
}

#[test]
fn alertmanager_config_renders_from_the_environment_and_amtool_accepts_it() {
    let Some(amtool) = tool("amtool") else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("alertmanager.yml");
    let template = repo().join("monitoring/alertmanager/alertmanager.yml");
    let vars = variables(&read("monitoring/alertmanager/alertmanager.yml"));
    assert!(
        vars.contains_key("ALERTMANAGER_ONCALL_WEBHOOK_URL"),
        "{vars:?}"
    );
    run(Command::new("sh")
        .arg(repo().join("monitoring/alertmanager/render.sh"))
        .arg(&template)
        .arg(&out)
        .env(
            "ALERTMANAGER_ONCALL_WEBHOOK_URL",
            "https://hooks.example.com/pager?a=1&b=2",
        )
        .env(
            "ALERTMANAGER_TEAM_WEBHOOK_URL",
            "http://team.example.com/hook",
        )
        .env(
            "ALERTMANAGER_DEADMAN_WEBHOOK_URL",
            "https://hc-ping.example.com/0b5e",
        ));
    let rendered = std::fs::read_to_string(&out).unwrap();
    assert!(rendered.contains("https://hooks.example.com/pager?a=1&b=2"));
    assert!(
        !variables(
            &rendered
                .lines()
                .filter(|l| !l.trim_start().starts_with('#'))
                .collect::<Vec<_>>()
                .join("\n")
        )
        .iter()
        .any(|_| true)
    );
    let checked = run(Command::new(amtool).arg("check-config").arg(&out));
    assert!(
        checked.contains("SUCCESS") && checked.contains("3 receivers"),
        "{checked}"
    );

    // Rendering without the variables fails and names the first missing one.
    let failed = Command::new("sh")
        .arg(repo().join("monitoring/alertmanager/render.sh"))
        .arg(&template)
        .arg(dir.path().join("unset.yml"))
        .env_remove("ALERTMANAGER_ONCALL_WEBHOOK_URL")
        .env_remove("ALERTMANAGER_TEAM_WEBHOOK_URL")
        .env_remove("ALERTMANAGER_DEADMAN_WEBHOOK_URL")
        .output()
        .unwrap();
    assert!(!failed.status.success());
    assert!(
        String::from_utf8_lossy(&failed.stderr)
            .contains("ALERTMANAGER_DEADMAN_WEBHOOK_URL is not set")
    );
    assert!(!dir.path().join("unset.yml").exists());

    // .env.example's placeholders are refused too: alerts would go nowhere.
    let placeholder = Command::new("sh")
        .arg(repo().join("monitoring/alertmanager/render.sh"))
        .arg(&template)
        .arg(dir.path().join("placeholder.yml"))
        .env(
            "ALERTMANAGER_ONCALL_WEBHOOK_URL",
            "https://hooks.example.com/pager",
        )
        .env(
            "ALERTMANAGER_TEAM_WEBHOOK_URL",
            "http://change-me.invalid/team",
        )
        .env(
            "ALERTMANAGER_DEADMAN_WEBHOOK_URL",
            "https://hc-ping.example.com/0b5e",
        )
        .output()
        .unwrap();
    assert!(!placeholder.status.success());
    assert!(
        String::from_utf8_lossy(&placeholder.stderr)
            .contains("ALERTMANAGER_TEAM_WEBHOOK_URL is still the placeholder"),
        "{}",
        String::from_utf8_lossy(&placeholder.stderr)
    );
    assert!(!dir.path().join("placeholder.yml").exists());
}

#[test]
fn logrotate_accepts_the_config_and_copytruncate_rotates_a_file_still_open_for_append() {
    let Some(logrotate) = tool("logrotate") else {
        return;
    };
    let conf = read("logging/logrotate/vigil");
    run(Command::new(&logrotate)
        .arg("-d")
        .arg(repo().join("logging/logrotate/vigil")));

    // The same rules on a file in a temporary directory, forced: the writer keeps its handle.
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("vigil.log");
    let local = conf.replace(
        "/var/log/vigil/*.log",
        &format!("{}/*.log", dir.path().display()),
    );
    let local_conf = dir.path().join("logrotate.conf");
    std::fs::write(&local_conf, local).unwrap();
    let mut writer = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .unwrap();
    use std::io::Write;
    writeln!(writer, "{{\"message\":\"before\"}}").unwrap();
    run(Command::new(&logrotate)
        .arg("-f")
        .arg("-s")
        .arg(dir.path().join("state"))
        .arg(&local_conf));
    writeln!(writer, "{{\"message\":\"after\"}}").unwrap();
    drop(writer);
    let rotated: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("vigil.log-"))
        .collect();
    assert_eq!(rotated.len(), 1, "{rotated:?}");
    let old = std::fs::read_to_string(dir.path().join(&rotated[0])).unwrap();
    assert_eq!(old, "{\"message\":\"before\"}\n");
    // Appending after the truncation starts at the beginning, not at the old length.
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "{\"message\":\"after\"}\n"
    );
}

// ---- docker-compose.yml ------------------------------------------------------------------------

#[test]
fn compose_services_start_in_order_after_services_that_exist() {
    let compose = Compose::load();
    let services = compose.services();
    for name in [
        "kafka",
        "kafka-init",
        "vigil",
        "simulator",
        "prometheus",
        "alertmanager",
        "grafana",
        "elasticsearch",
        "kibana",
        "filebeat",
        "traefik",
        "jaeger",
        "certs",
    ] {
        assert!(services.contains_key(name), "no {name} service");
    }
    assert_eq!(
        strs(&compose.service("simulator")["profiles"]),
        ["simulator"]
    );
    assert_eq!(strs(&compose.service("jaeger")["profiles"]), ["tracing"]);
    for (name, service) in &services {
        let Some(deps) = service["depends_on"].as_mapping() else {
            continue;
        };
        for (dep, how) in deps {
            let dep = dep.as_str().unwrap();
            let target = services
                .get(dep)
                .unwrap_or_else(|| panic!("{name} depends on missing {dep}"));
            let condition = how["condition"].as_str().unwrap();
            match condition {
                "service_healthy" => assert!(
                    target["healthcheck"].is_mapping() || dep == "vigil",
                    "{name} waits for {dep} to be healthy but it has no health check"
                ),
                "service_completed_successfully" => assert_eq!(
                    target["restart"].as_str(),
                    Some("no"),
                    "{dep} is a one-shot and must not restart"
                ),
                "service_started" => {}
                other => panic!("{name}: unknown condition {other}"),
            }
        }
    }
    // vigil's health check is in its image; the compose one must match the port it listens on.
    let addr = &compose.env("vigil")["VIGIL_SERVER__ADDR"];
    let port = addr.rsplit(':').next().unwrap();
    let check = strs(&compose.service("vigil")["healthcheck"]["test"]).join(" ");
    assert!(check.contains(&format!(":{port}/health")), "{check}");
    assert!(read("Dockerfile").contains(&format!("VIGIL_SERVER__ADDR=0.0.0.0:{port}")));
}

#[test]
fn compose_mounts_exist_and_volumes_and_networks_are_declared() {
    let compose = Compose::load();
    let volumes: BTreeSet<String> = compose.0["volumes"]
        .as_mapping()
        .unwrap()
        .keys()
        .map(|k| k.as_str().unwrap().to_string())
        .collect();
    let mut networks: BTreeSet<String> = compose.0["networks"]
        .as_mapping()
        .unwrap()
        .keys()
        .map(|k| k.as_str().unwrap().to_string())
        .collect();
    networks.insert("default".into());
    for name in compose.services().keys() {
        for (source, _) in compose.mounts(name) {
            match source.strip_prefix("./") {
                Some(local) => assert!(
                    repo().join(local).exists(),
                    "{name} mounts missing ./{local}"
                ),
                None => assert!(
                    volumes.contains(&source),
                    "{name} uses undeclared volume {source}"
                ),
            }
        }
        for n in compose.networks(name) {
            assert!(networks.contains(&n), "{name} uses undeclared network {n}");
        }
    }
    // The logging services have a network of their own.
    for s in ["elasticsearch", "kibana", "filebeat"] {
        assert_eq!(
            compose.networks(s),
            BTreeSet::from(["logging".to_string()]),
            "{s}"
        );
    }
    // Scripts a container runs with `sh` must be in the repository.
    for script in [
        "kafka/create-topics.sh",
        "logging/make-certs.sh",
        "monitoring/traefik/make-htpasswd.sh",
        "logging/elasticsearch/setup.sh",
        "logging/kibana/import.sh",
        "monitoring/alertmanager/render.sh",
    ] {
        run(Command::new("sh").arg("-n").arg(repo().join(script)));
    }
}

#[test]
fn secrets_come_from_env_and_env_example_commits_only_placeholders() {
    let compose_text = read("docker-compose.yml");
    let example = read(".env.example");
    let declared: BTreeMap<String, String> = example
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && l.contains('='))
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap();
            (k.trim().to_string(), v.trim().to_string())
        })
        .collect();
    for (name, has_default) in variables(&compose_text) {
        assert!(
            has_default || declared.contains_key(&name),
            "docker-compose.yml needs {name} but .env.example does not declare it"
        );
    }
    for (name, value) in &declared {
        if name.contains("PASSWORD") || name.ends_with("_KEY") || name.contains("WEBHOOK") {
            assert!(
                value.contains("change-me"),
                "{name} in .env.example holds a real-looking value"
            );
        }
    }
    let ignored = read(".gitignore");
    assert!(
        ignored.lines().any(|l| l == ".env"),
        ".env is not git-ignored"
    );
    assert!(!repo().join(".env").exists() || ignored.contains(".env"));
    // No password or key is written into the compose file itself.
    for (service, _) in Compose::load().services() {
        for (k, v) in Compose::load().env(&service) {
            if k.contains("PASSWORD") || k.ends_with("ENCRYPTION_KEY") {
                assert!(v.starts_with("${"), "{service}.{k} is not taken from .env");
            }
        }
    }
}

#[test]
fn config_files_read_only_variables_their_service_is_given() {
    let compose = Compose::load();
    for (service, file) in [
        ("filebeat", "logging/filebeat/filebeat.yml"),
        ("kibana", "logging/kibana/kibana.yml"),
        ("alertmanager", "monitoring/alertmanager/alertmanager.yml"),
        ("es-setup", "logging/elasticsearch/setup.sh"),
        ("certs", "monitoring/traefik/make-htpasswd.sh"),
    ] {
        let env = compose.env(service);
        let text = read(file);
        let mut needed: BTreeSet<String> = variables(&text).into_keys().collect();
        // Plain $NAME in shell scripts too.
        for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '$')) {
            if let Some(name) = word.strip_prefix('$') {
                if name.chars().all(|c| c.is_ascii_uppercase() || c == '_') && name.len() > 3 {
                    needed.insert(name.to_string());
                }
            }
        }
        for name in needed {
            let defaulted = text.contains(&format!("${{{name}:-"));
            assert!(
                defaulted || env.contains_key(&name),
                "{file} reads {name}, which {service} is not given"
            );
        }
    }
}

// ---- Monitoring wiring -------------------------------------------------------------------------

#[test]
fn prometheus_scrapes_and_alerts_services_that_exist_on_its_network() {
    let compose = Compose::load();
    let prometheus = yaml("monitoring/prometheus.yml");
    let mut targets = Vec::new();
    for job in prometheus["scrape_configs"].as_sequence().unwrap() {
        for sc in job["static_configs"].as_sequence().unwrap() {
            targets.extend(strs(&sc["targets"]));
        }
    }
    for am in prometheus["alerting"]["alertmanagers"]
        .as_sequence()
        .unwrap()
    {
        for sc in am["static_configs"].as_sequence().unwrap() {
            targets.extend(strs(&sc["targets"]));
        }
    }
    let vigil_port = compose.env("vigil")["VIGIL_SERVER__ADDR"]
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    for target in targets {
        let (host, port) = target.split_once(':').unwrap();
        if host == "localhost" {
            continue;
        }
        compose.assert_reachable("prometheus", host);
        match host {
            "vigil" => assert_eq!(port, vigil_port),
            "alertmanager" => assert_eq!(port, "9093"),
            "elasticsearch-exporter" => {
                assert_eq!(port, "9114");
                compose.assert_reachable("elasticsearch-exporter", "elasticsearch");
                let ca = strs(&compose.service("elasticsearch-exporter")["command"])
                    .iter()
                    .find_map(|a| a.strip_prefix("--es.ca=").map(String::from))
                    .unwrap();
                assert_eq!(
                    compose.source_of("elasticsearch-exporter", &ca).as_deref(),
                    Some("volume:certs/ca/ca.crt")
                );
                let user = &compose.env("elasticsearch-exporter")["ES_USERNAME"];
                assert!(
                    read("logging/elasticsearch/setup.sh")
                        .contains(&format!("/_security/user/{user}"))
                );
            }
            "kafka-exporter" => {
                assert_eq!(port, "9308");
                let server = strs(&compose.service("kafka-exporter")["command"]).join(" ");
                let kafka = server.split("--kafka.server=").nth(1).unwrap();
                compose.assert_reachable("kafka-exporter", kafka.split(':').next().unwrap());
                assert_eq!(
                    kafka,
                    compose.env("vigil")["VIGIL_KAFKA__BROKERS"],
                    "the exporter watches vigil's Kafka"
                );
            }
            other => panic!("unexpected target {other}"),
        }
    }
    // Rule files resolve to the mounted rules directory.
    for f in strs(&prometheus["rule_files"]) {
        let source = compose
            .source_of("prometheus", &format!("/etc/prometheus/{f}"))
            .unwrap();
        assert!(repo().join(&source).is_file(), "{source}");
    }
}

#[test]
fn grafana_provisions_the_datasource_and_dashboards_it_mounts() {
    let compose = Compose::load();
    let ds = yaml("monitoring/grafana/provisioning/datasources/prometheus.yml");
    let ds = &ds["datasources"][0];
    let url = ds["url"].as_str().unwrap();
    let host = url.trim_start_matches("http://").split(':').next().unwrap();
    compose.assert_reachable("grafana", host);
    let uid = ds["uid"].as_str().unwrap();

    let provider = yaml("monitoring/grafana/provisioning/dashboards/vigil.yml");
    let path = provider["providers"][0]["options"]["path"]
        .as_str()
        .unwrap();
    let source = compose.source_of("grafana", path).unwrap();
    assert_eq!(source, "monitoring/grafana/dashboards");
    let home = &compose.env("grafana")["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"];
    assert!(
        repo()
            .join(compose.source_of("grafana", home).unwrap())
            .is_file()
    );

    let mut count = 0;
    for entry in std::fs::read_dir(repo().join(&source)).unwrap() {
        let path = entry.unwrap().path();
        let d: Json = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let mut uids = BTreeSet::new();
        fn datasources(v: &Json, out: &mut BTreeSet<String>) {
            match v {
                Json::Object(m) => {
                    if let Some(Json::Object(ds)) = m.get("datasource") {
                        if ds.get("type").and_then(Json::as_str) == Some("prometheus") {
                            out.insert(ds["uid"].as_str().unwrap().to_string());
                        }
                    }
                    m.values().for_each(|v| datasources(v, out));
                }
                Json::Array(a) => a.iter().for_each(|v| datasources(v, out)),
                _ => {}
            }
        }
        datasources(&d, &mut uids);
        // Portable (dashboard-linter's rules): every query names the data source through the
        // dashboard's `datasource` variable, so the dashboard imports into any Grafana; the
        // provisioned data source is the default that variable starts on.
        assert_eq!(
            uids,
            BTreeSet::from(["${datasource}".to_string()]),
            "{}",
            path.display()
        );
        assert_eq!(
            ds["isDefault"],
            Yaml::Bool(true),
            "{uid} is not the default data source"
        );
        let variables = d["templating"]["list"].as_array().unwrap();
        let var = variables
            .iter()
            .find(|v| v["name"] == "datasource")
            .unwrap();
        assert_eq!(
            (var["type"].as_str(), var["query"].as_str()),
            (Some("datasource"), Some("prometheus"))
        );
        // Every panel has a title no other panel has and a description (its tooltip).
        let mut all = Vec::new();
        fn panels<'a>(v: &'a Json, out: &mut Vec<&'a Json>) {
            for p in v.as_array().into_iter().flatten() {
                out.push(p);
                panels(&p["panels"], out);
            }
        }
        panels(&d["panels"], &mut all);
        let mut seen = BTreeSet::new();
        for p in &all {
            let title = p["title"].as_str().unwrap();
            assert!(
                seen.insert(title),
                "{}: two panels are titled {title}",
                path.display()
            );
            assert!(
                p["description"].as_str().is_some_and(|s| s.len() > 20),
                "{}: panel {title} has no description",
                path.display()
            );
        }
        let titles: Vec<&str> = d["panels"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p["title"].as_str())
            .collect();
        for needed in [
            "Throughput",
            "Consumer lag by partition",
            "End-to-end latency",
            "Flag rate per model",
            "Isolation Forest score distribution",
            "LOF score distribution",
            "Dead letters by reason",
            "Accounts tracked",
            "Memory",
            "Requests by route and status",
        ] {
            assert!(
                titles.contains(&needed),
                "{} has no {needed} panel",
                path.display()
            );
        }
        count += 1;
    }
    assert!(count > 0);
}

#[test]
fn traefik_routes_reach_compose_services_through_defined_middlewares() {
    let compose = Compose::load();
    let dynamic = yaml("monitoring/traefik/dynamic.yml");
    let http = &dynamic["http"];
    let middlewares: BTreeSet<String> = http["middlewares"]
        .as_mapping()
        .unwrap()
        .keys()
        .map(|k| k.as_str().unwrap().to_string())
        .collect();
    let ports = BTreeMap::from([("grafana", "3000"), ("kibana", "5601")]);
    let routers = http["routers"].as_mapping().unwrap();
    assert_eq!(routers.len(), 2);
    for (name, router) in routers {
        let name = name.as_str().unwrap();
        let used = strs(&router["middlewares"]);
        for m in &used {
            assert!(
                middlewares.contains(m),
                "router {name} uses undefined middleware {m}"
            );
        }
        assert!(
            used.contains(&"basic-auth".to_string()) && used.contains(&"rate-limit".to_string())
        );
        let service = router["service"].as_str().unwrap();
        let lb = &http["services"][service]["loadBalancer"];
        for server in lb["servers"].as_sequence().unwrap() {
            let url = server["url"].as_str().unwrap();
            let hostport = url.split("://").nth(1).unwrap();
            let (host, port) = hostport.split_once(':').unwrap();
            compose.assert_reachable("traefik", host);
            assert_eq!(Some(&port), ports.get(host), "{url}");
            if url.starts_with("https://") {
                let transport = lb["serversTransport"]
                    .as_str()
                    .expect("https upstream without a transport");
                assert!(http["serversTransports"][transport]["rootCAs"].is_sequence());
            }
        }
        let prefix = router["rule"].as_str().unwrap();
        assert!(prefix.contains(&format!("/{name}")), "{prefix}");
    }
    assert!(
        http["middlewares"]["rate-limit"]["rateLimit"]["average"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert_eq!(
        http["middlewares"]["basic-auth"]["basicAuth"]["removeHeader"].as_bool(),
        Some(true)
    );
    // Kibana serves under the prefix Traefik routes, Grafana too.
    assert_eq!(
        yaml("logging/kibana/kibana.yml")["server.basePath"].as_str(),
        Some("/kibana")
    );
    assert!(compose.env("grafana")["GF_SERVER_ROOT_URL"].ends_with("/grafana/"));
    // Served from that sub-path, Grafana redirects anything outside it to the public URL: its
    // health check must ask under the sub-path, or it would follow the redirect off the host.
    assert_eq!(
        compose.env("grafana")["GF_SERVER_SERVE_FROM_SUB_PATH"],
        "true"
    );
    let probe = strs(&compose.service("grafana")["healthcheck"]["test"]).join(" ");
    assert!(
        probe.contains("http://localhost:3000/grafana/api/health"),
        "{probe}"
    );
    // The static config loads the dynamic file from where compose mounts it.
    let static_cfg = yaml("monitoring/traefik/traefik.yml");
    let file = static_cfg["providers"]["file"]["filename"]
        .as_str()
        .unwrap();
    assert_eq!(
        compose.source_of("traefik", file).unwrap(),
        "monitoring/traefik/dynamic.yml"
    );
}

#[test]
fn every_certificate_path_is_a_file_the_certs_service_creates() {
    let Some(_) = tool("openssl") else { return };
    let compose = Compose::load();
    let made = certs_made(&compose);
    let mut checked = 0;
    let mut check = |service: &str, path: &str| {
        let source = compose
            .source_of(service, path)
            .unwrap_or_else(|| panic!("{service}: {path} is not under any mount"));
        assert!(
            made.contains(&source),
            "{service}: {path} ({source}) is not made by make-certs.sh: {made:?}"
        );
        checked += 1;
    };
    // Elasticsearch: paths relative to its config directory.
    for (k, v) in compose.env("elasticsearch") {
        if k.starts_with("xpack.security")
            && (k.ends_with(".key") || k.ends_with(".certificate") || k.ends_with("authorities"))
        {
            check(
                "elasticsearch",
                &format!("/usr/share/elasticsearch/config/{v}"),
            );
        }
    }
    let kibana = yaml("logging/kibana/kibana.yml");
    for k in ["server.ssl.certificate", "server.ssl.key"] {
        check("kibana", kibana[k].as_str().unwrap());
    }
    for ca in strs(&kibana["elasticsearch.ssl.certificateAuthorities"]) {
        check("kibana", &ca);
    }
    let filebeat = yaml("logging/filebeat/filebeat.yml");
    for ca in strs(&filebeat["output.elasticsearch"]["ssl"]["certificate_authorities"]) {
        check("filebeat", &ca);
    }
    let traefik = yaml("monitoring/traefik/dynamic.yml");
    for c in traefik["tls"]["certificates"].as_sequence().unwrap() {
        check("traefik", c["certFile"].as_str().unwrap());
        check("traefik", c["keyFile"].as_str().unwrap());
    }
    check(
        "traefik",
        traefik["http"]["middlewares"]["basic-auth"]["basicAuth"]["usersFile"]
            .as_str()
            .unwrap(),
    );
    for ca in strs(&traefik["http"]["serversTransports"]["kibana-tls"]["rootCAs"]) {
        check("traefik", &ca);
    }
    // The one-shot setup services get the CA where their scripts look for it.
    check("es-setup", &compose.env("es-setup")["ES_CA"]);
    check("kibana-setup", &compose.env("kibana-setup")["KIBANA_CA"]);
    assert!(checked >= 14, "{checked}");
}

#[test]
fn make_certs_signs_server_certificates_for_the_service_names_and_htpasswd_verifies() {
    let Some(openssl) = tool("openssl") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    run(Command::new("sh")
        .arg(repo().join("logging/make-certs.sh"))
        .arg(dir.path()));
    for name in ["elasticsearch", "kibana", "traefik"] {
        let cert = dir.path().join(format!("{name}/{name}.crt"));
        run(Command::new(&openssl)
            .args(["verify", "-CAfile"])
            .arg(dir.path().join("ca/ca.crt"))
            .arg(&cert));
        let san = run(Command::new(&openssl)
            .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
            .arg(&cert));
        assert!(san.contains(&format!("DNS:{name}")), "{san}");
    }
    // A second run keeps what exists.
    let before = std::fs::read(dir.path().join("kibana/kibana.crt")).unwrap();
    run(Command::new("sh")
        .arg(repo().join("logging/make-certs.sh"))
        .arg(dir.path()));
    assert_eq!(
        before,
        std::fs::read(dir.path().join("kibana/kibana.crt")).unwrap()
    );

    // As the certs service runs it: Traefik's certificate names the public host and its
    // aliases (issued again when they change), and the CA's key is kept apart from the
    // certificates every server mounts.
    let (certs, keys) = (dir.path().join("stack"), dir.path().join("ca-key"));
    let traefik_names = |public: &str, aliases: &str| {
        run(Command::new("sh")
            .arg(repo().join("logging/make-certs.sh"))
            .arg(&certs)
            .arg(&keys)
            .env("PUBLIC_HOST", public)
            .env("PUBLIC_HOST_ALIASES", aliases));
        let cert = certs.join("traefik/traefik.crt");
        run(Command::new(&openssl)
            .args(["verify", "-CAfile"])
            .arg(certs.join("ca/ca.crt"))
            .arg(&cert));
        run(Command::new(&openssl)
            .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
            .arg(&cert))
    };
    let san = traefik_names("vigil.bank.example", "fraud.bank.example,10.20.0.5");
    for name in [
        "DNS:vigil.bank.example",
        "DNS:fraud.bank.example",
        "IP Address:10.20.0.5",
        "DNS:traefik",
    ] {
        assert!(san.contains(name), "{name} missing: {san}");
    }
    let san = traefik_names("ops.bank.example", "");
    assert!(
        san.contains("DNS:ops.bank.example") && !san.contains("vigil.bank.example"),
        "{san}"
    );
    assert!(keys.join("ca.key").is_file());
    let mut leaked = Vec::new();
    fn keys_in(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                keys_in(&p, out);
            } else if std::fs::read_to_string(&p).is_ok_and(|t| t.contains("PRIVATE KEY"))
                && p.file_name().is_some_and(|n| n == "ca.key")
            {
                out.push(p);
            }
        }
    }
    keys_in(&certs, &mut leaked);
    assert!(
        leaked.is_empty(),
        "the CA key is among the certificates: {leaked:?}"
    );
    let compose = Compose::load();
    for (service, s) in compose.services() {
        let mounts = strs(&s["volumes"]);
        let has_key = mounts.iter().any(|m| m.starts_with("ca-key:"));
        assert_eq!(
            has_key,
            service == "certs",
            "{service} mounts the CA key volume: {mounts:?}"
        );
    }

    let htpasswd = dir.path().join("traefik/htpasswd");
    run(Command::new("sh")
        .arg(repo().join("monitoring/traefik/make-htpasswd.sh"))
        .arg(&htpasswd)
        .env("TRAEFIK_USER", "ops")
        .env("TRAEFIK_PASSWORD", "s3cret"));
    let line = std::fs::read_to_string(&htpasswd).unwrap();
    let (user, hash) = line.trim().split_once(':').unwrap();
    assert_eq!(user, "ops");
    let salt = hash.split('$').nth(2).unwrap();
    let again = run(Command::new(&openssl).args(["passwd", "-apr1", "-salt", salt, "s3cret"]));
    assert_eq!(again.trim(), hash);
}

// ---- Logging wiring ----------------------------------------------------------------------------

#[test]
fn filebeat_ships_the_file_vigil_writes_into_the_index_kibana_searches() {
    let compose = Compose::load();
    let log_file = compose.env("vigil")["VIGIL_LOG__FILE"].clone();
    let vigil_source = compose.source_of("vigil", &log_file).unwrap();
    let filebeat = yaml("logging/filebeat/filebeat.yml");
    let input = &filebeat["filebeat.inputs"][0];
    let pattern = strs(&input["paths"])[0].clone();
    let (dir, glob) = pattern.rsplit_once('/').unwrap();
    let filebeat_dir = compose.source_of("filebeat", dir).unwrap();
    assert!(
        vigil_source.starts_with(&format!("{filebeat_dir}/")),
        "{vigil_source} vs {filebeat_dir}"
    );
    assert!(glob == "*.log" && log_file.ends_with(".log"));
    assert!(
        input["parsers"][0]["ndjson"].is_mapping(),
        "Filebeat must parse the JSON lines"
    );
    // The file rotates where Filebeat reads it.
    assert!(read("logging/logrotate/vigil").contains(&pattern));
    assert_eq!(compose.source_of("logrotate", dir).unwrap(), filebeat_dir);

    let out = &filebeat["output.elasticsearch"];
    for host in strs(&out["hosts"]) {
        assert!(host.starts_with("https://"), "{host}");
        let h = host
            .trim_start_matches("https://")
            .split(':')
            .next()
            .unwrap();
        compose.assert_reachable("filebeat", h);
    }
    let index = out["index"].as_str().unwrap();
    let template = json("logging/elasticsearch/index-template.json");
    let patterns: Vec<&str> = template["index_patterns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert!(
        patterns
            .iter()
            .any(|p| index.starts_with(p.trim_end_matches('*'))),
        "{index} vs {patterns:?}"
    );
    // Filebeat logs in as the writer es-setup creates, whose role may write that index.
    let user = out["username"].as_str().unwrap();
    let setup = read("logging/elasticsearch/setup.sh");
    assert!(
        setup.contains(&format!("/_security/user/{user}")),
        "es-setup does not create {user}"
    );
    assert!(setup.contains(&format!("\"{}\"", patterns[0])));

    let saved = read("logging/kibana/saved-objects.ndjson");
    let view = saved
        .lines()
        .map(|l| serde_json::from_str::<Json>(l).unwrap())
        .find(|o| o["type"] == "index-pattern")
        .unwrap();
    let title = view["attributes"]["title"].as_str().unwrap();
    assert!(
        patterns.contains(&title),
        "Kibana data view {title} vs template {patterns:?}"
    );
    // Fields the saved searches show are mapped by the template.
    let mapped = &template["template"]["mappings"];
    for o in saved
        .lines()
        .map(|l| serde_json::from_str::<Json>(l).unwrap())
        .filter(|o| o["type"] == "search")
    {
        for c in o["attributes"]["columns"].as_array().unwrap() {
            assert!(
                mapping_at(mapped, c.as_str().unwrap()).is_some(),
                "{c} is not mapped"
            );
        }
    }

    // Rotation loses nothing: Filebeat reads the rotated copies too, knows them for copies of
    // the live file (copytruncate strategy) by a suffix that matches logrotate's dateext
    // names, and skips the compressed ones.
    let strategy = &input["rotation.external.strategy.copytruncate"];
    let suffix = regex_lite::Regex::new(strategy["suffix_regex"].as_str().unwrap()).unwrap();
    let rotate = read("logging/logrotate/vigil");
    assert!(rotate.contains("copytruncate") && rotate.contains("dateformat -%Y%m%d-%s"));
    let copy = format!("{log_file}-20261201-1764547200");
    assert!(
        suffix.is_match(&copy) && !suffix.is_match(&log_file),
        "{suffix}"
    );
    let globs = strs(&input["paths"]);
    assert!(
        globs.iter().any(|g| g == &format!("{dir}/*.log-*")),
        "{globs:?}"
    );
    let excluded = strs(&input["prospector.scanner.exclude_files"]);
    assert!(excluded.iter().any(|x| {
        regex_lite::Regex::new(x)
            .unwrap()
            .is_match(&format!("{copy}.gz"))
    }));
}

/// The mapping of a dotted field path (`error.message`) in an index template's mappings.
fn mapping_at<'a>(mappings: &'a Json, path: &str) -> Option<&'a Json> {
    let mut at = mappings;
    for part in path.split('.') {
        at = at["properties"].get(part)?;
    }
    Some(at)
}

/// vigil's real JSON log lines — a demo run with malformed events and alerts, and a run whose
/// broker never answers — as Filebeat ships them (plus a line that is not JSON, with the error
/// object Filebeat adds), checked against the index template as Elasticsearch would map them:
/// every field's values fit its mapped type, and an unmapped field keeps one JSON type, so no
/// line is ever rejected for a mapping conflict.
#[test]
fn vigils_real_log_lines_fit_the_index_templates_mappings() {
    let work = tempfile::tempdir().unwrap();
    let log = work.path().join("vigil.log");
    let vigil = |args: &[&str], env: &[(&str, &str)], stop_after: Option<Duration>| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_vigil"))
            .args(args)
            .current_dir(work.path())
            .env("VIGIL_LOG__FILE", &log)
            .env("VIGIL_SERVER__ADDR", "127.0.0.1:0")
            .env("VIGIL_MODELS__DIR", work.path().join("models"))
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        if let Some(after) = stop_after {
            std::thread::sleep(after);
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
        }
        child.wait().unwrap();
    };
    vigil(
        &[
            "demo",
            "--seconds",
            "6",
            "--history",
            "3000",
            "--rate",
            "300",
            "--malformed-share",
            "0.05",
            "--anomaly-share",
            "0.05",
        ],
        &[],
        None,
    );
    vigil(
        &["run"],
        &[
            ("VIGIL_KAFKA__BROKERS", "127.0.0.1:9"),
            ("VIGIL_KAFKA__BROKER_TIMEOUT_SECONDS", "1"),
        ],
        Some(Duration::from_secs(5)),
    );
    let text = std::fs::read_to_string(&log).unwrap();
    let mut lines: Vec<serde_json::Map<String, Json>> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let messages: BTreeSet<String> = lines
        .iter()
        .filter_map(|l| l.get("message")?.as_str().map(String::from))
        .collect();
    for needed in ["alert", "invalid event sent to the dead-letter topic"] {
        assert!(
            messages.contains(needed),
            "no `{needed}` line in {messages:?}"
        );
    }
    assert!(
        lines.iter().any(|l| l.contains_key("error.message")),
        "{messages:?}"
    );
    // What Filebeat makes of a line that is not JSON (add_error_key).
    lines.push(
        serde_json::from_value(serde_json::json!({
            "message": "thread 'main' panicked at src/main.rs:1:1",
            "error": {"message": "Error decoding JSON: invalid character 'h'", "type": "json"},
        }))
        .unwrap(),
    );
    let filebeat = yaml("logging/filebeat/filebeat.yml");
    let mappings =
        json("logging/elasticsearch/index-template.json")["template"]["mappings"].clone();
    let mut dynamic: BTreeMap<String, &'static str> = BTreeMap::new();
    for mut line in lines {
        // Filebeat: the timestamp processor moves `timestamp` to @timestamp; fields_under_root.
        if let Some(t) = line.remove("timestamp") {
            line.insert("@timestamp".into(), t);
        }
        for (k, v) in filebeat["filebeat.inputs"][0]["fields"]
            .as_mapping()
            .unwrap()
        {
            line.insert(
                k.as_str().unwrap().into(),
                Json::String(v.as_str().unwrap().into()),
            );
        }
        let mut fields: Vec<(String, Json)> = Vec::new();
        flatten("", &Json::Object(line), &mut fields);
        for (path, value) in fields {
            let kind = match &value {
                Json::String(_) => "string",
                Json::Number(n) if n.is_i64() || n.is_u64() => "integer",
                Json::Number(_) => "number",
                Json::Bool(_) => "boolean",
                Json::Null => continue,
                Json::Array(_) => "array",
                Json::Object(_) => unreachable!(),
            };
            // A field under a path mapped as a value (`error` as text, say) is a conflict.
            let mut prefix = String::new();
            for part in path.split('.').collect::<Vec<_>>().split_last().unwrap().1 {
                prefix = if prefix.is_empty() {
                    part.to_string()
                } else {
                    format!("{prefix}.{part}")
                };
                let leaf = mapping_at(&mappings, &prefix).and_then(|m| m["type"].as_str());
                assert!(
                    leaf.is_none_or(|t| t == "object"),
                    "{path} is logged under {prefix}, which is mapped as {leaf:?}"
                );
                let seen = dynamic.get(&prefix).copied();
                assert!(
                    seen.is_none(),
                    "{path} is logged under {prefix}, also logged as {seen:?}"
                );
            }
            match mapping_at(&mappings, &path).and_then(|m| m["type"].as_str()) {
                Some(mapped) => {
                    let fits = match mapped {
                        "keyword" | "text" | "date" => kind == "string",
                        "integer" | "long" => {
                            kind == "integer"
                                || value.as_str().is_some_and(|s| s.parse::<i64>().is_ok())
                        }
                        "float" | "double" => {
                            matches!(kind, "integer" | "number")
                                || value.as_str().is_some_and(|s| s.parse::<f64>().is_ok())
                        }
                        "boolean" => kind == "boolean",
                        other => panic!("{path}: mapped as {other}, which this test does not know"),
                    };
                    assert!(
                        fits,
                        "{path} is mapped as {mapped} but logged as {kind}: {value}"
                    );
                }
                None => {
                    assert!(
                        mapping_at(&mappings, &path).is_none_or(|m| m.get("properties").is_none()),
                        "{path} is mapped as an object but logged as {kind}"
                    );
                    let first = *dynamic.entry(path.clone()).or_insert(kind);
                    let same = first == kind || (first == "number" && kind == "integer");
                    assert!(same, "{path} is logged as {first} and as {kind}: {value}");
                }
            }
        }
    }
}

/// A document's leaf fields by dotted path (a dotted key such as `error.message` is a path too,
/// as Elasticsearch reads it).
fn flatten(prefix: &str, value: &Json, out: &mut Vec<(String, Json)>) {
    match value {
        Json::Object(map) => {
            for (k, v) in map {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&path, v, out);
            }
        }
        leaf => out.push((prefix.to_string(), leaf.clone())),
    }
}

#[test]
fn kibana_saved_objects_reference_objects_that_exist() {
    let saved = read("logging/kibana/saved-objects.ndjson");
    let objects: Vec<Json> = saved
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ids: BTreeSet<(String, String)> = objects
        .iter()
        .map(|o| {
            (
                o["type"].as_str().unwrap().into(),
                o["id"].as_str().unwrap().into(),
            )
        })
        .collect();
    let titles: Vec<&str> = objects
        .iter()
        .filter_map(|o| o["attributes"]["title"].as_str())
        .collect();
    for needed in [
        "vigil alerts by account",
        "vigil dead letters by reason",
        "vigil errors and warnings",
    ] {
        assert!(titles.contains(&needed), "no saved search {needed}");
    }
    for o in &objects {
        for r in o["references"].as_array().unwrap() {
            let key = (
                r["type"].as_str().unwrap().to_string(),
                r["id"].as_str().unwrap().to_string(),
            );
            assert!(ids.contains(&key), "{} references missing {key:?}", o["id"]);
        }
        if o["type"] == "search" {
            let source: Json = serde_json::from_str(
                o["attributes"]["kibanaSavedObjectMeta"]["searchSourceJSON"]
                    .as_str()
                    .unwrap(),
            )
            .unwrap();
            assert_eq!(source["query"]["language"], "kuery");
            let refname = source["indexRefName"].as_str().unwrap();
            assert!(
                o["references"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|r| r["name"] == refname)
            );
        }
    }
    // The searches match what vigil logs.
    let run_rs = std::fs::read_to_string(repo().join("src/run.rs")).unwrap();
    assert!(run_rs.contains("\"invalid event sent to the dead-letter topic\""));
    assert!(saved.contains("invalid event sent to the dead-letter topic"));
}

#[test]
fn index_template_uses_the_lifecycle_policy_es_setup_loads() {
    let template = json("logging/elasticsearch/index-template.json");
    let policy_name = template["template"]["settings"]["index.lifecycle.name"]
        .as_str()
        .unwrap();
    let setup = read("logging/elasticsearch/setup.sh");
    assert!(
        setup.contains(&format!("/_ilm/policy/{policy_name} ")),
        "setup.sh does not load {policy_name}"
    );
    let policy = json("logging/elasticsearch/ilm-policy.json");
    assert!(policy["policy"]["phases"]["hot"]["actions"]["rollover"].is_object());
    assert!(policy["policy"]["phases"]["delete"]["actions"]["delete"].is_object());
    assert!(
        template["data_stream"].is_object(),
        "Filebeat 8 writes to a data stream"
    );
    for field in [
        "@timestamp",
        "transaction_id",
        "account_id",
        "partition",
        "offset",
        "level",
        "message",
    ] {
        assert!(
            template["template"]["mappings"]["properties"][field].is_object(),
            "{field}"
        );
    }
}

// ---- Kafka topics ------------------------------------------------------------------------------

fn topics_conf() -> Vec<(String, i32)> {
    read("kafka/topics.conf")
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let mut w = l.split_whitespace();
            (
                w.next().unwrap().to_string(),
                w.next().unwrap().parse().unwrap(),
            )
        })
        .collect()
}

#[test]
fn topics_conf_creates_the_topics_vigil_is_configured_with() {
    let cfg = vigil::config::Config::from_yaml(&read("config.yml")).unwrap();
    let names: BTreeSet<String> = topics_conf().into_iter().map(|(n, _)| n).collect();
    let wanted = BTreeSet::from([
        cfg.kafka.transactions_topic.clone(),
        cfg.kafka.alerts_topic.clone(),
        cfg.kafka.dead_letter_topic.clone(),
        cfg.triage.feedback_topic.clone(),
        cfg.kafka.shadow_topic.clone(),
    ]);
    assert_eq!(names, wanted);
}

#[test]
fn create_topics_script_creates_the_topics_on_a_real_broker_and_is_idempotent() {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let Some(brokers) = common::test_brokers() else {
        return;
    };
    // The shipped names, prefixed so the test cannot collide with anything else on the broker.
    let prefix = format!("ops-{}-", std::process::id());
    let dir = tempfile::tempdir().unwrap();
    let conf: String = read("kafka/topics.conf")
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .map(|l| format!("{prefix}{l}\n"))
        .collect();
    let conf_path: PathBuf = dir.path().join("topics.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let broker_sh = repo().join("kafka/broker.sh");
    for _ in 0..2 {
        run(Command::new("sh")
            .arg(repo().join("kafka/create-topics.sh"))
            .arg(&conf_path)
            .env("BOOTSTRAP", &brokers)
            .env(
                "KAFKA_TOPICS",
                format!("{} kafka-topics", broker_sh.display()),
            )
            .env(
                "KAFKA_CONFIGS",
                format!("{} kafka-configs", broker_sh.display()),
            ));
    }
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(None, std::time::Duration::from_secs(10))
        .unwrap();
    for (name, partitions) in topics_conf() {
        let full = format!("{prefix}{name}");
        let topic = metadata
            .topics()
            .iter()
            .find(|t| t.name() == full)
            .unwrap_or_else(|| panic!("{full} was not created"));
        assert_eq!(topic.partitions().len() as i32, partitions, "{full}");
    }
}

/// A second, independent Avro implementation (Python's fastavro) parses each shipped schema on
/// its own and reads what vigil writes: a transaction datum and a real alert in Avro.
#[test]
fn fastavro_parses_each_shipped_schema_alone_and_reads_vigils_transactions_and_alerts() {
    use std::sync::Arc;
    use vigil::decode::{Decoder, encode_avro, transaction_schema};
    use vigil::pipeline::{Engine, Outcome};

    let engine = Engine::new(
        Arc::new(common::trained_models()),
        Decoder::Json,
        vigil::config::Policy::All,
        3,
    );
    let events = vigil::train::in_event_time_order(vigil::train::bundled_history().unwrap().events);
    let mut state = vigil::state::PartitionState::default();
    let mut scratch = Default::default();
    let alert = events
        .iter()
        .enumerate()
        .find_map(|(i, tx)| {
            let source = vigil::publish::SourceCoordinates {
                topic: "t".into(),
                partition: 0,
                offset: i as i64,
                published_at: None,
            };
            match engine.process(
                &mut state,
                &source,
                &serde_json::to_vec(tx).unwrap(),
                &mut scratch,
            ) {
                Outcome::Alert(a, _) => Some(a),
                _ => None,
            }
        })
        .expect("the bundled dataset has alerts");
    let dir = tempfile::tempdir().unwrap();
    let alert_bytes = vigil::publish::AlertEncoder::new(vigil::config::Encoding::Avro)
        .encode(&alert)
        .unwrap();
    std::fs::write(dir.path().join("alert.bin"), &alert_bytes).unwrap();
    let tx_bytes = encode_avro(&transaction_schema(), &events[0]).unwrap();
    std::fs::write(dir.path().join("transaction.bin"), &tx_bytes).unwrap();
    let script = r#"
import io, json, sys
import fastavro
schemas, data = sys.argv[1], sys.argv[2]
out = {}
for name in ("transaction", "alert"):
    schema = fastavro.parse_schema(json.load(open(f"{schemas}/{name}.avsc")))
    raw = open(f"{data}/{name}.bin", "rb").read()
    buf = io.BytesIO(raw)
    value = fastavro.schemaless_reader(buf, schema)
    assert buf.tell() == len(raw), f"{name}: {len(raw) - buf.tell()} bytes left over"
    out[name] = value
print(json.dumps(out, default=str))
"#;
    let output = Command::new("python3")
        .args(["-c", script])
        .arg(repo().join("schemas"))
        .arg(dir.path())
        .output()
        .expect("python3 runs (tests/install-tools.sh installs fastavro)");
    assert!(
        output.status.success(),
        "fastavro: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let read: Json = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        read["transaction"]["TransactionID"],
        events[0].transaction_id.as_str()
    );
    assert_eq!(read["alert"]["alert_id"], alert.alert_id.as_str());
    assert_eq!(
        read["alert"]["transaction"]["AccountID"],
        alert.account_id.as_str()
    );
    assert_eq!(
        read["alert"]["models"][1]["score"].as_f64(),
        Some(alert.models[1].score)
    );
}

// ---- Kubernetes ------------------------------------------------------------------------------

/// `kustomize build` of a directory under deploy/kubernetes, as its documents.
fn kustomize(kustomize: &Path, dir: &str) -> Vec<Yaml> {
    let text = run(Command::new(kustomize)
        .arg("build")
        .arg(repo().join("deploy/kubernetes").join(dir)));
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect()
}

fn of_kind<'a>(docs: &'a [Yaml], kind: &str) -> Vec<&'a Yaml> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

/// Every rendered layout passes the Kubernetes API's own schemas (kubernetes-validate, strict:
/// an unknown or misplaced field fails), and runs as a cluster with the `restricted` pod
/// security standard demands: numeric non-root user, read-only root, no privilege escalation,
/// no capabilities, seccomp, and bounded resources.
#[test]
fn kubernetes_layouts_pass_the_api_schemas_and_run_restricted() {
    let (Some(kustomize_bin), Some(validate)) = (tool("kustomize"), tool("kubernetes-validate"))
    else {
        return;
    };
    for layout in ["base", "overlays/production"] {
        let docs = kustomize(&kustomize_bin, layout);
        let rendered = tempfile::NamedTempFile::new().unwrap();
        let text: Vec<String> = docs
            .iter()
            .map(|d| serde_yaml::to_string(d).unwrap())
            .collect();
        std::fs::write(rendered.path(), text.join("---\n")).unwrap();
        let out = run(Command::new(&validate).arg("--strict").arg(rendered.path()));
        assert!(
            !out.contains("ERROR") && !out.contains("WARN"),
            "{layout}: {out}"
        );
        let kinds: BTreeSet<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
        for kind in [
            "StatefulSet",
            "Service",
            "PodDisruptionBudget",
            "Job",
            "ConfigMap",
        ] {
            assert!(kinds.contains(kind), "{layout} has no {kind}: {kinds:?}");
        }
        let pods: Vec<&Yaml> = of_kind(&docs, "StatefulSet")
            .into_iter()
            .chain(of_kind(&docs, "Job"))
            .map(|w| &w["spec"]["template"]["spec"])
            .collect();
        for pod in pods {
            let sc = &pod["securityContext"];
            assert_eq!(sc["runAsNonRoot"], Yaml::Bool(true), "{layout}: {sc:?}");
            assert!(
                sc["runAsUser"].as_u64().is_some_and(|u| u > 0),
                "{layout}: {sc:?}"
            );
            assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault", "{layout}");
            for c in pod["containers"].as_sequence().unwrap() {
                let name = c["name"].as_str().unwrap();
                let csc = &c["securityContext"];
                assert_eq!(
                    csc["readOnlyRootFilesystem"],
                    Yaml::Bool(true),
                    "{layout}/{name}"
                );
                assert_eq!(
                    csc["allowPrivilegeEscalation"],
                    Yaml::Bool(false),
                    "{layout}/{name}"
                );
                assert_eq!(
                    strs(&csc["capabilities"]["drop"]),
                    ["ALL"],
                    "{layout}/{name}"
                );
                for bound in ["requests", "limits"] {
                    assert!(
                        c["resources"][bound]["memory"].as_str().is_some(),
                        "{layout}/{name} has no memory {bound}"
                    );
                }
            }
        }
    }
}

/// The vigil pods as the StatefulSet declares them: probes on the routes and port vigil serves,
/// at most one replica per input partition, the Service and the disruption budget selecting
/// exactly these pods, the image's numeric user, and a grace period longer than vigil's own
/// 60 s bound on a stop.
#[test]
fn the_kubernetes_statefulset_probes_vigil_and_is_sized_to_the_partitions() {
    let Some(kustomize_bin) = tool("kustomize") else {
        return;
    };
    let partitions = topics_conf()
        .into_iter()
        .find(|(name, _)| name == "transactions")
        .map(|(_, p)| p)
        .unwrap();
    let dockerfile = read("Dockerfile");
    let image_user = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .unwrap()
        .split(':')
        .next()
        .unwrap()
        .parse::<u64>()
        .expect("the Dockerfile's USER is numeric");
    for layout in ["base", "overlays/production"] {
        let docs = kustomize(&kustomize_bin, layout);
        let set = of_kind(&docs, "StatefulSet")[0];
        let replicas = set["spec"]["replicas"].as_i64().unwrap();
        assert!(
            (1..=i64::from(partitions)).contains(&replicas),
            "{layout}: {replicas} replicas for {partitions} partitions"
        );
        let pod = &set["spec"]["template"];
        let labels = &pod["metadata"]["labels"];
        for selector in [
            &set["spec"]["selector"]["matchLabels"],
            &of_kind(&docs, "PodDisruptionBudget")[0]["spec"]["selector"]["matchLabels"],
            &of_kind(&docs, "Service")[0]["spec"]["selector"],
        ] {
            for (k, v) in selector.as_mapping().unwrap() {
                assert_eq!(
                    &labels[k], v,
                    "{layout}: selector {k:?} does not match the pods"
                );
            }
        }
        let spec = &pod["spec"];
        assert_eq!(
            spec["securityContext"]["runAsUser"].as_u64(),
            Some(image_user)
        );
        assert!(spec["terminationGracePeriodSeconds"].as_u64().unwrap() > 60);
        let vigil = &spec["containers"][0];
        let config: BTreeMap<String, String> = of_kind(&docs, "ConfigMap")
            .into_iter()
            .filter(|c| {
                c["metadata"]["name"]
                    .as_str()
                    .unwrap()
                    .starts_with("vigil-env")
            })
            .flat_map(|c| c["data"].as_mapping().unwrap().clone())
            .map(|(k, v)| (k.as_str().unwrap().into(), v.as_str().unwrap().into()))
            .collect();
        let port = config["VIGIL_SERVER__ADDR"].rsplit(':').next().unwrap();
        assert_eq!(
            vigil["ports"][0]["containerPort"]
                .as_u64()
                .unwrap()
                .to_string(),
            port
        );
        assert_eq!(vigil["livenessProbe"]["httpGet"]["path"], "/health");
        assert_eq!(vigil["readinessProbe"]["httpGet"]["path"], "/ready");
        assert_eq!(
            vigil["readinessProbe"]["httpGet"]["port"],
            vigil["ports"][0]["name"]
        );

        // Every setting the pods get is one vigil accepts: vigil loads its configuration from
        // exactly these variables (a wrong key or value stops it with the key's name).
        let mut env = config.clone();
        for e in vigil["env"].as_sequence().unwrap() {
            if let Some(v) = e["value"].as_str() {
                env.insert(
                    e["name"].as_str().unwrap().into(),
                    v.replace("$(POD_NAME)", "vigil-0"),
                );
            }
        }
        let work = tempfile::tempdir().unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_vigil"))
            .args(["simulate", "--count", "1", "--out"])
            .arg(work.path().join("one.jsonl"))
            .current_dir(work.path())
            .env_clear()
            .envs(env.iter().filter(|(k, _)| k.starts_with("VIGIL_")))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{layout}: vigil refuses its configuration: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The topic Job applies kafka/create-topics.sh and kafka/topics.conf themselves (the ConfigMap
/// is generated from those files), against the brokers vigil is given.
#[test]
fn the_kubernetes_topic_job_runs_the_repositorys_topic_script_against_vigils_brokers() {
    let Some(kustomize_bin) = tool("kustomize") else {
        return;
    };
    let docs = kustomize(&kustomize_bin, "base");
    let topics = of_kind(&docs, "ConfigMap")
        .into_iter()
        .find(|c| {
            c["metadata"]["name"]
                .as_str()
                .unwrap()
                .starts_with("vigil-topics")
        })
        .unwrap();
    assert_eq!(
        topics["data"]["create-topics.sh"].as_str(),
        Some(read("kafka/create-topics.sh").as_str())
    );
    assert_eq!(
        topics["data"]["topics.conf"].as_str(),
        Some(read("kafka/topics.conf").as_str())
    );
    let job = &of_kind(&docs, "Job")[0]["spec"]["template"]["spec"];
    assert_eq!(
        job["volumes"][0]["configMap"]["name"],
        topics["metadata"]["name"]
    );
    let c = &job["containers"][0];
    assert_eq!(strs(&c["command"])[1], "/kafka-setup/create-topics.sh");
    let bootstrap = c["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "BOOTSTRAP")
        .unwrap();
    assert_eq!(
        bootstrap["valueFrom"]["configMapKeyRef"]["key"],
        "VIGIL_KAFKA__BROKERS"
    );
}

/// Every Dockerfile compose builds, vigil's included.
fn dockerfiles(compose: &Compose) -> BTreeSet<String> {
    let mut files: BTreeSet<String> = compose
        .services()
        .values()
        .filter_map(|s| match &s["build"] {
            Yaml::String(context) => Some(format!("{context}/Dockerfile")),
            Yaml::Mapping(_) => Some(format!(
                "{}/{}",
                s["build"]["context"].as_str().unwrap_or("."),
                s["build"]["dockerfile"].as_str().unwrap_or("Dockerfile")
            )),
            _ => None,
        })
        .map(|p| p.trim_start_matches("./").to_string())
        .collect();
    files.insert("Dockerfile".into());
    files
}

/// hadolint, the Dockerfile linter, finds nothing in any Dockerfile (each rule not followed says
/// why in the file).
#[test]
fn hadolint_accepts_every_dockerfile() {
    let Some(hadolint) = tool("hadolint") else {
        return;
    };
    let files = dockerfiles(&Compose::load());
    assert!(files.contains("logging/tools.Dockerfile"), "{files:?}");
    for file in files {
        run(Command::new(&hadolint)
            .arg("--no-color")
            .arg(repo().join(&file)));
    }
}

/// Starting the stack downloads nothing: no service installs packages when it starts (a host
/// without egress would otherwise never get past the certs service); tools are built into
/// images.
#[test]
fn compose_services_install_nothing_when_they_start() {
    let compose = Compose::load();
    for (name, s) in compose.services() {
        let command = [&s["command"], &s["entrypoint"]]
            .iter()
            .map(|v| match v {
                Yaml::String(c) => c.clone(),
                other => strs(other).join(" "),
            })
            .collect::<Vec<_>>()
            .join(" ");
        for installer in [
            "apk add",
            "apt-get",
            "pip install",
            "yum install",
            "dnf install",
            "curl -sSL",
        ] {
            assert!(
                !command.contains(installer),
                "{name} runs `{installer}` at start: {command}"
            );
        }
    }
}

/// Runs logging/elasticsearch/setup.sh (real curl, real jq) against a server that records each
/// request: passwords with quotes, backslashes and the like arrive as written, inside valid
/// JSON; `.env.example`'s placeholders are refused before anything is sent.
#[test]
fn es_setup_sends_passwords_as_json_whatever_they_hold_and_refuses_placeholders() {
    let (Some(_), Some(_)) = (tool("curl"), tool("jq")) else {
        return;
    };
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(String, Vec<u8>)>::new()));
    let seen = requests.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let mut length = 0;
            loop {
                let mut header = String::new();
                reader.read_line(&mut header).unwrap();
                if header.trim().is_empty() {
                    break;
                }
                if let Some(v) = header.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap();
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            seen.lock().unwrap().push((line.trim().to_string(), body));
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}");
        }
    });
    let password = r#"a"b\c $HOME `x` {}'é"#;
    let setup = |elastic: &str| {
        Command::new("sh")
            .arg(repo().join("logging/elasticsearch/setup.sh"))
            .env("ES_URL", &url)
            .env("ES_CA", "/dev/null")
            .env("ELASTIC_PASSWORD", elastic)
            .env("KIBANA_SYSTEM_PASSWORD", password)
            .env("FILEBEAT_PASSWORD", format!("{password}-fb"))
            .env("ES_METRICS_PASSWORD", "metrics-s3cret")
            .output()
            .unwrap()
    };
    let refused = setup("change-me");
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr)
            .contains("ELASTIC_PASSWORD is still the placeholder"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(
        requests.lock().unwrap().is_empty(),
        "a request went out before the check"
    );

    let out = setup("elastic-s3cret");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let requests = requests.lock().unwrap();
    let body = |target: &str| -> Json {
        let (_, body) = requests
            .iter()
            .find(|(line, _)| line.contains(target))
            .unwrap_or_else(|| panic!("no request to {target}"));
        serde_json::from_slice(body).unwrap_or_else(|e| panic!("{target}: not JSON ({e})"))
    };
    assert_eq!(
        body("/_security/user/kibana_system/_password")["password"],
        password
    );
    let filebeat = body("/_security/user/filebeat_writer");
    assert_eq!(filebeat["password"], format!("{password}-fb"));
    assert_eq!(filebeat["roles"][0], "vigil_log_writer");
    assert_eq!(
        body("/_security/user/metrics_reader")["roles"][0],
        "vigil_metrics"
    );
    assert_eq!(
        body("/_security/role/vigil_metrics")["cluster"][0],
        "monitor"
    );
    assert_eq!(
        body("/_index_template/vigil-logs"),
        json("logging/elasticsearch/index-template.json")
    );
}

/// `docker-compose.yml` as Compose v2 loads it (compose-go: the compose-spec schema,
/// interpolation from the env file), as JSON.
fn compose_rendered(render: &Path, env_file: &Path) -> Json {
    let out = run(Command::new(render)
        .arg(repo().join("docker-compose.yml"))
        .arg(env_file));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("compose-config: {e}: {out}"))
}

/// The compose file passes Compose's own loader and schema. Rendered with `.env.example` as
/// it is, every service given a `change-me` value waits for `preflight`, which is given that
/// variable too and refuses to succeed, naming each one; with every placeholder replaced, no
/// `change-me` reaches any service and `preflight` lets the stack start.
#[test]
fn no_change_me_placeholder_reaches_a_service_past_the_preflight_check() {
    let Some(render) = tool("compose-config") else {
        return;
    };
    let preflight = |env: &serde_json::Map<String, Json>| {
        Command::new("sh")
            .arg(repo().join("deploy/compose/preflight.sh"))
            .env_clear()
            .envs(env.iter().filter_map(|(k, v)| Some((k, v.as_str()?))))
            .output()
            .unwrap()
    };
    let example = compose_rendered(&render, &repo().join(".env.example"));
    let services = example["services"].as_object().unwrap();
    let guard = services["preflight"]["environment"].as_object().unwrap();
    let mut guarded = 0;
    for (name, s) in services {
        let Some(env) = s["environment"].as_object() else {
            continue;
        };
        for (key, value) in env {
            if !value.as_str().is_some_and(|v| v.contains("change-me")) || name == "preflight" {
                continue;
            }
            assert_eq!(
                s["depends_on"]["preflight"]["condition"], "service_completed_successfully",
                "{name} is given the placeholder in {key} without waiting for preflight"
            );
            assert!(
                guard.values().any(|g| g == value),
                "preflight is not given the value {name} gets in {key}"
            );
            guarded += 1;
        }
    }
    assert!(guarded >= 10, "{guarded}");
    let refused = preflight(guard);
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stderr);
    for key in guard.keys() {
        assert!(why.contains(key.as_str()), "{key} not named: {why}");
    }

    let filled = tempfile::NamedTempFile::new().unwrap();
    let text: String = read(".env.example")
        .lines()
        .map(|l| match l.split_once('=') {
            Some(("KAFKA_CLUSTER_ID", _)) => "KAFKA_CLUSTER_ID=q1Sh-9_ISia_zwGINzRvyQ".to_string(),
            Some((k, v)) if v.contains("change-me") => {
                format!(
                    "{k}={}",
                    v.replace("change-me", "s3cr3t-value-of-a-real-deployment")
                )
            }
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(filled.path(), text).unwrap();
    let real = compose_rendered(&render, filled.path());
    let all = real.to_string();
    assert!(
        !all.contains("change-me"),
        "a placeholder is hard-coded in docker-compose.yml"
    );
    let ok = preflight(
        real["services"]["preflight"]["environment"]
            .as_object()
            .unwrap(),
    );
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
}

#[test]
fn config_check_accepts_the_shipped_file_and_names_the_key_of_a_bad_override() {
    let check = |env: &[(&str, &str)]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_vigil"));
        c.args(["config", "check", "-c"])
            .arg(repo().join("config.yml"))
            .env_remove("RUST_BACKTRACE")
            .env_remove("RUST_LIB_BACKTRACE");
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().unwrap()
    };
    let ok = check(&[("VIGIL_SERVER__AUTH__PASSWORD", "not-printed")]);
    let out = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.status.success(), "{out}");
    assert!(out.contains("config.yml: valid"), "{out}");
    assert!(out.contains("VIGIL_SERVER__AUTH__PASSWORD"), "{out}");
    assert!(
        !out.contains("not-printed"),
        "a secret is never printed: {out}"
    );
    let bad = check(&[("VIGIL_SERVER__TRUSTED_PROXIES", "[300.0.0.1]")]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(1), "{err}");
    assert!(err.contains("server.trusted_proxies"), "{err}");
}
