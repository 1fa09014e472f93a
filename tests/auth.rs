//! Authentication and TLS toward FHIR servers: static tokens, OAuth2 client credentials, SMART
//! Backend Services (RS384/ES384, PEM and JWK keys), token renewal, same-origin credential policy,
//! custom CAs, mutual TLS, and Secrets read through the Kubernetes API.

mod support;

use std::time::Duration;

use fhirsync::api::Phase;
use fhirsync::run::Reason;
use support::engine::{Env, run_once};
use support::pathling::PathlingConfig;
use support::smart::FakeAuth;
use support::source::{FakeSource, SourceConfig, resources};
use support::tls::fixture;

fn data(n_files: usize) -> SourceConfig {
    SourceConfig {
        files: (0..n_files)
            .map(|k| ("Observation".to_string(), resources("Observation", &format!("o{k}-"), 50)))
            .collect(),
        ..Default::default()
    }
}

fn smart_auth(token_url: Option<&str>, key_id: &str) -> String {
    let tu = token_url.map(|u| format!(", tokenUrl: \"{u}\"")).unwrap_or_default();
    format!(
        ", auth: {{smartBackendServices: {{clientId: fhirsync, keyId: {key_id}, privateKeyRef: {{name: smart, key: key}}{tu}}}}}"
    )
}

async fn smart_env(ttl: Duration, cfg: SourceConfig, key_file: &str, key_id: &str, discover: bool) -> (Env, FakeAuth) {
    let auth = FakeAuth::start(ttl).await;
    auth.register_keys("fhirsync");
    let cfg =
        SourceConfig { token_check: Some(auth.checker()), smart_token_endpoint: Some(auth.token_url.clone()), ..cfg };
    let mut env = Env::new(cfg).await;
    env.secret("smart", "key", &std::fs::read_to_string(fixture(key_file)).unwrap());
    env.source_auth = smart_auth(if discover { None } else { Some(&auth.token_url) }, key_id);
    (env, auth)
}

#[tokio::test]
async fn smart_backend_services_export_outlives_several_tokens() {
    // tokens live 2 s; the export polls for ~5.5 s (0.1, 0.2, 0.4, 0.8 s, then Retry-After's 1 s)
    // and downloads 8 files, 3 at a time
    let cfg = SourceConfig { polls_before_done: 8, poll_retry_after: Some("1".into()), ..data(8) };
    let (env, auth) = smart_env(Duration::from_secs(2), cfg, "rsa-pkcs8.pem", "rsa-1", true).await;
    let mut st = fhirsync::api::BulkExportRunStatus::default();
    // real time here: token lifetimes must really pass
    let mut saved = support::engine::Saved::default();
    let (tx, _rx) = tokio::sync::watch::channel(Default::default());
    let deps = fhirsync::run::Deps { backoff_scale: 1.0, ..env.deps() };
    tokio::time::timeout(
        Duration::from_secs(60),
        fhirsync::run::drive(
            &env.inputs("r1", None),
            &deps,
            &mut st,
            &mut saved,
            &tx,
            &tokio_util::sync::CancellationToken::new(),
        ),
    )
    .await
    .unwrap()
    .unwrap();
    let st: fhirsync::api::BulkExportRunStatus = st;
    assert_eq!(st.phase, Phase::Succeeded, "{:?}", st.message);
    assert_eq!(st.resources.get("Observation"), Some(&400));
    let log = auth.log();
    assert!(log.issued >= 3, "tokens were renewed across the export: {log:?}");
    assert!(log.refused.is_empty(), "{:?}", log.refused);
    assert!(log.assertions >= 3);
    assert_eq!(env.source.log().unauthorized, 0, "renewed before expiry, never sent stale");
}

#[tokio::test]
async fn every_key_format_signs_a_valid_assertion() {
    for (file, kid) in [
        ("rsa-pkcs8.pem", "rsa-1"),
        ("rsa-pkcs1.pem", "rsa-1"),
        ("rsa.jwk.json", "rsa-1"),
        ("ec-sec1.pem", "ec-1"),
        ("ec-pkcs8.pem", "ec-1"),
        ("ec.jwk.json", "ec-1"),
    ] {
        let (env, auth) = smart_env(Duration::from_secs(60), data(2), file, kid, false).await;
        let st = run_once(&env).await;
        assert_eq!(st.phase, Phase::Succeeded, "{file}: {:?} {:?}", st.message, auth.log().refused);
        assert_eq!(auth.log().issued, 1, "{file}: one token serves the whole run");
    }
}

