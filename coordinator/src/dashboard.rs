//! The dashboard: one HTML page, its stylesheet and its script, compiled into the binary.
//!
//! Hospitals run air-gapped, so nothing is fetched from elsewhere: no CDN, no web fonts, no
//! chart library (the charts are SVG drawn by the script). The files hold no data and no
//! secret, so they are served without the token; the page asks for the token and sends it
//! as the bearer header of its API requests, like any other client. The headers forbid
//! everything the page does not need (inline script, framing, other origins), so a value
//! that a site managed to get into the API — a decline reason, say — cannot run as script
//! even if the page mishandled it.

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

pub const INDEX_HTML: &str = include_str!("../dashboard/index.html");
pub const SCRIPT: &str = include_str!("../dashboard/dashboard.js");
pub const STYLE: &str = include_str!("../dashboard/dashboard.css");

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
    connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    // A new coordinator binary may bring a new page: never serve a stale one from cache.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

pub async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

pub async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

pub async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Every API path the script names is in the OpenAPI document (the browser test checks
    /// the requests it actually sees; this catches a new path before a browser is involved).
    #[test]
    fn every_api_path_the_script_names_is_documented() {
        let doc: serde_json::Value = serde_json::from_str(crate::status::OPENAPI).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        let named: Vec<&str> = SCRIPT
            .split('"')
            .filter(|s| s.starts_with("/api/") || *s == "/metrics")
            .collect();
        assert!(named.len() >= 4, "{named:?}");
        for path in named {
            assert!(paths.contains_key(path), "{path} is not in openapi.json");
        }
        for file in ["/", "/dashboard.js", "/dashboard.css"] {
            assert!(paths.contains_key(file), "{file} is not in openapi.json");
            assert!(INDEX_HTML.contains(&format!("\"{file}")) || file == "/");
        }
    }
}
