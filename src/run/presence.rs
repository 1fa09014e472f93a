//! Which resources exist at the source now, asked as cheaply as the source allows: a search by `_id`
//! for up to 50 at a time, else a read per resource, else "cannot say". Remembers for the run what
//! the source could not answer, so an unsupported search is tried once, not once per chunk.

use std::collections::BTreeSet;

use futures::{StreamExt, TryStreamExt};

use crate::fhir::client::{Error, HttpClient};
use crate::fhir::search::{self, CHUNK, Existence};

/// Reads sent at once when the source cannot search by `_id`.
const PARALLEL_READS: usize = 4;

/// What the source said about some ids of one type.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Split {
    /// Gone at the source.
    pub absent: Vec<String>,
    /// Present at the source.
    pub alive: Vec<String>,
    /// The source cannot say.
    pub unknown: Vec<String>,
}

/// A presence checker for one source, for one run.
#[derive(Debug, Default)]
pub struct Presence {
    search_unsupported: bool,
    read_unsupported: bool,
    /// Requests sent (for tests and logs).
    pub requests: u64,
}

impl Presence {
    /// Whether the source can be asked at all.
    pub fn can_answer(&self) -> bool {
        !(self.search_unsupported && self.read_unsupported)
    }

    /// Splits `ids` (of `resource_type`) by what the source says of them now.
    pub async fn check(&mut self, http: &HttpClient, resource_type: &str, ids: &[String]) -> Result<Split, Error> {
        let mut out = Split::default();
        for chunk in ids.chunks(CHUNK) {
            if !self.search_unsupported {
                self.requests += 1;
                match search::search_ids(http, resource_type, chunk).await? {
                    Existence::Alive(alive) => {
                        for id in chunk {
                            if alive.contains(id) { out.alive.push(id.clone()) } else { out.absent.push(id.clone()) }
                        }
                        continue;
                    }
                    Existence::Unsupported(why) => {
                        tracing::info!(resource_type, why = %why, "the source cannot search by _id; reading resources one by one");
                        self.search_unsupported = true;
                    }
                }
            }
            if self.read_unsupported {
                out.unknown.extend(chunk.iter().cloned());
                continue;
            }
            let answers: Vec<(String, Option<bool>)> = futures::stream::iter(chunk.iter().cloned())
                .map(|id| async move { search::exists(http, resource_type, &id).await.map(|a| (id, a)) })
                .buffered(PARALLEL_READS)
                .try_collect()
                .await?;
            self.requests += answers.len() as u64;
            let mut seen = BTreeSet::new();
            for (id, a) in answers {
                if !seen.insert(id.clone()) {
                    continue;
                }
                match a {
                    Some(true) => out.alive.push(id),
                    Some(false) => out.absent.push(id),
                    None => {
                        self.read_unsupported = true;
                        out.unknown.push(id)
                    }
                }
            }
        }
        Ok(out)
    }
}
