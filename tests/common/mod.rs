//! Helpers shared by the integration suites.
#![allow(dead_code, clippy::unwrap_used)]

use vigil::config::{FeatureConfig, ModelConfig};
use vigil::models::ModelSet;
use vigil::run::Shared;
use vigil::train::{bundled_history, train};

/// Models trained with the default configuration on the bundled dataset.
pub fn trained_models() -> ModelSet {
    train(
        &bundled_history().unwrap(),
        &ModelConfig::default(),
        &FeatureConfig::default(),
        vigil::config::Policy::All,
    )
    .unwrap()
}

/// Models of the bundled dataset trained with another forest seed: the same features, another
/// version.
pub fn reseeded_models(seed: u64) -> ModelSet {
    let mut models = ModelConfig::default();
    models.forest.seed = seed;
    train(
        &bundled_history().unwrap(),
        &models,
        &FeatureConfig::default(),
        vigil::config::Policy::All,
    )
    .unwrap()
}

/// Models trained for a wider rolling window than the default: a version whose features need
/// account state a stream with the default settings does not keep.
pub fn models_for_another_window() -> ModelSet {
    let features = FeatureConfig {
        window: 5,
        ..Default::default()
    };
    train(
        &bundled_history().unwrap(),
        &ModelConfig::default(),
        &features,
        vigil::config::Policy::All,
    )
    .unwrap()
}

/// Shared server/stream handles over freshly trained models.
pub fn shared() -> Shared {
    Shared::new(trained_models()).unwrap()
}

/// The repository root (where Cargo.toml is).
pub fn repo() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// An external tool the test needs (promtool, prometheus, amtool, logrotate, kustomize in
/// `.tools/bin`), or `None` with a
/// note when it is missing outside CI. In CI a missing tool fails the test: `.ci/run` and
/// `tests/run-all.sh` install them (tests/install-tools.sh).
pub fn tool(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .chain([
            "/usr/sbin".into(),
            "/sbin".into(),
            repo().join(".tools/bin"),
        ])
        .map(|d| d.join(name))
        .find(|p| p.is_file());
    if found.is_none() {
        if std::env::var_os("CI").is_some() {
            panic!("{name} is not installed; tests/install-tools.sh installs it");
        }
        eprintln!("skipped: {name} is not installed (tests/install-tools.sh installs it)");
    }
    found
}

/// The test broker's address (`tests/run-all.sh` starts one and sets `VIGIL_TEST_BROKERS`), or
/// `None` with a note outside CI; in CI a missing broker fails the test.
pub fn test_brokers() -> Option<String> {
    match std::env::var("VIGIL_TEST_BROKERS") {
        Ok(b) if !b.is_empty() => Some(b),
        _ if std::env::var_os("CI").is_some() => {
            panic!("VIGIL_TEST_BROKERS is not set; run tests/run-all.sh")
        }
        _ => {
            eprintln!("skipped: no broker (VIGIL_TEST_BROKERS unset); tests/run-all.sh starts one");
            None
        }
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `f` every 250 ms until it returns `Some`, or panics with `what` after `timeout`.
pub fn eventually<T>(
    what: &str,
    timeout: std::time::Duration,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if std::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}

/// A child process killed when dropped (a failing test leaves nothing running).
pub struct Process(pub std::process::Child);

impl Process {
    /// SIGTERM, then waits for the exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.0.id().to_string();
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status();
        self.0.wait().unwrap()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `vigil demo` (embedded cluster, simulator, detector, server) on a free loopback port, with
/// models from `models` and JSON logs on stdout in `dir/stdout.log`. Returns the process and the
/// server's address once `/ready` answers 200.
pub fn start_demo(
    models: &std::path::Path,
    dir: &std::path::Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> (Process, std::net::SocketAddr) {
    let mut all = vec!["demo"];
    all.extend_from_slice(args);
    start_vigil(models, dir, &all, env)
}

/// `vigil ARGS…` (e.g. `run` against a broker in `env`), as [`start_demo`] does it.
pub fn start_vigil(
    models: &std::path::Path,
    dir: &std::path::Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> (Process, std::net::SocketAddr) {
    let stdout_path = dir.join("stdout.log");
    let stdout = std::fs::File::create(&stdout_path).unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_vigil"))
        .args(args)
        .current_dir(dir)
        .env("VIGIL_MODELS__DIR", models)
        .env("VIGIL_SERVER__ADDR", "127.0.0.1:0")
        .env("VIGIL_LOG__FORMAT", "json")
        .envs(env.iter().copied())
        .stdout(stdout)
        .spawn()
        .unwrap();
    let process = Process(child);
    let addr: std::net::SocketAddr = eventually(
        "vigil's HTTP server to log its address",
        std::time::Duration::from_secs(60),
        || {
            let text = std::fs::read_to_string(&stdout_path).ok()?;
            text.lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|v| v["message"] == "HTTP server listening")
                .and_then(|v| v["addr"].as_str()?.parse().ok())
        },
    );
    eventually(
        "vigil to be ready",
        std::time::Duration::from_secs(90),
        || {
            let r = reqwest::blocking::get(format!("http://{addr}/ready")).ok()?;
            r.status().is_success().then_some(())
        },
    );
    (process, addr)
}

/// Models trained once per test binary and saved to a directory every demo can load.
pub fn saved_models() -> std::path::PathBuf {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    let root = DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        trained_models().save(&dir.path().join("current")).unwrap();
        dir
    });
    root.path().join("current")
}
pub mod kafka;

/// Runs the `vigil` command in `dir` with `envs` and returns what it printed; panics with its
/// stderr when it fails.
pub fn vigil_command(args: &[&str], dir: &std::path::Path, envs: &[(&str, &str)]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vigil"))
        .args(args)
        .current_dir(dir)
        .envs(envs.iter().copied())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "vigil {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
