//! OperationOutcome: reading the diagnostics servers put in error bodies.

use serde::Deserialize;

/// The parts of an OperationOutcome fhirsync reads.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct OperationOutcome {
    #[serde(default)]
    pub issue: Vec<Issue>,
}

/// One issue of an OperationOutcome.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct Issue {
    #[serde(default)]
    pub severity: String,
    #[serde(default)]
    pub code: String,
    #[serde(default)]
    pub diagnostics: Option<String>,
    #[serde(default)]
    pub details: Option<Details>,
}

/// `issue.details`.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct Details {
    #[serde(default)]
    pub text: Option<String>,
}

impl OperationOutcome {
    /// Parses a body that may or may not be an OperationOutcome.
    pub fn parse(body: &[u8]) -> Option<Self> {
        let v: serde_json::Value = serde_json::from_slice(body).ok()?;
        if v.get("resourceType")?.as_str()? != "OperationOutcome" {
            return None;
        }
        serde_json::from_value(v).ok()
    }

    /// True when an issue says the failure is transient (`code: transient` or one of its children).
    pub fn is_transient(&self) -> bool {
        self.issue.iter().any(|i| {
            matches!(i.code.as_str(), "transient" | "lock-error" | "no-store" | "timeout" | "incomplete" | "throttled")
        })
    }

    /// A one-line summary of the error and fatal issues (or all issues when none is an error).
    pub fn summary(&self) -> String {
        let pick: Vec<&Issue> = {
            let bad: Vec<&Issue> =
                self.issue.iter().filter(|i| matches!(i.severity.as_str(), "error" | "fatal")).collect();
            if bad.is_empty() { self.issue.iter().collect() } else { bad }
        };
        let parts: Vec<String> = pick
            .iter()
            .map(|i| {
                let text = i
                    .diagnostics
                    .clone()
                    .or_else(|| i.details.as_ref().and_then(|d| d.text.clone()))
                    .unwrap_or_default();
                if text.is_empty() { i.code.clone() } else { format!("{}: {}", i.code, text) }
            })
            .collect();
        parts.join("; ")
    }
}

/// Describes an error body for a person: the OperationOutcome summary, else a short text excerpt.
pub fn describe_body(body: &[u8]) -> String {
    if let Some(oo) = OperationOutcome::parse(body) {
        return oo.summary();
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    let mut s: String = text.chars().take(300).collect();
    if text.chars().count() > 300 {
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_and_summary() {
        let body = br#"{"resourceType":"OperationOutcome","issue":[
            {"severity":"information","code":"informational","diagnostics":"fine"},
            {"severity":"error","code":"transient","diagnostics":"database busy"}]}"#;
        let oo = OperationOutcome::parse(body).unwrap();
        assert!(oo.is_transient());
        assert_eq!(oo.summary(), "transient: database busy");
        assert_eq!(describe_body(b"plain failure"), "plain failure");
        assert!(OperationOutcome::parse(br#"{"resourceType":"Patient"}"#).is_none());
    }
}
