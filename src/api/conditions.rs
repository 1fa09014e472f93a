//! Conditions: the one helper that sets them, keeping `lastTransitionTime` stable unless the status
//! really changes.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use schemars::{Schema, SchemaGenerator, json_schema};

/// Condition types.
pub mod types {
    pub const READY: &str = "Ready";
    pub const PROGRESSING: &str = "Progressing";
    pub const DEGRADED: &str = "Degraded";
    pub const COMPLETE: &str = "Complete";
    pub const FAILED: &str = "Failed";
    pub const INSECURE_TLS: &str = "InsecureTLS";
    pub const PREFLIGHT: &str = "Preflight";
    pub const IN_SYNC: &str = "InSync";
}

/// Schema of a `conditions` list: a map keyed by `type`, as `kubectl` and SSA expect.
pub fn conditions_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"],
        "items": {
            "type": "object",
            "required": ["type", "status", "lastTransitionTime", "reason", "message"],
            "properties": {
                "type": {"type": "string", "description": "Condition type."},
                "status": {"type": "string", "enum": ["True", "False", "Unknown"], "description": "True, False or Unknown."},
                "reason": {"type": "string", "description": "CamelCase machine-readable reason."},
                "message": {"type": "string", "description": "What happened, and what to do about it."},
                "lastTransitionTime": {"type": "string", "format": "date-time", "description": "When status last changed."},
                "observedGeneration": {"type": "integer", "format": "int64", "description": "Generation the condition describes."}
            }
        }
    })
}

/// Sets (or adds) a condition. `lastTransitionTime` changes only when the status flips.
/// Returns true when anything changed.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
) -> bool {
    set_condition_status(conditions, type_, if status { "True" } else { "False" }, reason, message, generation)
}

/// [`set_condition`] with the status as a string: `True`, `False` or `Unknown`.
pub fn set_condition_status(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status_s: &str,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
) -> bool {
    let message = message.into();
    if let Some(c) = conditions.iter_mut().find(|c| c.type_ == type_) {
        let before = c.clone();
        if c.status != status_s {
            c.last_transition_time = Time(jiff::Timestamp::now());
            c.status = status_s.into();
        }
        c.reason = reason.into();
        c.message = message;
        c.observed_generation = generation;
        return *c != before;
    }
    conditions.push(Condition {
        type_: type_.into(),
        status: status_s.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: Time(jiff::Timestamp::now()),
    });
    true
}

/// `InsecureTLS=True` while `insecureSkipVerify` is in use; absent otherwise.
pub fn set_insecure_tls(conditions: &mut Vec<Condition>, in_use: bool, generation: Option<i64>) {
    if in_use {
        set_condition(
            conditions,
            types::INSECURE_TLS,
            true,
            "InsecureSkipVerify",
            "tls.insecureSkipVerify is in use: server certificates are not verified; configure tls.caRef instead",
            generation,
        );
    } else {
        remove_condition(conditions, types::INSECURE_TLS);
    }
}

/// Removes a condition type; returns whether it was there.
pub fn remove_condition(conditions: &mut Vec<Condition>, type_: &str) -> bool {
    let n = conditions.len();
    conditions.retain(|c| c.type_ != type_);
    n != conditions.len()
}

/// Looks a condition up.
pub fn get_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// True when the condition exists with status True.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    get_condition(conditions, type_).is_some_and(|c| c.status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_moves_only_on_status_change() {
        let mut c = vec![];
        assert!(set_condition(&mut c, "Ready", false, "Pending", "waiting", Some(1)));
        let t0 = c[0].last_transition_time.clone();
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert!(set_condition(&mut c, "Ready", false, "RunFailed", "boom", Some(2)));
        assert_eq!(c[0].last_transition_time, t0, "same status keeps the transition time");
        assert!(!set_condition(&mut c, "Ready", false, "RunFailed", "boom", Some(2)), "no-op reports no change");
        assert!(set_condition(&mut c, "Ready", true, "Succeeded", "ok", Some(2)));
        assert_ne!(c[0].last_transition_time, t0);
        assert!(is_true(&c, "Ready"));
        assert!(remove_condition(&mut c, "Ready"));
        assert!(c.is_empty());
    }
}
