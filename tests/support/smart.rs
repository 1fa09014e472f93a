//! A SMART Backend Services / OAuth2 authorization server written for the tests. It verifies client
//! assertions with the registered public keys (RS384 and ES384), `aud` (exactly the token URL), `exp`
//! (at most five minutes ahead) and `jti` replay; it also accepts client secrets (form or Basic), and
//! issues short-lived tokens that the test FHIR source checks.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::json;

use super::source::TokenCheck;
use super::tls::fixture;

/// A registered client.
#[derive(Clone)]
pub enum Registered {
    /// Public keys by kid.
    Keys(Vec<(String, Algorithm, String)>),
    /// A client secret.
    Secret(String),
}

/// What the server saw.
#[derive(Clone, Debug, Default)]
pub struct AuthLog {
    pub issued: u32,
    pub refused: Vec<String>,
    /// Raw form bodies are never kept; only whether an assertion was present.
    pub assertions: u32,
    pub basic: u32,
}

struct Inner {
    clients: HashMap<String, Registered>,
    ttl: Duration,
    tokens: HashMap<String, Instant>,
    jtis: HashSet<String>,
    log: AuthLog,
    next: u32,
}

/// A running authorization server.
#[derive(Clone)]
pub struct FakeAuth {
    inner: Arc<Mutex<Inner>>,
    pub token_url: String,
}

fn refuse(i: &mut Inner, error: &str, desc: &str) -> Response {
    i.log.refused.push(format!("{error}: {desc}"));
    (
        StatusCode::UNAUTHORIZED,
        [(header::CONTENT_TYPE, "application/json")],
        json!({"error": error, "error_description": desc}).to_string(),
    )
        .into_response()
}

impl FakeAuth {
    /// Starts the server; tokens live `ttl`.
    pub async fn start(ttl: Duration) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let me = Self {
            inner: Arc::new(Mutex::new(Inner {
                clients: HashMap::new(),
                ttl,
                tokens: HashMap::new(),
                jtis: HashSet::new(),
                log: AuthLog::default(),
                next: 0,
            })),
            token_url: format!("http://{addr}/auth/token"),
        };
        let app = Router::new().route("/auth/token", post(token)).with_state(me.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.ok() });
        me
    }

    /// Registers the fixture public keys (`rsa-1` RS384, `ec-1` ES384) for a client.
    pub fn register_keys(&self, client_id: &str) {
        let keys = vec![
            ("rsa-1".into(), Algorithm::RS384, std::fs::read_to_string(fixture("rsa.pub.pem")).unwrap()),
            ("ec-1".into(), Algorithm::ES384, std::fs::read_to_string(fixture("ec.pub.pem")).unwrap()),
        ];
        self.inner.lock().unwrap().clients.insert(client_id.into(), Registered::Keys(keys));
    }

    /// Registers a client secret.
    pub fn register_secret(&self, client_id: &str, secret: &str) {
        self.inner.lock().unwrap().clients.insert(client_id.into(), Registered::Secret(secret.into()));
    }

    /// Forgets every issued token (a 401 follows on their next use).
    pub fn revoke_all(&self) {
        self.inner.lock().unwrap().tokens.clear();
    }

    pub fn log(&self) -> AuthLog {
        self.inner.lock().unwrap().log.clone()
    }

    /// A check for the FHIR source: the token was issued here and has not expired.
    pub fn checker(&self) -> TokenCheck {
        let inner = self.inner.clone();
        TokenCheck(Arc::new(move |t: &str| {
            inner.lock().unwrap().tokens.get(t).is_some_and(|exp| Instant::now() < *exp)
        }))
    }
}

