//! The two Pathling server generations fhirsync talks to, told apart from the CapabilityStatement
//! before anything is sent, and what each one can do. One table: a third generation is one more row.
//!
//! | | V3 (Pathling Server 2.x/3.x) | V7 (`fhir-server` 7.x and earlier) |
//! |---|---|---|
//! | `$import` body | `input` parts, `saveMode`, `inputFormat` | `source` parts with `mode` per part |
//! | default mode | merge | **overwrite** (so `mode` is always sent, as a valueCode) |
//! | finished `$job` | Parameters listing each `inputUrl` | an OperationOutcome, no inputs listed |
//! | `DELETE Type/id`, `$export`, `$import-pnp` | yes | no |
//! | `batch` | PUT, POST, DELETE | PUT only |

use crate::fhir::capabilities::Capabilities;

/// A Pathling server generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Generation {
    /// Pathling Server 2.x/3.x (the server of Pathling 8 and later).
    V3,
    /// Pathling Server 7.x and earlier (`au.csiro.pathling:fhir-server`).
    V7,
}

impl Generation {
    /// How the generation is named to a person.
    pub fn name(self) -> &'static str {
        match self {
            Generation::V3 => "Pathling Server 2.x/3.x",
            Generation::V7 => "Pathling Server 7.x",
        }
    }

    /// Whether single resources can be deleted (`DELETE Type/id`).
    pub fn deletes(self) -> bool {
        self == Generation::V3
    }

    /// Whether Pathling can export its own data (`$export`, which verification reads).
    pub fn exports(self) -> bool {
        self == Generation::V3
    }

    /// Whether `$import-pnp` exists.
    pub fn ping_and_pull(self) -> bool {
        self == Generation::V3
    }

    /// What this generation can do, for `fhirsync check` and the Preflight condition.
    pub fn abilities(self) -> &'static str {
        match self {
            Generation::V3 => "$import (merge), update, batch, DELETE, $export",
            Generation::V7 => {
                "$import (source parts, mode merge sent explicitly), update, batch of PUTs; no DELETE, no $export"
            }
        }
    }
}

/// What the CapabilityStatement says, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detected {
    pub generation: Generation,
    /// What it was told from (for messages).
    pub why: String,
    /// The server does not say which it is: the guess is the newer generation.
    pub guessed: bool,
}

/// Tells the generation from a CapabilityStatement: by `software.version` when the software is
/// Pathling (major 4–7: the old server; 1–3: the new one, whose versions restarted), else by the
/// operations only the new server has (`bulk-submit`, `import-pnp`, `export`) or only the old one
/// (`aggregate` without `export`).
pub fn detect(c: &Capabilities) -> Detected {
    let software = c.software.clone().unwrap_or_default();
    let pathling = software.to_ascii_lowercase().contains("pathling");
    let major = software.rsplit(' ').next().and_then(|v| v.split('.').next()).and_then(|m| m.parse::<u32>().ok());
    if pathling && let Some(m) = major {
        let generation = if (4..=7).contains(&m) { Generation::V7 } else { Generation::V3 };
        return Detected { generation, why: format!("software {software}"), guessed: false };
    }
    let has = |op: &str| c.operations.contains(op);
    if has("bulk-submit") || has("import-pnp") || has("export") {
        return Detected { generation: Generation::V3, why: "it lists $export/$import-pnp".into(), guessed: false };
    }
    if has("aggregate") || c.resources.values().any(|ops| ops.contains("$aggregate")) {
        return Detected {
            generation: Generation::V7,
            why: "it lists $aggregate and no $export".into(),
            guessed: false,
        };
    }
    Detected {
        generation: Generation::V3,
        why: "its CapabilityStatement names no Pathling version; set target.pathlingGeneration to say which".into(),
        guessed: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn caps(software: Option<(&str, &str)>, ops: &[&str]) -> Capabilities {
        let mut v = json!({"resourceType": "CapabilityStatement", "fhirVersion": "4.0.1",
            "rest": [{"mode": "server", "operation": ops.iter().map(|o| json!({"name": o})).collect::<Vec<_>>()}]});
        if let Some((n, ver)) = software {
            v["software"] = json!({"name": n, "version": ver});
        }
        Capabilities::parse(&v).unwrap()
    }

    #[test]
    fn the_generation_is_told_before_anything_is_sent() {
        let table: Vec<(&str, Capabilities, Generation, bool)> = vec![
            ("7.2.0 by version", caps(Some(("Pathling", "7.2.0")), &["import", "aggregate"]), Generation::V7, false),
            ("6.4 by version", caps(Some(("Pathling FHIR Server", "6.4.2")), &["import"]), Generation::V7, false),
            ("3.0 by version", caps(Some(("Pathling", "3.0.0")), &["import", "export"]), Generation::V3, false),
            ("2.0.1 by version", caps(Some(("Pathling", "2.0.1")), &[]), Generation::V3, false),
            ("no version, new operations", caps(None, &["import", "import-pnp", "export"]), Generation::V3, false),
            ("no version, old operations", caps(None, &["import", "aggregate"]), Generation::V7, false),
            ("nothing to tell by", caps(Some(("Gateway", "1")), &["import"]), Generation::V3, true),
        ];
        for (what, c, want, guessed) in table {
            let d = detect(&c);
            assert_eq!((d.generation, d.guessed), (want, guessed), "{what}: {}", d.why);
        }
    }
}
