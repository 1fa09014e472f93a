//! Admission without an API server: what `kubectl apply` would refuse, refused the same way, in the
//! API server's words. An object is checked against its CRD's own schema — unknown fields (strict
//! decoding), then the structural schema (types, required, enums, lengths, patterns, ranges, list
//! sizes, set uniqueness, formats), then the CRD's own CEL rules, evaluated by kube's CEL engine —
//! after the schema's defaults are applied. The rules are never written twice.

use std::collections::BTreeSet;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::{Map, Value};

/// Checks `obj` as the API server would on create; returns it with the schema's defaults applied.
pub fn admit(crd: &CustomResourceDefinition, obj: &Value) -> Result<Value, Vec<String>> {
    let Some(schema) = crd
        .spec
        .versions
        .first()
        .and_then(|v| v.schema.as_ref())
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .and_then(|s| serde_json::to_value(s).ok())
    else {
        return Err(vec!["the CRD has no schema".into()]);
    };
    // strict decoding: unknown fields are refused before anything else
    let mut unknown = vec![];
    find_unknown(&schema, obj, "", &mut unknown);
    if !unknown.is_empty() {
        return Err(unknown.into_iter().map(|p| format!("unknown field {p:?}")).collect());
    }
    let mut obj = obj.clone();
    apply_defaults(&schema, &mut obj);
    let mut errs = vec![];
    check(&schema, &obj, "", &mut errs);
    if !errs.is_empty() {
        return Err(errs);
    }
    if let Err(e) = kube::core::cel::Validator::new().validate(&schema, &obj, None) {
        return Err(e.into_vec().into_iter().map(|e| cel_message(&obj, &e.field_path, &e.message)).collect());
    }
    Ok(obj)
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() { key.to_string() } else { format!("{path}.{key}") }
}

fn props(schema: &Value) -> Option<&Map<String, Value>> {
    schema.get("properties").and_then(Value::as_object)
}

fn preserves_unknown(schema: &Value) -> bool {
    schema.get("x-kubernetes-preserve-unknown-fields").and_then(Value::as_bool).unwrap_or(false)
}

fn find_unknown(schema: &Value, v: &Value, path: &str, out: &mut Vec<String>) {
    match v {
        Value::Object(m) if !preserves_unknown(schema) => {
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            for (k, x) in m {
                match (props(schema).and_then(|p| p.get(k)), additional) {
                    (Some(s), _) | (None, Some(s)) => find_unknown(s, x, &join(path, k), out),
                    (None, None) if path.is_empty() && matches!(k.as_str(), "apiVersion" | "kind" | "metadata") => {}
                    (None, None) if props(schema).is_some() => out.push(join(path, k)),
                    (None, None) => {}
                }
            }
        }
        Value::Array(a) => {
            if let Some(items) = schema.get("items") {
                for (i, x) in a.iter().enumerate() {
                    find_unknown(items, x, &format!("{path}[{i}]"), out);
                }
            }
        }
        _ => {}
    }
}

fn apply_defaults(schema: &Value, v: &mut Value) {
    match v {
        Value::Object(m) => {
            if let Some(p) = props(schema) {
                for (k, s) in p {
                    if !m.contains_key(k)
                        && let Some(d) = s.get("default")
                    {
                        m.insert(k.clone(), d.clone());
                    }
                }
                for (k, x) in m.iter_mut() {
                    if let Some(s) = p.get(k) {
                        apply_defaults(s, x);
                    }
                }
            } else if let Some(a) = schema.get("additionalProperties").filter(|a| a.is_object()) {
                for x in m.values_mut() {
                    apply_defaults(a, x);
                }
            }
        }
        Value::Array(a) => {
            if let Some(items) = schema.get("items") {
                for x in a {
                    apply_defaults(items, x);
                }
            }
        }
        _ => {}
    }
}

