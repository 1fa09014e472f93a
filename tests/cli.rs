//! `fhirsync sync-once` end to end: the real binary against the in-process doubles.

mod support;

use std::process::{Command, Stdio};

use support::cli::{Cli, data, s};
use support::source::SourceConfig;

#[tokio::test]
async fn sync_once_imports_prints_a_summary_and_goes_incremental_with_state() {
    let c = Cli::new(data()).await;
    let f = c.write_sync("", "");
    let args =
        vec!["sync-once".into(), "-f".into(), s(&f), "--state".into(), s(&c.state()), "--output".into(), "json".into()];
    let out = c.run(args.clone()).await;
    assert_eq!(out.status.code(), Some(0), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON summary");
    assert_eq!(summary["phase"], "Succeeded");
    assert_eq!(summary["totalResources"], 324);
    assert_eq!(summary["resources"]["Observation"], 300);
    assert!(summary["since"].is_null());
    let watermark = summary["watermark"].as_str().expect("watermark").to_string();
    assert_eq!(c.pathling.counts().get("Observation"), Some(&300));
    // progress went to stderr as plain lines (no terminal)
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Transferring") || err.contains("Importing"), "{err}");

    // the second invocation is incremental
    let out = c.run(args).await;
    assert_eq!(out.status.code(), Some(0));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["since"].as_str(), Some(watermark.as_str()));
    assert_eq!(c.source.log().kickoffs[1].param("_since").as_deref(), Some(watermark.as_str()));
}

#[tokio::test]
async fn sync_once_resumes_an_interrupted_run_from_the_state_file() {
    let c = Cli::new(SourceConfig { polls_before_done: 1_000_000, ..data() }).await;
    let f = c.write_sync("", "");
    let args = vec!["sync-once".to_string(), "-f".into(), s(&f), "--state".into(), s(&c.state())];
    let mut child = Command::new(env!("CARGO_BIN_EXE_fhirsync"))
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    c.source.wait_for(|l| l.polls >= 2).await;
    child.kill().unwrap(); // cron job killed mid-poll
    child.wait().unwrap();
    let state: serde_json::Value = serde_json::from_slice(&std::fs::read(c.state()).unwrap()).unwrap();
    assert_eq!(state["run"]["status"]["phase"], "Exporting");
    c.source.configure(|cfg| cfg.polls_before_done = 0);
    let out = c.run(args).await;
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("resuming"));
    assert_eq!(c.source.log().accepted, 1, "the same export was resumed");
    assert_eq!(c.pathling.log().imports.len(), 1);
    let state: serde_json::Value = serde_json::from_slice(&std::fs::read(c.state()).unwrap()).unwrap();
    assert!(state["run"].is_null(), "the finished run leaves the state file");
    assert!(state["watermark"].is_string());
}

#[tokio::test]
async fn sync_once_fails_with_a_reason_and_a_non_zero_exit() {
    let c = Cli::new(SourceConfig { bearer: Some("right".into()), ..data() }).await;
    let secrets = c.dir.path().join("secrets");
    std::fs::create_dir_all(secrets.join("src")).unwrap();
    std::fs::write(secrets.join("src").join("token"), "wrong-token-value").unwrap();
    let f = c.write_sync(", auth: {bearerToken: {tokenRef: {name: src, key: token}}}", "");
    let out = c.run(vec!["sync-once".into(), "-f".into(), s(&f), "--secrets-dir".into(), s(&secrets)]).await;
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Failed (AuthFailed)"), "{text}");
    assert!(text.contains("check the auth block"), "{text}");
    let all = format!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(!all.contains("wrong-token-value"), "the secret never appears in output");

    // a missing Secret names the Secret and key
    let out = c
        .run(vec!["sync-once".into(), "-f".into(), s(&f), "--secrets-dir".into(), s(&c.dir.path().join("nowhere"))])
        .await;
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Secret cli/src not found"), "{text}");
}

