//! OAuth2 client credentials, with a client secret or with a SMART Backend Services signed assertion.
//! Tokens are cached per credential and renewed before they expire; a 401 renews once.

use std::fmt;
use std::time::{Duration, Instant};

use base64::Engine;
use futures::future::BoxFuture;
use jsonwebtoken::Header;
use reqwest::header::{ACCEPT, AUTHORIZATION, HeaderValue};
use serde::{Deserialize, Serialize};
use url::Url;

use super::keys::SigningKey;
use super::{AuthError, AuthProvider, SecretString};

/// How the client proves who it is.
#[derive(Clone, Debug)]
pub enum Grant {
    /// A client secret, in the form body (`form`) or as HTTP Basic (`basic`).
    ClientSecret { secret: SecretString, basic: bool },
    /// A JWT client assertion signed with this key (SMART Backend Services).
    Assertion { key: SigningKey, key_id: String },
}

/// A resolved OAuth configuration.
#[derive(Clone, Debug)]
pub struct OAuthConfig {
    pub client_id: String,
    pub grant: Grant,
    /// Token endpoint; `None`: discovered from `{fhir_base}/.well-known/smart-configuration`.
    pub token_url: Option<Url>,
    pub fhir_base: Url,
    pub scope: String,
    /// Where the configuration came from, for messages (e.g. `source.auth.smartBackendServices`).
    pub what: String,
}

struct Cached {
    header: HeaderValue,
    renew_at: Instant,
}

/// Fetches, caches and renews access tokens.
pub struct OAuthProvider {
    cfg: OAuthConfig,
    http: reqwest::Client,
    token_url: tokio::sync::Mutex<Option<Url>>,
    cache: tokio::sync::Mutex<Option<Cached>>,
    invalidated: std::sync::Mutex<bool>,
}

impl fmt::Debug for OAuthProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OAuthProvider({}, client {})", self.cfg.what, self.cfg.client_id)
    }
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    exp: i64,
    iat: i64,
    jti: String,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    expires_in: Option<f64>,
}

#[derive(Deserialize, Default)]
struct OAuthErrorBody {
    #[serde(default)]
    error: String,
    #[serde(default)]
    error_description: Option<String>,
}

/// Longest validity of a client assertion (the spec allows at most five minutes).
pub const ASSERTION_LIFETIME: Duration = Duration::from_secs(240);

impl OAuthProvider {
    /// A provider; no request is made until a token is needed.
    pub fn new(cfg: OAuthConfig, http: reqwest::Client) -> Self {
        Self {
            token_url: tokio::sync::Mutex::new(cfg.token_url.clone()),
            cfg,
            http,
            cache: tokio::sync::Mutex::new(None),
            invalidated: std::sync::Mutex::new(false),
        }
    }

    fn err(&self, url: &Url, message: impl Into<String>) -> AuthError {
        AuthError::TokenEndpoint { url: crate::text::redact(url), message: message.into() }
    }