/// A value the way the API server quotes it in messages.
fn quote(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => "null".into(),
        Value::Array(_) => "\"array\"".into(),
        Value::Object(_) => "\"object\"".into(),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::String(_) => "string",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::Bool(_) => "boolean",
        Value::Null => "null",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn check(schema: &Value, v: &Value, path: &str, errs: &mut Vec<String>) {
    let at = if path.is_empty() { "<root>" } else { path };
    if v.is_null() {
        if !schema.get("nullable").and_then(Value::as_bool).unwrap_or(false)
            && let Some(t) = schema.get("type").and_then(Value::as_str)
        {
            errs.push(format!("{at}: Invalid value: null: {at} in body must be of type {t}: \"null\""));
        }
        return;
    }
    if let Some(t) = schema.get("type").and_then(Value::as_str) {
        let actual = type_name(v);
        let ok = actual == t || (t == "number" && actual == "integer");
        if !ok {
            errs.push(format!(
                "{at}: Invalid value: {}: {at} in body must be of type {t}: \"{actual}\"",
                quote(&Value::String(actual.into()))
            ));
            return;
        }
    }
    match v {
        Value::Object(m) => {
            for r in schema.get("required").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str) {
                if !m.contains_key(r) {
                    errs.push(format!("{}: Required value", join(path, r)));
                }
            }
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            for (k, x) in m {
                if path.is_empty() && matches!(k.as_str(), "apiVersion" | "kind" | "metadata") {
                    continue;
                }
                if let Some(s) = props(schema).and_then(|p| p.get(k)).or(additional) {
                    check(s, x, &join(path, k), errs);
                }
            }
        }
        Value::Array(a) => {
            let n = a.len() as u64;
            if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
                && n > max
            {
                errs.push(format!("{at}: Too many: {n}: must have at most {max} items"));
            }
            if let Some(min) = schema.get("minItems").and_then(Value::as_u64)
                && n < min
            {
                errs.push(format!("{at}: Invalid value: {n}: {at} in body should have at least {min} items"));
            }
            if schema.get("x-kubernetes-list-type").and_then(Value::as_str) == Some("set") {
                let mut seen = BTreeSet::new();
                for (i, x) in a.iter().enumerate() {
                    if !seen.insert(x.to_string()) {
                        errs.push(format!("{at}[{i}]: Duplicate value: {}", quote(x)));
                    }
                }
            }
            if let Some(items) = schema.get("items") {
                for (i, x) in a.iter().enumerate() {
                    check(items, x, &format!("{path}[{i}]"), errs);
                }
            }
        }
        Value::String(s) => {
            let chars = s.chars().count() as u64;
            if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
                && chars > max
            {
                errs.push(format!("{at}: Too long: may not be more than {max} bytes"));
            }
            if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
                && chars < min
            {
                errs.push(format!(
                    "{at}: Invalid value: {}: {at} in body should be at least {min} chars long",
                    quote(v)
                ));
            }
            if let Some(e) = schema.get("enum").and_then(Value::as_array)
                && !e.contains(v)
            {
                let supported: Vec<String> = e.iter().map(quote).collect();
                errs.push(format!("{at}: Unsupported value: {}: supported values: {}", quote(v), supported.join(", ")));
            }
            if let Some(p) = schema.get("pattern").and_then(Value::as_str)
                && regex::Regex::new(p).is_ok_and(|re| !re.is_match(s))
            {
                errs.push(format!("{at}: Invalid value: {}: {at} in body should match '{p}'", quote(v)));
            }
            if schema.get("format").and_then(Value::as_str) == Some("date-time")
                && s.parse::<jiff::Timestamp>().is_err()
            {
                errs.push(format!(
                    "{at}: Invalid value: {}: {at} in body must be of type date-time: {}",
                    quote(v),
                    quote(v)
                ));
            }
        }
        Value::Number(n) => {
            if let (Some(max), Some(x)) = (schema.get("maximum").and_then(Value::as_f64), n.as_f64())
                && x > max
            {
                errs.push(format!("{at}: Invalid value: {n}: {at} in body should be less than or equal to {max}"));
            }
            if let (Some(min), Some(x)) = (schema.get("minimum").and_then(Value::as_f64), n.as_f64())
                && x < min
            {
                errs.push(format!("{at}: Invalid value: {n}: {at} in body should be greater than or equal to {min}"));
            }
        }
        _ => {}
    }
}

