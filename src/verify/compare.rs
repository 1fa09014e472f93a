//! Compares the source's sorted keys with Pathling's: per type, how many each side holds, which are
//! missing in Pathling (or only pending), which are extra — with a few examples, and every extra
//! written to a staging file for the repair.

use std::collections::BTreeMap;

use bytes::Bytes;

use super::ids::{bare, split};
use super::lines::LineWriter;
use super::sort::Merge;
use crate::api::drift::{Drift, EXAMPLES, TypeDrift};
use crate::staging::{Staging, StagingError};

/// The staging file listing the extras (`Type id` per line, sorted).
pub const EXTRAS: &str = "extra.ids";

/// Compares two merged key streams. Returns the drift (counts and examples; `in_sync` when nothing is
/// missing or extra) and writes the extras to [`EXTRAS`].
pub async fn compare(source: &mut Merge, pathling: &mut Merge, staging: &dyn Staging) -> Result<Drift, StagingError> {
    let mut types: BTreeMap<String, TypeDrift> = BTreeMap::new();
    let mut w = LineWriter::create(staging, EXTRAS).await?;
    let mut a = source.next().await?;
    let mut b = pathling.next().await?;
    fn entry<'a>(types: &'a mut BTreeMap<String, TypeDrift>, t: &[u8]) -> &'a mut TypeDrift {
        let t = String::from_utf8_lossy(t).into_owned();
        types.entry(t.clone()).or_insert_with(|| TypeDrift { type_: t, ..Default::default() })
    }
    fn example(v: &mut Vec<String>, id: &[u8]) {
        if v.len() < EXAMPLES {
            v.push(String::from_utf8_lossy(id).into_owned());
        }
    }
    loop {
        let order = match (&a, &b) {
            (None, None) => break,
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some(x), Some(y)) => bare(x).cmp(bare(y)),
        };
        match order {
            std::cmp::Ordering::Equal => {
                let (t, _, _) = split(a.as_deref().unwrap_or_default());
                let e = entry(&mut types, t);
                e.source += 1;
                e.pathling += 1;
                a = source.next().await?;
                b = pathling.next().await?;
            }
            std::cmp::Ordering::Less => {
                let k: Bytes = a.take().unwrap_or_default();
                let (t, id, pending) = split(&k);
                let e = entry(&mut types, t);
                e.source += 1;
                if pending {
                    e.pending += 1;
                } else {
                    e.missing += 1;
                    example(&mut e.missing_examples, id);
                }
                a = source.next().await?;
            }
            std::cmp::Ordering::Greater => {
                let k: Bytes = b.take().unwrap_or_default();
                let (t, id, _) = split(&k);
                let e = entry(&mut types, t);
                e.pathling += 1;
                e.extra += 1;
                example(&mut e.extra_examples, id);
                w.line(bare(&k)).await?;
                b = pathling.next().await?;
            }
        }
    }
    w.finish().await?;
    let types: Vec<TypeDrift> = types.into_values().collect();
    let in_sync = types.iter().all(|t| t.missing == 0 && t.extra == 0);
    Ok(Drift { in_sync, types, ..Default::default() })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::staging::volume::VolumeStaging;
    use crate::verify::sort::Sorter;

    async fn sorted(staging: &Arc<dyn Staging>, prefix: &str, keys: &[&str]) -> crate::verify::sort::Sorted {
        let mut s = Sorter::new(staging.clone(), prefix, 64);
        for k in keys {
            s.push(k.as_bytes()).await.unwrap();
        }
        s.finish().await.unwrap()
    }

    #[tokio::test]
    async fn counts_missing_pending_and_extra_per_type() {
        let dir = tempfile::tempdir().unwrap();
        let staging: Arc<dyn Staging> =
            Arc::new(VolumeStaging::new(dir.path().to_str().unwrap(), "file:///x", "ns", "run"));
        let src = sorted(
            &staging,
            "source",
            &["Patient a", "Patient b", "Patient c", "Patient d\tp", "Observation o1", "Observation o2"],
        )
        .await;
        let pl = sorted(
            &staging,
            "pathling",
            &["Patient a", "Patient c", "Patient x", "Observation o1", "Observation o2", "Encounter e1"],
        )
        .await;
        let d = compare(&mut src.open().await.unwrap(), &mut pl.open().await.unwrap(), staging.as_ref()).await.unwrap();
        assert!(!d.in_sync);
        let by: BTreeMap<&str, &TypeDrift> = d.types.iter().map(|t| (t.type_.as_str(), t)).collect();
        let p = by["Patient"];
        assert_eq!((p.source, p.pathling, p.missing, p.pending, p.extra), (4, 3, 1, 1, 1));
        assert_eq!(
            (p.missing_examples.clone(), p.extra_examples.clone()),
            (vec!["b".to_string()], vec!["x".to_string()])
        );
        let o = by["Observation"];
        assert_eq!((o.source, o.pathling, o.missing, o.extra), (2, 2, 0, 0));
        assert_eq!((by["Encounter"].source, by["Encounter"].extra), (0, 1));
        let mut extras = crate::fhir::ndjson::Lines::new(staging.read(EXTRAS).await.unwrap(), 200);
        let mut got = vec![];
        while let Some(Ok(crate::fhir::ndjson::Line::Text(t))) = extras.next().await {
            got.push(String::from_utf8(t.to_vec()).unwrap());
        }
        assert_eq!(got, vec!["Encounter e1", "Patient x"]);
        assert!(d.summary().contains("Pathling misses 1 Patient (e.g. Patient/b)"), "{}", d.summary());
    }
}