#[tokio::test]
async fn client_secret_by_form_and_by_basic() {
    for method in ["form", "basic"] {
        let auth = FakeAuth::start(Duration::from_secs(60)).await;
        auth.register_secret("fhirsync", "s3cr:et&=x");
        let cfg = SourceConfig { token_check: Some(auth.checker()), ..data(2) };
        let mut env = Env::new(cfg).await;
        env.secret("cc", "secret", "s3cr:et&=x\n");
        env.source_auth = format!(
            ", auth: {{clientCredentials: {{clientId: fhirsync, clientSecretRef: {{name: cc, key: secret}}, \
             tokenUrl: \"{}\", clientAuthMethod: {method}}}}}",
            auth.token_url
        );
        let st = run_once(&env).await;
        assert_eq!(st.phase, Phase::Succeeded, "{method}: {:?} {:?}", st.message, auth.log().refused);
        assert_eq!(auth.log().basic, u32::from(method == "basic"));
    }
}

#[tokio::test]
async fn a_401_renews_the_token_once_and_retries() {
    let cfg = SourceConfig { polls_before_done: 3, ..data(2) };
    let (env, auth) = smart_env(Duration::from_secs(600), cfg, "ec-pkcs8.pem", "ec-1", false).await;
    let a2 = auth.clone();
    let src = env.source.clone();
    tokio::spawn(async move {
        src.wait_for(|l| l.polls >= 1).await;
        a2.revoke_all(); // the server forgets its tokens mid-export
    });
    let st = run_once(&env).await;
    assert_eq!(st.phase, Phase::Succeeded, "{:?}", st.message);
    assert_eq!(auth.log().issued, 2);
    assert_eq!(env.source.log().unauthorized, 1, "one 401, then a fresh token");
}

async fn auth_failure(env: &Env) -> String {
    let st = run_once(env).await;
    assert_eq!(st.phase, Phase::Failed);
    assert_eq!(st.reason.as_deref(), Some("AuthFailed"), "{:?}", st.message);
    let m = st.message.unwrap();
    assert!(!m.contains("eyJ"), "no assertion or token in messages: {m}");
    assert!(!m.contains("PRIVATE KEY"), "{m}");
    m
}

#[tokio::test]
async fn auth_failures_say_what_to_fix() {
    // wrong key: signed with a key the server does not know under that kid
    let (env, _a) = smart_env(Duration::from_secs(60), data(1), "other-rsa.pem", "rsa-1", false).await;
    let m = auth_failure(&env).await;
    assert!(m.contains("invalid_client") && m.contains("signature does not verify") && m.contains("keyId"), "{m}");

    // wrong aud: the configured token URL is not the one the server expects as aud
    let (mut env, auth) = smart_env(Duration::from_secs(60), data(1), "rsa-pkcs8.pem", "rsa-1", false).await;
    let alias = auth.token_url.replace("127.0.0.1", "localhost");
    env.source_auth = smart_auth(Some(&alias), "rsa-1");
    let m = auth_failure(&env).await;
    assert!(m.contains("aud is not this token endpoint"), "{m}");

    // unknown client
    let (mut env, auth) = smart_env(Duration::from_secs(60), data(1), "rsa-pkcs8.pem", "rsa-1", false).await;
    env.source_auth = smart_auth(Some(&auth.token_url), "rsa-1").replace("clientId: fhirsync", "clientId: stranger");
    let m = auth_failure(&env).await;
    assert!(m.contains("unknown client") && m.contains("clientId"), "{m}");

    // missing Secret, missing key: caught before any request, naming Secret and key
    let (mut env, _a) = smart_env(Duration::from_secs(60), data(1), "rsa-pkcs8.pem", "rsa-1", false).await;
    env.source_auth = env.source_auth.replace("name: smart", "name: absent");
    let f = env.engine("r1", None).await.err().unwrap();
    assert_eq!(f.reason, Reason::AuthFailed);
    assert!(f.message.contains("Secret ns1/absent not found"), "{}", f.message);
    env.source_auth = env.source_auth.replace("name: absent", "name: smart").replace("key: key", "key: tls.key");
    let f = env.engine("r1", None).await.err().unwrap();
    assert!(f.message.contains("Secret ns1/smart has no key \"tls.key\""), "{}", f.message);

    // a key that is not a key, and a P-256 key (SMART needs ES384)
    let (env, _a) = smart_env(Duration::from_secs(60), data(1), "ca.pem", "rsa-1", false).await;
    let f = env.engine("r1", None).await.err().unwrap();
    assert!(f.message.contains("not a private key") && f.message.contains("privateKeyRef"), "{}", f.message);
    let (env, _a) = smart_env(Duration::from_secs(60), data(1), "ec-p256.pem", "ec-1", false).await;
    let f = env.engine("r1", None).await.err().unwrap();
    assert!(f.message.contains("P-384"), "{}", f.message);

    // no token endpoint to discover
    let (mut env, _a) = smart_env(Duration::from_secs(60), data(1), "rsa-pkcs8.pem", "rsa-1", true).await;
    env.source.configure(|c| c.smart_token_endpoint = None);
    env.source_auth = smart_auth(None, "rsa-1");
    let m = auth_failure(&env).await;
    assert!(m.contains("discovery") && m.contains("tokenUrl"), "{m}");
}

