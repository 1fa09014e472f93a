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
                let text = crate::text::peer_text(&text, crate::text::PEER_TEXT_MAX);
                let code = crate::text::peer_text(&i.code, 40);
                if text.is_empty() { code } else { format!("{code}: {text}") }
            })
            .collect();
        crate::text::peer_text(&parts.into_iter().take(5).collect::<Vec<_>>().join("; "), crate::text::PEER_TEXT_MAX)
    }

    /// True when an issue has severity error or fatal.
    pub fn has_errors(&self) -> bool {
        self.issue.iter().any(|i| matches!(i.severity.as_str(), "error" | "fatal"))
    }
}

/// Describes an error body for a person: the OperationOutcome summary, else a short text excerpt (an
/// HTML page by its title). Always bounded and free of control characters.
pub fn describe_body(body: &[u8], content_type: Option<&str>) -> String {
    if let Some(oo) = OperationOutcome::parse(body) {
        return crate::text::peer_text(&oo.summary(), crate::text::PEER_TEXT_MAX);
    }
    crate::text::describe_text_body(body, content_type)
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
        assert_eq!(describe_body(b"plain failure", None), "plain failure");
        assert!(OperationOutcome::parse(br#"{"resourceType":"Patient"}"#).is_none());
    }
}