/// A CEL rule's failure the way the API server words it: the field, the value (scalars only), the
/// rule's message.
fn cel_message(obj: &Value, field_path: &str, message: &str) -> String {
    let path = field_path.trim_start_matches('.');
    let mut v = Some(obj);
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (key, idx) = match part.split_once('[') {
            Some((k, rest)) => (k, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (part, None),
        };
        v = v.and_then(|x| x.get(key));
        if let Some(i) = idx {
            v = v.and_then(|x| x.get(i));
        }
    }
    match v {
        Some(x @ (Value::String(_) | Value::Number(_) | Value::Bool(_))) => {
            format!("{path}: Invalid value: {}: {message}", quote(x))
        }
        _ if path.is_empty() => message.to_string(),
        _ => format!("{path}: Invalid value: {message}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{BulkExportSync, FhirSubscriptionSync};
    use kube::CustomResourceExt;
    use serde_json::json;

    fn sync(spec: Value) -> Value {
        json!({"apiVersion": "fhirsync.io/v1alpha1", "kind": "BulkExportSync", "metadata": {"name": "a"}, "spec": spec})
    }

    fn base() -> Value {
        json!({"source": {"url": "http://s/fhir"}, "target": {"url": "http://p/fhir"},
               "staging": {"volume": {"path": "/staging", "pathlingPath": "file:///s"}}})
    }

    fn errors(spec: Value) -> Vec<String> {
        admit(&BulkExportSync::crd(), &sync(spec)).err().unwrap_or_default()
    }

    #[test]
    fn a_valid_object_is_admitted_with_its_defaults() {
        let o = admit(&BulkExportSync::crd(), &sync(base())).unwrap();
        assert_eq!(o["spec"]["runTimeout"], "24h");
        assert_eq!(o["spec"]["target"]["saveMode"], "merge");
        assert_eq!(o["spec"]["maxParallelDownloads"], 4);
    }

    #[test]
    fn what_the_api_server_refuses_is_refused_in_its_words() {
        let with = |f: &dyn Fn(&mut Value)| {
            let mut s = base();
            f(&mut s);
            errors(s)
        };
        let table: Vec<(Vec<String>, &str)> = vec![
            (with(&|s| s["exprot"] = json!({"types": ["Patient"]})), r#"unknown field "spec.exprot""#),
            (
                with(&|s| s["staging"]["volume"]["path"] = json!("relative/dir")),
                r#"spec.staging.volume.path: Invalid value: "relative/dir": staging.volume.path must be an absolute path"#,
            ),
            (
                with(&|s| s["maxParallelDownloads"] = json!(100)),
                "spec.maxParallelDownloads: Invalid value: 100: spec.maxParallelDownloads in body should be less than or equal to 64",
            ),
            (
                with(&|s| s["target"]["saveMode"] = json!("sometimes")),
                r#"spec.target.saveMode: Unsupported value: "sometimes": supported values: "merge", "overwrite", "append", "ignore", "error""#,
            ),
            (
                with(&|s| s["export"] = json!({"types": ["patient"]})),
                r#"spec.export.types[0]: Invalid value: "patient": spec.export.types[0] in body should match '^[A-Z][A-Za-z]{0,63}$'"#,
            ),
            (
                with(&|s| s["export"] = json!({"since": "yesterday"})),
                r#"spec.export.since: Invalid value: "yesterday": spec.export.since in body must be of type date-time: "yesterday""#,
            ),
            (
                with(&|s| s["maxParallelDownloads"] = json!("four")),
                r#"spec.maxParallelDownloads: Invalid value: "string": spec.maxParallelDownloads in body must be of type integer: "string""#,
            ),
            (
                with(&|s| s["runTimeout"] = json!("18446744073709551615s1s")),
                "spec.runTimeout: Invalid value: \"18446744073709551615s1s\": must be a duration",
            ),
            (
                with(&|s| {
                    s.as_object_mut().unwrap().remove("source");
                }),
                "spec.source: Required value",
            ),
            (
                with(&|s| s["export"] = json!({"level": "Group"})),
                "spec.export: Invalid value: export.groupId is required",
            ),
            (
                with(&|s| s["target"]["saveMode"] = json!("overwrite")),
                "spec.target.saveMode: Invalid value: \"overwrite\": incremental runs allow merge only",
            ),
        ];
        for (errs, want) in table {
            assert!(errs.iter().any(|e| e.starts_with(want)), "want {want:?}, got {errs:?}");
        }
    }

    #[test]
    fn sets_refuse_duplicates() {
        let f = json!({"apiVersion": "fhirsync.io/v1alpha1", "kind": "FhirSubscriptionSync", "metadata": {"name": "a"},
            "spec": {"source": {"url": "http://s"}, "criteria": ["Patient?", "Patient?"], "endpoint": "http://p"}});
        let errs = admit(&FhirSubscriptionSync::crd(), &f).unwrap_err();
        assert_eq!(errs, vec![r#"spec.criteria[1]: Duplicate value: "Patient?""#.to_string()]);
    }
}