#[tokio::test]
async fn tokens_never_reach_other_origins() {
    // file URLs on another origin (blob storage): no token, even with requiresAccessToken true
    let blob = FakeSource::start(SourceConfig { requires_token: false, ..data(3) }).await;
    let origin = blob.base.trim_end_matches("/fhir").to_string();
    let cfg = SourceConfig { bearer: Some("tok".into()), file_base: Some(origin.clone()), ..data(3) };
    let mut env = Env::new(cfg).await;
    env.secret("src", "token", "tok");
    env.source_auth = support::engine::AUTH.into();
    let st = run_once(&env).await;
    assert_eq!(st.phase, Phase::Succeeded, "{:?}", st.message);
    let seen = blob.log().auth_headers;
    assert_eq!(seen.len(), 3);
    assert!(seen.iter().all(|(_, auth)| !auth), "another origin received a token: {seen:?}");

    // a redirect to another origin (Cerner's 307 to a file host) drops the Authorization header
    let blob = FakeSource::start(SourceConfig { requires_token: false, ..data(2) }).await;
    let cfg = SourceConfig {
        bearer: Some("tok".into()),
        redirect_files_to: Some(blob.base.trim_end_matches("/fhir").to_string()),
        ..data(2)
    };
    let mut env = Env::new(cfg).await;
    env.secret("src", "token", "tok");
    env.source_auth = support::engine::AUTH.into();
    let st = run_once(&env).await;
    assert_eq!(st.phase, Phase::Succeeded, "{:?}", st.message);
    assert!(env.source.log().auth_headers.iter().all(|(_, a)| *a), "the source's own origin gets the token");
    let seen = blob.log().auth_headers;
    assert_eq!(seen.len(), 2);
    assert!(seen.iter().all(|(_, auth)| !auth), "the redirect target received a token: {seen:?}");
}

#[tokio::test]
async fn custom_ca_mutual_tls_and_insecure_skip_verify() {
    let ca = std::fs::read_to_string(fixture("ca.pem")).unwrap();
    // a server with a private CA: refused without caRef …
    let src = FakeSource::start_tls(data(2), false).await;
    let mut env = Env::new(data(2)).await;
    env.source = src;
    let st = run_once(&env).await;
    assert_eq!(st.phase, Phase::Failed);
    assert_eq!(st.reason.as_deref(), Some("SourceUnreachable"));
    assert!(st.message.as_deref().unwrap().to_lowercase().contains("certificate"), "{:?}", st.message);
    // … trusted with it
    env.secret("ca", "ca.crt", &ca);
    env.source_auth = ", tls: {caRef: {name: ca, key: ca.crt}}".into();
    let st = run_once(&env).await;
    assert_eq!(st.phase, Phase::Succeeded, "{:?}", st.message);
    // insecureSkipVerify works, and is reported
    env.source_auth = ", tls: {insecureSkipVerify: true}".into();
    let engine = env.engine("r2", None).await.unwrap();
    assert!(engine.setup.insecure_tls);

    // mutual TLS: refused without a client certificate, accepted with one
    let src = FakeSource::start_tls(data(2), true).await;
    let mut env = Env::with(data(2), PathlingConfig::default()).await;
    env.source = src;
    env.secret("ca", "ca.crt", &ca);
    env.secret("mtls", "tls.crt", &std::fs::read_to_string(fixture("client.pem")).unwrap());
    env.secret("mtls", "tls.key", &std::fs::read_to_string(fixture("client.key")).unwrap());
    env.source_auth = ", tls: {caRef: {name: ca, key: ca.crt}}".into();
    let st = run_once(&env).await;
    assert_eq!(st.phase, Phase::Failed);
    env.source_auth = ", tls: {caRef: {name: ca, key: ca.crt}, clientCertRef: {name: mtls, key: tls.crt}, clientKeyRef: {name: mtls, key: tls.key}}".into();
    let st = run_once(&env).await;
    assert_eq!(st.phase, Phase::Succeeded, "{:?}", st.message);
}

