//! Writes from web pages on other sites are refused (fetch metadata).
//!
//! For python-consul and Patroni, the agent takes some writes as GET
//! (join, deregistrations, check updates), and it reads JSON bodies
//! whatever their `Content-Type`, so a page on any site could make a
//! visitor's browser change the agent on their machine with a link, an
//! image or a form. Browsers mark such requests `Sec-Fetch-Site:
//! cross-site` (or `same-site`); HTTP clients outside browsers send no
//! such header. Those are refused with 403 unless they only read.

use axum::extract::Request;
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// Paths whose GET changes something.
const WRITING_GETS: &[&str] = &[
    "/v1/agent/join/",
    "/v1/agent/force-leave/",
    "/v1/agent/service/deregister/",
    "/v1/agent/check/deregister/",
    "/v1/agent/check/pass/",
    "/v1/agent/check/warn/",
    "/v1/agent/check/fail/",
];

/// Whether a request only reads.
fn reads(method: &Method, path: &str) -> bool {
    (method == Method::GET || method == Method::HEAD)
        && !WRITING_GETS.iter().any(|p| path.starts_with(p))
}

/// The middleware: a browser's request from another site that would
/// change something gets 403.
pub async fn refuse_cross_site(req: Request, next: Next) -> Response {
    let from_page = matches!(
        req.headers()
            .get("sec-fetch-site")
            .and_then(|v| v.to_str().ok()),
        Some("cross-site" | "same-site")
    );
    if from_page && !reads(req.method(), req.uri().path()) {
        return (
            StatusCode::FORBIDDEN,
            "Writes from a web page on another site are refused",
        )
            .into_response();
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_reads_pass() {
        assert!(reads(&Method::GET, "/v1/health/service/web"));
        assert!(reads(&Method::GET, "/v1/agent/self"));
        assert!(!reads(&Method::GET, "/v1/agent/join/10.0.0.1"));
        assert!(!reads(&Method::GET, "/v1/agent/service/deregister/a/b"));
        assert!(!reads(&Method::PUT, "/v1/kv/x"));
        assert!(!reads(&Method::POST, "/v1/query"));
    }
}