#[tokio::test]
async fn sync_once_rejects_an_invalid_file_with_exit_2() {
    let c = Cli::new(data()).await;
    let f = c.write_sync("", "  export: {level: Group}\n");
    let out = c.run(vec!["sync-once".into(), "-f".into(), s(&f)]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("spec.export: Invalid value: export.groupId is required when level is Group"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(c.source.log().kickoffs.is_empty());
    let out = c.run(vec!["sync-once".into(), "-f".into(), "/nonexistent.yaml".into()]).await;
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test]
async fn sync_once_runs_smart_backend_services_with_secrets_from_files() {
    use support::smart::FakeAuth;
    let auth = FakeAuth::start(std::time::Duration::from_secs(60)).await;
    auth.register_keys("fhirsync");
    let cfg = SourceConfig {
        token_check: Some(auth.checker()),
        smart_token_endpoint: Some(auth.token_url.clone()),
        ..data()
    };
    let c = Cli::new(cfg).await;
    let secrets = c.dir.path().join("secrets");
    std::fs::create_dir_all(secrets.join("smart")).unwrap();
    std::fs::copy(support::tls::fixture("ec-sec1.pem"), secrets.join("smart").join("key")).unwrap();
    let f = c.write_sync(
        ", auth: {smartBackendServices: {clientId: fhirsync, keyId: ec-1, privateKeyRef: {name: smart, key: key}}}",
        "",
    );
    let out = c.run(vec!["sync-once".into(), "-f".into(), s(&f), "--secrets-dir".into(), s(&secrets)]).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(c.pathling.counts().get("Observation"), Some(&300));

    // the wrong key: exit 1 and the same message the operator puts in its condition
    std::fs::copy(support::tls::fixture("other-rsa.pem"), secrets.join("smart").join("key")).unwrap();
    let f = c.write_sync(
        ", auth: {smartBackendServices: {clientId: fhirsync, keyId: rsa-1, privateKeyRef: {name: smart, key: key}}}",
        "",
    );
    let out = c.run(vec!["sync-once".into(), "-f".into(), s(&f), "--secrets-dir".into(), s(&secrets)]).await;
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Failed (AuthFailed)") && text.contains("invalid_client") && text.contains("keyId"),
        "{text}"
    );
    assert!(!text.contains("eyJ") && !String::from_utf8_lossy(&out.stderr).contains("eyJ"), "no assertion in output");
}

#[tokio::test]
async fn jwks_prints_the_public_key_to_register() {
    let c = Cli::new(data()).await;
    let out = c
        .run(vec![
            "jwks".into(),
            "-f".into(),
            s(&support::tls::fixture("rsa-pkcs1.pem")),
            "--kid".into(),
            "key-1".into(),
        ])
        .await;
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let k = &v["keys"][0];
    assert_eq!(k["kid"], "key-1");
    assert_eq!(k["alg"], "RS384");
    assert!(k.get("d").is_none(), "never the private part");
    let registered: serde_json::Value =
        serde_json::from_slice(&std::fs::read(support::tls::fixture("jwks.json")).unwrap()).unwrap();
    assert_eq!(k["n"], registered["keys"][0]["n"]);
}

#[tokio::test]
async fn standard_proxy_variables_are_honoured() {
    use axum::extract::State;
    use axum::http::Uri;
    // a "proxy" that records what it was asked to fetch and refuses it
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    async fn proxy(
        State(seen): State<std::sync::Arc<std::sync::Mutex<Vec<String>>>>,
        uri: Uri,
    ) -> axum::http::StatusCode {
        seen.lock().unwrap().push(uri.to_string());
        axum::http::StatusCode::FORBIDDEN
    }
    let app = axum::Router::new().fallback(proxy).with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.ok() });

    let c = Cli::new(data()).await;
    let f = c.write_sync("", "");
    let run = |no_proxy: Option<&'static str>| {
        let (f, proxy_url) = (s(&f), proxy_url.clone());
        tokio::task::spawn_blocking(move || {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_fhirsync"));
            cmd.args(["sync-once", "-f", &f]).env("HTTP_PROXY", &proxy_url).env_remove("http_proxy");
            cmd.env_remove("NO_PROXY").env_remove("no_proxy");
            if let Some(n) = no_proxy {
                cmd.env("NO_PROXY", n);
            }
            cmd.output().unwrap()
        })
    };
    let out = run(None).await.unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stdout));
    // the first request (Pathling's preflight) went to the proxy, which refused it
    let host = c.pathling.base.trim_start_matches("http://").split('/').next().unwrap().to_string();
    assert!(
        seen.lock().unwrap().iter().any(|u| u.contains(&host) && u.contains("metadata")),
        "{:?}",
        seen.lock().unwrap()
    );
    assert!(
        c.source.log().kickoffs.is_empty() && c.pathling.log().metadata_reads == 0,
        "everything went through the proxy"
    );
    let out = run(Some("127.0.0.1")).await.unwrap();
    assert_eq!(out.status.code(), Some(0), "NO_PROXY bypasses it: {}", String::from_utf8_lossy(&out.stdout));
}
