//! Confluent-compatible Schema Registry client: the writer schema of each schema id met in the
//! Confluent wire format (magic byte 0, a big-endian id, the datum), fetched once and kept for the
//! life of the process, and the registration of vigil's own alert schema under its subject.
//!
//! Only the REST calls every compatible registry serves are used (`GET /schemas/ids/{id}`,
//! `POST /subjects/{subject}/versions`), so Confluent's, Apicurio's (`/apis/ccompat/v7`) and
//! Karapace's all do. A schema id never changes meaning in a registry, which is what makes the
//! cache without expiry correct.
//!
//! The client is synchronous (`ureq`): the offline tools call it from plain loops and the stream
//! fetches each new id once, on a blocking thread, before the event reaches decode, so decode
//! itself only ever reads the cache there.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use apache_avro::Schema;
use base64::Engine as _;

/// Where the registry is and how to reach it.
#[derive(Debug, Clone, PartialEq)]
pub struct RegistryConfig {
    /// Base URL, e.g. `http://registry:8081` or Apicurio's `http://apicurio:8080/apis/ccompat/v7`.
    pub url: String,
    /// HTTP basic credentials (Confluent Cloud: the API key and secret).
    pub username: Option<String>,
    pub password: Option<String>,
    /// PEM file of the CA that signed an `https` registry's certificate; the system's roots
    /// otherwise.
    pub ca_location: Option<PathBuf>,
    /// Bound on one request, connection included.
    pub timeout: Duration,
}

/// What the registry says about one schema id.
#[derive(Debug, Clone)]
pub enum Lookup {
    /// An Avro schema, parsed.
    Found(Arc<Schema>),
    /// A definite answer that it cannot be used: not registered, not Avro, does not parse.
    /// Events written with it are dead letters with this reason.
    Unusable(String),
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// No answer that settles the question (connection refused, timeout, 5xx, 401/403, 429):
    /// the stream waits and asks again rather than turn events into dead letters.
    #[error("schema registry {url} did not answer {what}: {detail}")]
    Unavailable {
        url: String,
        what: String,
        detail: String,
    },
    /// The registry answered and refused (e.g. 409: the alert schema is incompatible with the
    /// subject's compatibility rule).
    #[error("schema registry {url} refused {what}: HTTP {status}: {body}")]
    Refused {
        url: String,
        what: String,
        status: u16,
        body: String,
    },
    #[error("schema registry CA file {path}: {detail}")]
    Ca { path: PathBuf, detail: String },
}

/// A registry connection with its cache of schema ids.
#[derive(Debug)]
pub struct SchemaRegistry {
    url: String,
    authorization: Option<String>,
    agent: ureq::Agent,
    ids: RwLock<HashMap<u32, Lookup>>,
}

/// Content type of the registry's v1 API, which every compatible registry accepts.
const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

