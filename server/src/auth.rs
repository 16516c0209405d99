//! Optional API keys, required as `Authorization: Bearer <key>` on every route but the health
//! probes and `/metrics`. Keys come from `--api-key` (repeatable) and from `--api-keys-file`
//! (one key per line, `#` comments), which is re-read when it changes, so keys rotate without a
//! restart. gRPC calls present the same keys in the `authorization` metadata
//! ([`check_authorization`] serves both).

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::AppError;

/// How often at most the keys file's modification time is checked.
const RECHECK: Duration = Duration::from_secs(1);

pub struct ApiKeys {
    fixed: Vec<String>,
    file: Option<PathBuf>,
    from_file: RwLock<Vec<String>>,
    /// (last check, modification time seen then)
    checked: Mutex<(Instant, Option<SystemTime>)>,
}

fn read_keys(path: &std::path::Path) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read API keys file {}: {e}", path.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect())
}

fn modified(path: &std::path::Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl ApiKeys {
    pub fn new(fixed: Vec<String>, file: Option<PathBuf>) -> Result<Self, String> {
        let (from_file, mtime) = match &file {
            Some(p) => (read_keys(p)?, modified(p)),
            None => (Vec::new(), None),
        };
        Ok(Self {
            fixed,
            file,
            from_file: RwLock::new(from_file),
            checked: Mutex::new((Instant::now(), mtime)),
        })
    }

    pub fn enabled(&self) -> bool {
        !self.fixed.is_empty() || self.file.is_some()
    }

    fn refresh(&self) {
        let Some(path) = &self.file else { return };
        let mut checked = self.checked.lock().unwrap_or_else(|e| e.into_inner());
        if checked.0.elapsed() < RECHECK {
            return;
        }
        checked.0 = Instant::now();
        let now = modified(path);
        if now == checked.1 {
            return;
        }
        match read_keys(path) {
            Ok(keys) => {
                tracing::info!(file = %path.display(), keys = keys.len(), "API keys file reloaded");
                *self.from_file.write().unwrap_or_else(|e| e.into_inner()) = keys;
                checked.1 = now;
            }
            // Keep serving with the keys we have rather than locking everyone out.
            Err(e) => tracing::warn!(error = %e, "keeping the previous API keys"),
        }
    }

    pub fn accepts(&self, key: &str) -> bool {
        self.refresh();
        let from_file = self.from_file.read().unwrap_or_else(|e| e.into_inner());
        // Compare against every key without stopping early, so timing says nothing about which
        // prefix matched.
        self.fixed
            .iter()
            .chain(from_file.iter())
            .fold(false, |found, k| {
                constant_time_eq(k.as_bytes(), key.as_bytes()) | found
            })
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Checks an `Authorization` value (HTTP header or gRPC metadata) against the keys: `Ok` when
/// no keys are configured or a valid `Bearer` key is presented, else the message to send.
pub fn check_authorization(
    keys: &ApiKeys,
    authorization: Option<&str>,
) -> Result<(), &'static str> {
    if !keys.enabled() {
        return Ok(());
    }
    let presented = authorization
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    match presented {
        Some(key) if keys.accepts(key) => Ok(()),
        Some(_) => Err("invalid API key"),
        None => Err("missing API key: send `Authorization: Bearer <key>`"),
    }
}

pub async fn require_key(State(keys): State<Arc<ApiKeys>>, req: Request, next: Next) -> Response {
    let authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match check_authorization(&keys, authorization) {
        Ok(()) => next.run(req).await,
        Err(msg) => {
            let err = AppError::new(StatusCode::UNAUTHORIZED, "unauthorized", msg)
                .styled_for(req.uri().path());
            let mut response = err.into_response();
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            response
        }
    }
}
