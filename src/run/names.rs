//! Names of staged files, built and parsed in this one place. Output files are `{Type}.{n}.ndjson`
//! (Pathling skips names not ending in `.ndjson`), `deleted[]` files `deleted.{n}.bundles`. Types are
//! checked against FHIR's grammar before they become a name.

use crate::fhir::ids::is_type;

/// A staged file.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum StagedName {
    /// The `index`-th entry of the manifest's `output[]`, of resource type `type_`.
    Output { type_: String, index: usize },
    /// The `index`-th entry of the manifest's `deleted[]`.
    Deleted { index: usize },
}

impl StagedName {
    /// An output file; `None` when `type_` is not a resource type name.
    pub fn output(type_: &str, index: usize) -> Option<Self> {
        is_type(type_).then(|| StagedName::Output { type_: type_.to_string(), index })
    }

    /// The file name.
    pub fn file_name(&self) -> String {
        match self {
            StagedName::Output { type_, index } => format!("{type_}.{index:06}.ndjson"),
            StagedName::Deleted { index } => format!("deleted.{index:06}.bundles"),
        }
    }

    /// Parses a file name made by [`StagedName::file_name`]; anything else is `None`.
    pub fn parse(name: &str) -> Option<Self> {
        let mut parts = name.split('.');
        let (a, n, ext) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || n.len() != 6 || !n.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        let index = n.parse().ok()?;
        match (a, ext) {
            ("deleted", "bundles") => Some(StagedName::Deleted { index }),
            (t, "ndjson") => StagedName::output(t, index),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_junk_is_refused() {
        for n in [StagedName::output("Patient", 7).unwrap(), StagedName::Deleted { index: 12 }] {
            assert_eq!(StagedName::parse(&n.file_name()), Some(n));
        }
        assert_eq!(StagedName::output("Patient", 3).unwrap().file_name(), "Patient.000003.ndjson");
        for junk in [
            "Patient.ndjson",
            ".owner",
            "../x.000001.ndjson",
            "Pa-t.000001.ndjson",
            "x.000001.ndjson",
            "Patient.000001.ndjson.partial",
        ] {
            assert_eq!(StagedName::parse(junk), None, "{junk}");
        }
        assert!(StagedName::output("../etc", 1).is_none());
    }
}
