//! The HTTP API against a running vigil: schemathesis (PyPI) generates requests from
//! `/openapi.json` and checks that none gets a 5xx and every response matches the document.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::{saved_models, start_demo};

#[test]
fn schemathesis_finds_no_server_error_and_no_response_outside_the_openapi_document() {
    let installed = Command::new("python3")
        .args(["-c", "import schemathesis"])
        .status()
        .is_ok_and(|s| s.success());
    if !installed {
        assert!(
            std::env::var_os("CI").is_none(),
            "schemathesis is not installed; tests/install-tools.sh installs it"
        );
        eprintln!("skipped: schemathesis is not installed (tests/install-tools.sh installs it)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_vigil, addr) = start_demo(
        &saved_models(),
        dir.path(),
        &["--rate", "50"],
        // Generated traffic would otherwise meet the default rate limit.
        &[("VIGIL_SERVER__RATE_LIMIT__PER_SECOND", "0")],
    );
    let out = Command::new("python3")
        .args(["-m", "schemathesis.cli", "run", &format!("http://{addr}/openapi.json")])
        .args(["--max-examples", "60", "--seed", "1"])
        // An endless event stream has no response to check.
        .args(["--exclude-path", "/alerts/stream"])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance",
        ])
        .env("NO_COLOR", "1")
        .current_dir(dir.path())
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "schemathesis failed:\n{report}");
    assert!(report.contains("passed"), "{report}");
}
