//! A new user's first ten minutes: the README's quickstart file works as given (its URLs pointed at
//! local doubles, so it cannot rot), and `fhirsync check` finds each common fault in seconds.

mod support;

use std::time::{Duration, Instant};

use support::cli::{Cli, data, s};
use support::pathling::{FakePathling, PathlingConfig};
use support::source::FakeSource;

const QUICKSTART: &str = include_str!("../examples/quickstart.yaml");

fn stdout(o: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[tokio::test]
async fn the_quickstart_file_works_as_given() {
    let dir = tempfile::tempdir().unwrap();
    let staging = dir.path().join("staging");
    let source = FakeSource::start(data()).await;
    let pathling = FakePathling::start(PathlingConfig {
        roots: vec![("file:///usr/share/staging".into(), staging.clone())],
        ..Default::default()
    })
    .await;
    // the doubles stand exactly where the file points
    let mut text = QUICKSTART.to_string();
    for (from, to) in [
        ("https://bulk-data.smarthealthit.org/fhir", source.base.clone()),
        ("http://localhost:8080/fhir", pathling.base.clone()),
        ("/tmp/fhirsync-quickstart/staging", staging.display().to_string()),
    ] {
        assert!(text.contains(from), "the quickstart no longer names {from}: update this test with the README");
        text = text.replace(from, &to);
    }
    let file = dir.path().join("quickstart.yaml");
    std::fs::write(&file, text).unwrap();
    let c = Cli { source, pathling, dir };
    let out = c.run(vec!["check".into(), "-f".into(), s(&file)]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert!(!stdout(&out).contains('✗'), "{}", stdout(&out));
    let state = c.dir.path().join("state.json");
    let out = c.run(vec!["sync-once".into(), "-f".into(), s(&file), "--state".into(), s(&state)]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert_eq!(c.pathling.counts().get("Observation"), Some(&300));
    // the file asks for Patient, Condition and Observation
    assert_eq!(c.source.log().kickoffs[0].param("_type").as_deref(), Some("Patient,Condition,Observation"));
}

#[tokio::test]
async fn check_finds_each_common_fault_in_seconds() {
    let c = Cli::new(data()).await;
    let origin = c.pathling.base.trim_end_matches("/fhir").to_string();
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        drop(l);
        format!("http://127.0.0.1:{p}/fhir")
    };
    let cases: Vec<(&str, String, &str, &str)> = vec![
        ("a wrong Pathling port", c.pathling.base.clone(), "", "nothing listens there"),
        ("a wrong Pathling path", format!("{origin}/wrong"), "", "an HTML page titled \"404 Not Found\""),
        (
            "a missing Secret",
            c.pathling.base.clone(),
            ", auth: {bearerToken: {tokenRef: {name: src, key: token}}}",
            "no --secrets-dir given",
        ),
    ];
    for (what, target, source_auth, want) in cases {
        let f = c.write_sync(source_auth, "");
        let text = std::fs::read_to_string(&f).unwrap();
        let target = if what == "a wrong Pathling port" { closed.clone() } else { target };
        std::fs::write(&f, text.replace(&c.pathling.base, &target)).unwrap();
        let t = Instant::now();
        let out = c.run(vec!["check".into(), "-f".into(), s(&f)]).await;
        assert_eq!(out.status.code(), Some(1), "{what}: {}", stdout(&out));
        assert!(stdout(&out).contains(want), "{what}: {}", stdout(&out));
        assert!(t.elapsed() < Duration::from_secs(5), "{what}: took {:?}", t.elapsed());
    }
    // a missing Secret names the file looked for
    let f = c.write_sync(", auth: {bearerToken: {tokenRef: {name: src, key: token}}}", "");
    let secrets = c.dir.path().join("secrets");
    std::fs::create_dir_all(secrets.join("src")).unwrap();
    let out = c.run(vec!["check".into(), "-f".into(), s(&f), "--secrets-dir".into(), s(&secrets)]).await;
    assert!(stdout(&out).contains(&s(&secrets.join("src").join("token"))), "{}", stdout(&out));
    // what the API server refuses is refused before anything is contacted, in its words
    for (extra, want) in [
        ("  exprot: {types: [Patient]}\n", "unknown field \"spec.exprot\""),
        (
            "  staging: {volume: {path: relative/dir, pathlingPath: \"file:///staging\"}}\n",
            "spec.staging.volume.path: Invalid value: \"relative/dir\": staging.volume.path must be an absolute path",
        ),
    ] {
        let text = std::fs::read_to_string(c.write_sync("", "")).unwrap();
        let text = if extra.contains("staging") {
            text.lines().filter(|l| !l.trim_start().starts_with("staging:")).collect::<Vec<_>>().join("\n")
                + "\n"
                + extra
        } else {
            text + extra
        };
        let f = c.dir.path().join("bad.yaml");
        std::fs::write(&f, text).unwrap();
        for cmd in ["check", "sync-once"] {
            let out = c.run(vec![cmd.into(), "-f".into(), s(&f)]).await;
            assert_eq!(out.status.code(), Some(2), "{cmd}: {}", stdout(&out));
            assert!(stdout(&out).contains(want), "{cmd}: {}", stdout(&out));
        }
    }
    assert!(c.source.log().kickoffs.is_empty());
}