async fn token(State(s): State<FakeAuth>, headers: HeaderMap, body: Bytes) -> Response {
    let form: HashMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
    let mut guard = s.inner.lock().unwrap();
    let i = &mut *guard;
    if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return refuse(i, "unsupported_grant_type", "only client_credentials");
    }
    let basic = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Basic "));
    let client_id = if let Some(assertion) = form.get("client_assertion") {
        i.log.assertions += 1;
        if form.get("client_assertion_type").map(String::as_str)
            != Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
        {
            return refuse(i, "invalid_request", "wrong client_assertion_type");
        }
        let Ok(h) = jsonwebtoken::decode_header(assertion) else {
            return refuse(i, "invalid_client", "malformed assertion");
        };
        if h.typ.as_deref() != Some("JWT") {
            return refuse(i, "invalid_client", "typ must be JWT");
        }
        // iss, unverified, to find the client's keys
        let claims: serde_json::Value = assertion
            .split('.')
            .nth(1)
            .and_then(|p| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(p).ok())
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let iss = claims["iss"].as_str().unwrap_or_default().to_string();
        let Some(Registered::Keys(keys)) = i.clients.get(&iss).cloned() else {
            return refuse(i, "invalid_client", "unknown client");
        };
        let Some((_, alg, pem)) = keys.iter().find(|(kid, _, _)| Some(kid) == h.kid.as_ref()) else {
            return refuse(i, "invalid_client", "unknown kid");
        };
        if *alg != h.alg {
            return refuse(i, "invalid_client", "alg does not match the registered key");
        }
        let key = match alg {
            Algorithm::RS384 => DecodingKey::from_rsa_pem(pem.as_bytes()).unwrap(),
            _ => DecodingKey::from_ec_pem(pem.as_bytes()).unwrap(),
        };
        let mut v = Validation::new(*alg);
        v.set_audience(&[s.token_url.as_str()]);
        v.set_issuer(&[iss.as_str()]);
        v.leeway = 0;
        v.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
        let data = match jsonwebtoken::decode::<serde_json::Value>(assertion, &key, &v) {
            Ok(d) => d,
            Err(e) => {
                let why = match e.kind() {
                    jsonwebtoken::errors::ErrorKind::InvalidAudience => "aud is not this token endpoint".to_string(),
                    jsonwebtoken::errors::ErrorKind::InvalidSignature => "signature does not verify".to_string(),
                    other => format!("{other:?}"),
                };
                return refuse(i, "invalid_client", &why);
            }
        };
        let c = data.claims;
        if c["sub"] != c["iss"] {
            return refuse(i, "invalid_client", "sub must equal iss");
        }
        let exp = c["exp"].as_i64().unwrap_or(0);
        if exp > jiff::Timestamp::now().as_second() + 300 {
            return refuse(i, "invalid_client", "exp more than five minutes ahead");
        }
        let jti = c["jti"].as_str().unwrap_or_default().to_string();
        if jti.is_empty() || !i.jtis.insert(jti) {
            return refuse(i, "invalid_client", "jti replayed");
        }
        iss
    } else {
        let (id, secret) = if let Some(b) = basic {
            i.log.basic += 1;
            let raw = String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b).unwrap_or_default())
                .unwrap_or_default();
            let (a, b) = raw.split_once(':').unwrap_or_default();
            let dec = |x: &str| {
                url::form_urlencoded::parse(format!("x={x}").as_bytes())
                    .next()
                    .map(|(_, v)| v.to_string())
                    .unwrap_or_default()
            };
            (dec(a), dec(b))
        } else {
            (form.get("client_id").cloned().unwrap_or_default(), form.get("client_secret").cloned().unwrap_or_default())
        };
        match i.clients.get(&id) {
            Some(Registered::Secret(want)) if *want == secret => id,
            Some(_) => return refuse(i, "invalid_client", "wrong client secret"),
            None => return refuse(i, "invalid_client", "unknown client"),
        }
    };
    i.next += 1;
    let tok = format!("tok-{client_id}-{}-{}", i.next, uuid::Uuid::new_v4().simple());
    i.tokens.insert(tok.clone(), Instant::now() + i.ttl);
    i.log.issued += 1;
    let body = json!({"access_token": tok, "token_type": "bearer", "expires_in": i.ttl.as_secs_f64(), "scope": form.get("scope")});
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}