/// A stand-in for the Kubernetes API's Secrets endpoint (the test API server serves no core group).
async fn fake_secrets_api(
    secrets: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, serde_json::Value>>>,
) -> kube::Client {
    use axum::extract::{Path, State};
    use axum::response::IntoResponse;
    type Store = std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, serde_json::Value>>>;
    async fn get(State(s): State<Store>, Path((ns, name)): Path<(String, String)>) -> axum::response::Response {
        match s.lock().unwrap().get(&format!("{ns}/{name}")) {
            Some(v) => axum::Json(v.clone()).into_response(),
            None => (
                axum::http::StatusCode::NOT_FOUND,
                axum::Json(serde_json::json!({"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404,
                    "message": format!("secrets \"{name}\" not found")})),
            )
                .into_response(),
        }
    }
    let app = axum::Router::new()
        .route("/api/v1/namespaces/{ns}/secrets/{name}", axum::routing::get(get))
        .with_state(secrets);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.ok() });
    kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap()
}

fn secret(name: &str, data: &[(&str, &str)]) -> serde_json::Value {
    use base64::Engine;
    let d: serde_json::Map<String, serde_json::Value> = data
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::json!(base64::engine::general_purpose::STANDARD.encode(v))))
        .collect();
    serde_json::json!({"apiVersion":"v1","kind":"Secret","metadata":{"name":name,"namespace":"ns1"},"data":d})
}

#[tokio::test]
async fn kubernetes_secrets_are_read_by_reference_and_rotation_takes_effect() {
    use fhirsync::api::SecretKeyRef;
    use fhirsync::secrets::{KubeSecrets, SecretError, SecretSource};
    let store = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
    store.lock().unwrap().insert("ns1/src".to_string(), secret("src", &[("token", "first")]));
    let ks = KubeSecrets::new(fake_secrets_api(store.clone()).await);
    let r = |n: &str, k: &str| SecretKeyRef { name: n.into(), key: k.into() };
    assert_eq!(ks.get("ns1", &r("src", "token")).await.unwrap(), b"first");
    assert!(matches!(ks.get("ns1", &r("src", "nope")).await, Err(SecretError::KeyMissing { .. })));
    let e = ks.get("ns1", &r("gone", "token")).await.unwrap_err();
    assert_eq!(e.to_string(), "Secret ns1/gone not found: create it, or fix the reference");
    // the secret of another namespace is not visible from ns2
    assert!(matches!(ks.get("ns2", &r("src", "token")).await, Err(SecretError::SecretMissing { .. })));

    // a run reads the token through the API; a rotated Secret is used by the next run, no restart
    let cfg = SourceConfig { bearer: Some("second".into()), ..data(1) };
    let mut env = Env::new(cfg).await;
    env.source_auth = support::engine::AUTH.into();
    let ks: std::sync::Arc<dyn SecretSource> = std::sync::Arc::new(ks);
    let deps = fhirsync::run::Deps { secrets: ks.clone(), ..env.deps() };
    let mut st = fhirsync::api::BulkExportRunStatus::default();
    support::engine::drive_with(&env.inputs("r1", None), &deps, &mut st).await;
    assert_eq!(st.reason.as_deref(), Some("AuthFailed"), "the old token is refused");
    store.lock().unwrap().insert("ns1/src".to_string(), secret("src", &[("token", "second")]));
    let mut st = fhirsync::api::BulkExportRunStatus::default();
    support::engine::drive_with(&env.inputs("r2", None), &deps, &mut st).await;
    assert_eq!(st.phase, Phase::Succeeded, "{:?}", st.message);
}