impl SchemaRegistry {
    pub fn new(cfg: &RegistryConfig) -> Result<Self, RegistryError> {
        use ureq::tls::{Certificate, RootCerts, TlsConfig, TlsProvider};
        let roots = match &cfg.ca_location {
            None => RootCerts::PlatformVerifier,
            Some(path) => {
                let ca = |detail: String| RegistryError::Ca {
                    path: path.clone(),
                    detail,
                };
                let pem = std::fs::read(path).map_err(|e| ca(e.to_string()))?;
                let cert = Certificate::from_pem(&pem).map_err(|e| ca(e.to_string()))?;
                RootCerts::Specific(Arc::new(vec![cert]))
            }
        };
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(cfg.timeout))
            // Status codes are answers here (404 = unknown id), not transport errors.
            .http_status_as_error(false)
            .tls_config(
                TlsConfig::builder()
                    .provider(TlsProvider::NativeTls)
                    .root_certs(roots)
                    .build(),
            )
            .build()
            .new_agent();
        let authorization = cfg.username.as_ref().map(|user| {
            let pair = format!("{user}:{}", cfg.password.as_deref().unwrap_or(""));
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(pair)
            )
        });
        Ok(Self {
            url: cfg.url.trim_end_matches('/').to_string(),
            authorization,
            agent,
            ids: RwLock::new(HashMap::new()),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The cached answer for `id`, if it was asked before.
    pub fn cached(&self, id: u32) -> Option<Lookup> {
        self.ids.read().ok()?.get(&id).cloned()
    }

    /// Caches `lookup` as the registry's answer for `id`.
    #[cfg(test)]
    pub(crate) fn remember(&self, id: u32, lookup: Lookup) {
        if let Ok(mut ids) = self.ids.write() {
            ids.insert(id, lookup);
        }
    }

    /// The writer schema of `id`: cached, or fetched and then cached. Blocks for at most the
    /// configured timeout.
    pub fn writer_schema(&self, id: u32) -> Result<Lookup, RegistryError> {
        if let Some(known) = self.cached(id) {
            return Ok(known);
        }
        let what = format!("schema id {id}");
        let (status, body) = self.call(&what, |agent, url| {
            let mut req = agent.get(format!("{url}/schemas/ids/{id}"));
            if let Some(a) = &self.authorization {
                req = req.header("Authorization", a);
            }
            req.header("Accept", CONTENT_TYPE).call()
        })?;
        let lookup = match status {
            200 => parse_schema_answer(&body),
            404 | 422 => Lookup::Unusable("is not registered in the schema registry".into()),
            _ => return Err(self.unavailable(&what, format!("HTTP {status}: {}", short(&body)))),
        };
        if let Ok(mut ids) = self.ids.write() {
            ids.insert(id, lookup.clone());
        }
        Ok(lookup)
    }

    /// Registers `schema` (Avro JSON) under `subject` and returns its id; registering a schema
    /// the subject already has returns the existing id, as the API defines.
    pub fn register(&self, subject: &str, schema: &str) -> Result<u32, RegistryError> {
        let what = format!("registering a schema under subject {subject}");
        let body = serde_json::json!({ "schemaType": "AVRO", "schema": schema }).to_string();
        let (status, answer) = self.call(&what, |agent, url| {
            let mut req = agent.post(format!("{url}/subjects/{}/versions", path_segment(subject)));
            if let Some(a) = &self.authorization {
                req = req.header("Authorization", a);
            }
            req.header("Content-Type", CONTENT_TYPE)
                .header("Accept", CONTENT_TYPE)
                .send(body.as_str())
        })?;
        match status {
            200 => serde_json::from_str::<serde_json::Value>(&answer)
                .ok()
                .and_then(|v| v.get("id")?.as_u64())
                .and_then(|id| u32::try_from(id).ok())
                .ok_or_else(|| {
                    self.unavailable(
                        &what,
                        format!("an answer without an id: {}", short(&answer)),
                    )
                }),
            401 | 403 | 429 | 500.. => Err(self.unavailable(&what, format!("HTTP {status}"))),
            _ => Err(RegistryError::Refused {
                url: self.url.clone(),
                what,
                status,
                body: short(&answer).to_string(),
            }),
        }
    }

    fn call(
        &self,
        what: &str,
        send: impl FnOnce(&ureq::Agent, &str) -> Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<(u16, String), RegistryError> {
        let mut response =
            send(&self.agent, &self.url).map_err(|e| self.unavailable(what, e.to_string()))?;
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .with_config()
            .limit(MAX_ANSWER_BYTES)
            .read_to_string()
            .map_err(|e| self.unavailable(what, e.to_string()))?;
        Ok((status, body))
    }

    fn unavailable(&self, what: &str, detail: String) -> RegistryError {
        RegistryError::Unavailable {
            url: self.url.clone(),
            what: what.to_string(),
            detail,
        }
    }
}

/// A schema answer is small; a registry that sends more is not one.
const MAX_ANSWER_BYTES: u64 = 4 << 20;

/// `{"schema": "...", "schemaType": "AVRO"}`; `schemaType` is absent for Avro.
fn parse_schema_answer(body: &str) -> Lookup {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(body) else {
        return Lookup::Unusable(format!(
            "the registry's answer is not JSON: {}",
            short(body)
        ));
    };
    match v.get("schemaType").and_then(|t| t.as_str()) {
        None | Some("AVRO") => {}
        Some(other) => return Lookup::Unusable(format!("is a {other} schema, not Avro")),
    }
    let Some(text) = v.get("schema").and_then(|s| s.as_str()) else {
        return Lookup::Unusable("the registry's answer has no schema".into());
    };
    match Schema::parse_str(text) {
        Ok(schema) => Lookup::Found(Arc::new(schema)),
        Err(e) => Lookup::Unusable(format!("does not parse as Avro: {e}")),
    }
}

/// A subject as one URL path segment (subjects may hold `.`, `:` or `/`).
fn path_segment(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn short(s: &str) -> &str {
    let mut end = s.len().min(300);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_that_is_not_an_avro_schema_is_unusable_with_the_reason() {
        let cases = [
            (
                r#"{"schemaType":"PROTOBUF","schema":"syntax = \"proto3\";"}"#,
                "PROTOBUF",
            ),
            (r#"{"schema":"{\"type\":\"recrd\"}"}"#, "does not parse"),
            (r#"{"id":3}"#, "no schema"),
            ("<html>", "not JSON"),
        ];
        for (body, why) in cases {
            match parse_schema_answer(body) {
                Lookup::Unusable(reason) => assert!(reason.contains(why), "{body}: {reason}"),
                Lookup::Found(_) => panic!("{body} was taken as a schema"),
            }
        }
        assert!(matches!(
            parse_schema_answer(r#"{"schema":"{\"type\":\"string\"}"}"#),
            Lookup::Found(_)
        ));
    }

    #[test]
    fn a_subject_with_reserved_characters_is_one_path_segment() {
        assert_eq!(path_segment("alerts-value"), "alerts-value");
        assert_eq!(path_segment("a/b c:d"), "a%2Fb%20c%3Ad");
    }

    #[test]
    fn an_unreachable_registry_is_unavailable_not_an_unknown_id() {
        let registry = SchemaRegistry::new(&RegistryConfig {
            url: "http://127.0.0.1:9/".into(),
            username: None,
            password: None,
            ca_location: None,
            timeout: Duration::from_secs(2),
        })
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(registry.url(), "http://127.0.0.1:9");
        let got = registry.writer_schema(1);
        assert!(
            matches!(got, Err(RegistryError::Unavailable { .. })),
            "{got:?}"
        );
        assert!(registry.cached(1).is_none(), "a non-answer is not cached");
    }
}
