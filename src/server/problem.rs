//! Error answers as RFC 9457 problem details (`application/problem+json`): `type`, `title` and
//! `status` as the RFC has them, `detail` saying what is wrong in words, `field` naming the
//! input at fault (or null), and extension members where there is more to say (`invalid`: every
//! invalid transaction of a batch). [`every_error_is_a_problem`] turns the answers that other
//! layers write (axum's rejections, a timeout) into the same shape, so a client parses one kind
//! of error body.

use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

pub const CONTENT_TYPE: &str = "application/problem+json";

/// A 4xx/5xx answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    detail: String,
    field: Option<String>,
    extensions: Map<String, Value>,
}

impl ApiError {
    pub fn new(status: StatusCode, detail: impl Into<String>, field: Option<&str>) -> Self {
        Self {
            status,
            detail: detail.into(),
            field: field.map(str::to_string),
            extensions: Map::new(),
        }
    }

    /// Adds an extension member (RFC 9457 §3.2).
    pub fn with(mut self, name: &str, value: Value) -> Self {
        self.extensions.insert(name.to_string(), value);
        self
    }

    pub fn unprocessable(detail: impl Into<String>, field: Option<&str>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, detail, field)
    }

    pub fn bad_request(detail: impl Into<String>, field: Option<&str>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, detail, field)
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The request field the problem is about, if one.
    pub fn field(&self) -> Option<&str> {
        self.field.as_deref()
    }

    fn body(self) -> Value {
        let mut body = json!({
            "type": "about:blank",
            "title": self.status.canonical_reason().unwrap_or("Error"),
            "status": self.status.as_u16(),
            "detail": self.detail,
            "field": self.field,
        });
        if let Value::Object(members) = &mut body {
            members.extend(self.extensions);
        }
        body
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status;
        let body = serde_json::to_vec(&self.body()).unwrap_or_default();
        (
            status,
            [(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE))],
            body,
        )
            .into_response()
    }
}

/// Error answers longer than this are not read back into a problem's `detail`.
const PLAIN_ERROR_LIMIT: usize = 4096;

/// Rewrites an error answer that is not JSON (axum's plain-text rejections, tower-http's empty
/// 408 on a timeout) into a problem, its text as the `detail`.
pub async fn every_error_is_a_problem(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    // A JSON answer is one a route meant (a problem, or `/ready`'s 503 with its reasons).
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| {
            let v = v.as_bytes();
            v == CONTENT_TYPE.as_bytes() || v.starts_with(b"application/json")
        });
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, PLAIN_ERROR_LIMIT)
        .await
        .ok()
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .filter(|t| !t.is_empty());
    let detail = text.unwrap_or_else(|| match status {
        StatusCode::REQUEST_TIMEOUT => {
            "the request took longer than server.request_timeout_seconds".into()
        }
        _ => status.canonical_reason().unwrap_or("error").to_lowercase(),
    });
    let mut answer = ApiError::new(status, detail, None).into_response();
    // Keep what the layer said besides the body (Retry-After, WWW-Authenticate, Allow).
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            answer.headers_mut().insert(name.clone(), value.clone());
        }
    }
    answer
}

/// An empty body for tests of the rewrite.
#[cfg(test)]
fn bare(status: StatusCode) -> Response {
    (status, axum::body::Body::empty()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::body::Body;
    use axum::routing::get;
    use tower::ServiceExt;

    async fn body_of(r: Response) -> Value {
        let bytes = axum::body::to_bytes(r.into_body(), 1 << 20)
            .await
            .unwrap_or_default();
        serde_json::from_slice(&bytes).unwrap_or(Value::Null)
    }

    #[tokio::test]
    async fn a_problem_has_the_rfc_members_the_field_and_its_extensions() {
        let r = ApiError::unprocessable("2 of 3 transactions are invalid", Some("Amount"))
            .with("invalid", json!([{"index": 1}]))
            .into_response();
        assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(r.headers()[header::CONTENT_TYPE], CONTENT_TYPE);
        let v = body_of(r).await;
        assert_eq!(v["type"], "about:blank");
        assert_eq!(v["title"], "Unprocessable Entity");
        assert_eq!(v["status"], 422);
        assert_eq!(v["detail"], "2 of 3 transactions are invalid");
        assert_eq!(v["field"], "Amount");
        assert_eq!(v["invalid"][0]["index"], 1);
    }

    #[tokio::test]
    async fn plain_and_empty_error_answers_become_problems_and_keep_their_headers() {
        let app = Router::new()
            .route(
                "/text",
                get(|| async { (StatusCode::BAD_REQUEST, "no good") }),
            )
            .route(
                "/empty",
                get(|| async { bare(StatusCode::REQUEST_TIMEOUT) }),
            )
            .route(
                "/later",
                get(|| async {
                    (
                        StatusCode::TOO_MANY_REQUESTS,
                        [(header::RETRY_AFTER, "3")],
                        "slow down",
                    )
                }),
            )
            .route("/fine", get(|| async { "fine" }))
            .route(
                "/meant",
                get(|| async {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        axum::Json(json!({"ready": false})),
                    )
                }),
            )
            .layer(axum::middleware::from_fn(every_error_is_a_problem));
        let call = |path: &'static str| {
            let app = app.clone();
            async move {
                app.oneshot(
                    Request::builder()
                        .uri(path)
                        .body(Body::empty())
                        .unwrap_or_default(),
                )
                .await
                .unwrap_or_else(|e| match e {})
            }
        };
        let r = call("/text").await;
        assert_eq!(r.headers()[header::CONTENT_TYPE], CONTENT_TYPE);
        assert_eq!(body_of(r).await["detail"], "no good");
        let r = call("/empty").await;
        let v = body_of(r).await;
        assert_eq!(v["status"], 408);
        assert!(
            v["detail"]
                .as_str()
                .is_some_and(|d| d.contains("request_timeout_seconds")),
            "{v}"
        );
        let r = call("/later").await;
        assert_eq!(r.headers()[header::RETRY_AFTER], "3");
        assert_eq!(body_of(r).await["detail"], "slow down");
        let r = call("/meant").await;
        assert_eq!(
            body_of(r).await,
            json!({"ready": false}),
            "a route's own JSON stays"
        );
        let r = call("/fine").await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_ne!(
            r.headers().get(header::CONTENT_TYPE).map(|v| v.as_bytes()),
            Some(CONTENT_TYPE.as_bytes())
        );
    }
}
