//! What the tests do with a real FHIR server they started (Helios, HAPI), whoever it is: wait until it
//! answers, write with a transaction of PUTs, delete, and ask which ids it holds — independently of
//! fhirsync.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};

/// Waits until `url` answers 2xx, or panics after `limit` with what `log` says. Servers open their port
/// only when ready, or answer it only then: there is no event to await.
pub async fn wait_until_answers(http: &reqwest::Client, url: &str, limit: Duration, log: impl Fn() -> String) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Ok(r) = http.get(url).send().await
            && r.status().is_success()
        {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{url} did not answer in {limit:?}: {}", log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Creates or updates resources in one transaction of PUTs.
pub async fn put(http: &reqwest::Client, base: &str, resources: &[Value]) {
    let entries: Vec<Value> = resources
        .iter()
        .map(|r| {
            let url = format!("{}/{}", r["resourceType"].as_str().unwrap(), r["id"].as_str().unwrap());
            json!({"resource": r, "request": {"method": "PUT", "url": url}})
        })
        .collect();
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": entries});
    let r =
        http.post(base).header("content-type", "application/fhir+json").body(bundle.to_string()).send().await.unwrap();
    assert!(r.status().is_success(), "transaction: {} {}", r.status(), r.text().await.unwrap_or_default());
}

/// Deletes one resource.
pub async fn delete(http: &reqwest::Client, base: &str, t: &str, id: &str) {
    let r = http.delete(format!("{base}/{t}/{id}")).send().await.unwrap();
    assert!(r.status().is_success(), "DELETE {t}/{id}: {}", r.status());
}

/// The ids of `t` the server holds now: a search of `count` per page past any cache (HAPI answers a
/// repeated search from a 60 s cache otherwise), following next links.
pub async fn ids(http: &reqwest::Client, base: &str, t: &str, count: usize) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut url = Some(format!("{base}/{t}?_count={count}&_elements=id"));
    while let Some(u) = url.take() {
        let b: Value = http.get(&u).header("cache-control", "no-cache").send().await.unwrap().json().await.unwrap();
        for e in b["entry"].as_array().into_iter().flatten() {
            out.insert(e["resource"]["id"].as_str().unwrap().to_string());
        }
        url = b["link"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|l| l["relation"] == "next")
            .and_then(|l| l["url"].as_str())
            .map(str::to_string);
    }
    out
}