    async fn token_url(&self) -> Result<Url, AuthError> {
        let mut g = self.token_url.lock().await;
        if let Some(u) = &*g {
            return Ok(u.clone());
        }
        let mut well_known = self.cfg.fhir_base.clone();
        let path = format!("{}/.well-known/smart-configuration", self.cfg.fhir_base.path().trim_end_matches('/'));
        well_known.set_path(&path);
        well_known.set_query(None);
        let hint = format!("; set {}.tokenUrl explicitly", self.cfg.what);
        let resp = self.http.get(well_known.clone()).header(ACCEPT, "application/json").send().await.map_err(|e| {
            self.err(&well_known, format!("token endpoint discovery failed: {}{hint}", e.without_url()))
        })?;
        if !resp.status().is_success() {
            return Err(self.err(&well_known, format!("token endpoint discovery answered {}{hint}", resp.status())));
        }
        let body = crate::net::read_capped(resp, 256 * 1024)
            .await
            .map_err(|e| self.err(&well_known, format!("reading the SMART configuration: {e}{hint}")))?;
        let v: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|_| self.err(&well_known, format!("the SMART configuration is not JSON{hint}")))?;
        let te = v
            .get("token_endpoint")
            .and_then(|t| t.as_str())
            .ok_or_else(|| self.err(&well_known, format!("the SMART configuration has no token_endpoint{hint}")))?;
        let u = well_known.join(te).map_err(|_| self.err(&well_known, format!("invalid token_endpoint{hint}")))?;
        *g = Some(u.clone());
        Ok(u)
    }

    fn assertion(&self, token_url: &Url, key: &SigningKey, key_id: &str) -> Result<String, AuthError> {
        let now = jiff::Timestamp::now().as_second();
        let aud = token_url.as_str();
        let claims = Claims {
            iss: &self.cfg.client_id,
            sub: &self.cfg.client_id,
            aud,
            exp: now + ASSERTION_LIFETIME.as_secs() as i64,
            iat: now,
            jti: uuid::Uuid::new_v4().to_string(),
        };
        let mut header = Header::new(key.alg);
        header.kid = Some(key_id.to_string());
        header.typ = Some("JWT".into());
        jsonwebtoken::encode(&header, &claims, &key.key).map_err(|e| AuthError::Invalid {
            what: format!("{}.privateKeyRef", self.cfg.what),
            why: format!("cannot sign the client assertion: {e}"),
        })
    }

    async fn fetch(&self) -> Result<Cached, AuthError> {
        let url = self.token_url().await?;
        let mut form: Vec<(&str, String)> =
            vec![("grant_type", "client_credentials".into()), ("scope", self.cfg.scope.clone())];
        let mut req = self.http.post(url.clone()).header(ACCEPT, "application/json");
        match &self.cfg.grant {
            Grant::ClientSecret { secret, basic: true } => {
                let enc = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
                let pair = format!("{}:{}", enc(&self.cfg.client_id), enc(secret.expose()));
                let mut v =
                    HeaderValue::from_str(&format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(pair)))
                        .map_err(|_| AuthError::Invalid {
                            what: format!("{}.clientSecretRef", self.cfg.what),
                            why: "the client secret contains characters not allowed in a header".into(),
                        })?;
                v.set_sensitive(true);
                req = req.header(AUTHORIZATION, v);
            }
            Grant::ClientSecret { secret, basic: false } => {
                form.push(("client_id", self.cfg.client_id.clone()));
                form.push(("client_secret", secret.expose().to_string()));
            }
            Grant::Assertion { key, key_id } => {
                form.push(("client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".into()));
                form.push(("client_assertion", self.assertion(&url, key, key_id)?));
            }
        }
        let resp = req
            .form(&form)
            .send()
            .await
            .map_err(|e| self.err(&url, format!("cannot reach the token endpoint: {}", e.without_url())))?;
        let status = resp.status();
        let body = crate::net::read_capped(resp, 64 * 1024)
            .await
            .map_err(|e| self.err(&url, format!("reading the token response: {e}")))?;
        if !status.is_success() {
            let mut e: OAuthErrorBody = serde_json::from_slice(&body).unwrap_or_default();
            e.error = crate::text::peer_text(&e.error, 60);
            let code = if e.error.is_empty() { format!("HTTP {status}") } else { e.error.clone() };
            let desc =
                e.error_description.map(|d| format!(" ({})", crate::text::peer_text(&d, 200))).unwrap_or_default();
            let hint = match e.error.as_str() {
                "invalid_client" => match self.cfg.grant {
                    Grant::Assertion { .. } => format!(
                        ": check {w}.clientId, that {w}.keyId names a key registered for it (its public key in the \
                         server's JWKS), that the Secret holds the matching private key, and that the token URL \
                         is exactly the one the server expects as aud",
                        w = self.cfg.what
                    ),
                    Grant::ClientSecret { .. } => format!(
                        ": check {w}.clientId and the client secret in the Secret, and {w}.clientAuthMethod",
                        w = self.cfg.what
                    ),
                },
                "invalid_scope" => {
                    format!(": the server refused scope {:?}; set {}.scope", self.cfg.scope, self.cfg.what)
                }
                "unauthorized_client" => {
                    ": the client may not use the client_credentials grant; ask the server's administrator".into()
                }
                _ => String::new(),
            };
            return Err(self.err(&url, format!("the token endpoint refused: {code}{desc}{hint}")));
        }
        let t: TokenResponse =
            serde_json::from_slice(&body).map_err(|_| self.err(&url, "the token response has no access_token"))?;
        let mut header = HeaderValue::from_str(&format!("Bearer {}", t.access_token))
            .map_err(|_| self.err(&url, "the access token contains characters not allowed in a header"))?;
        header.set_sensitive(true);
        let life = Duration::from_secs_f64(t.expires_in.unwrap_or(300.0).clamp(1.0, 86400.0));
        // renew early: a fifth of the lifetime before expiry, at most a minute
        let margin = (life / 5).min(Duration::from_secs(60));
        Ok(Cached { header, renew_at: Instant::now() + life - margin })
    }
}

impl AuthProvider for OAuthProvider {
    fn authorization(&self) -> BoxFuture<'_, Result<HeaderValue, AuthError>> {
        Box::pin(async move {
            let mut g = self.cache.lock().await;
            let forced = std::mem::take(&mut *self.invalidated.lock().unwrap_or_else(|p| p.into_inner()));
            if !forced
                && let Some(c) = &*g
                && Instant::now() < c.renew_at
            {
                return Ok(c.header.clone());
            }
            let fresh = self.fetch().await?;
            let h = fresh.header.clone();
            *g = Some(fresh);
            Ok(h)
        })
    }

    fn invalidate(&self) -> bool {
        *self.invalidated.lock().unwrap_or_else(|p| p.into_inner()) = true;
        true
    }
}
