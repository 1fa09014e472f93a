//! Credentials toward FHIR servers and Pathling: providers of an `Authorization` header value.
//! Knows nothing of Kubernetes: secrets arrive already resolved.

use std::fmt;
use std::sync::Arc;

pub mod keys;
pub mod oauth;

use base64::Engine;
use futures::future::BoxFuture;
use reqwest::header::HeaderValue;

/// A credential could not be produced. Messages never contain secret material.
#[derive(Debug, thiserror::Error, Clone)]
pub enum AuthError {
    /// The credential material is malformed (e.g. a token with a newline).
    #[error("{what} is not usable: {why}")]
    Invalid { what: String, why: String },
    /// The authorization server refused, or could not be reached.
    #[error("token request to {url} failed: {message}")]
    TokenEndpoint { url: String, message: String },
}

/// A secret value that never prints itself.
#[derive(Clone)]
pub struct SecretString(Arc<str>);

impl SecretString {
    /// Wraps a secret.
    pub fn new(s: impl Into<Arc<str>>) -> Self {
        Self(s.into())
    }
    /// The secret itself; use only to build a request.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretString(***)")
    }
}

/// Resolved credential configuration (secrets already read).
#[derive(Clone, Debug)]
pub enum AuthConfig {
    /// `Authorization: Bearer <token>`.
    Bearer { token: SecretString },
    /// HTTP Basic.
    Basic { username: String, password: SecretString },
    /// OAuth2 client credentials (client secret) or SMART Backend Services (signed assertion).
    OAuth(Box<oauth::OAuthConfig>),
}

/// Produces the `Authorization` header for requests to one origin.
pub trait AuthProvider: Send + Sync + fmt::Debug {
    /// The header value to send now (may fetch or renew a token).
    fn authorization(&self) -> BoxFuture<'_, Result<HeaderValue, AuthError>>;
    /// Called after a 401: forget any cached token so the next call renews it. Returns whether a
    /// retry can help (false for static credentials).
    fn invalidate(&self) -> bool {
        false
    }
}

/// A fixed header value (bearer token or Basic).
pub struct StaticAuth {
    value: HeaderValue,
}

impl fmt::Debug for StaticAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StaticAuth(***)")
    }
}

impl AuthProvider for StaticAuth {
    fn authorization(&self) -> BoxFuture<'_, Result<HeaderValue, AuthError>> {
        let v = self.value.clone();
        Box::pin(async move { Ok(v) })
    }
}

/// Builds the provider for a resolved configuration. `http` is the client used for token requests
/// (it never carries the provider's own tokens).
pub fn provider(config: &AuthConfig, http: reqwest::Client) -> Result<Arc<dyn AuthProvider>, AuthError> {
    let raw = match config {
        AuthConfig::OAuth(c) => return Ok(Arc::new(oauth::OAuthProvider::new((**c).clone(), http))),
        AuthConfig::Bearer { token } => format!("Bearer {}", token.expose().trim()),
        AuthConfig::Basic { username, password } => {
            let pair = format!("{username}:{}", password.expose().trim_end_matches(['\n', '\r']));
            format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(pair))
        }
    };
    let mut value = HeaderValue::from_str(&raw).map_err(|_| AuthError::Invalid {
        what: "the credential".into(),
        why: "it contains characters not allowed in an HTTP header (a stray newline?)".into(),
    })?;
    value.set_sensitive(true);
    Ok(Arc::new(StaticAuth { value }))
}
