//! THE table of peer quirks: what each known server does differently from the specifications, and
//! what fhirsync does about it. A decision that depends on *which* server answered is made by a
//! function of this module; a quirk answered by behaviour that suits every server (a header sent
//! always, a bound kept always) is listed in [`QUIRKS`] with the file that carries it and the test
//! that shows it. Pathling's two generations have their own table: `pathling/dialect.rs`.
//!
//! A new quirk is one entry here (and, when fhirsync must tell the server apart, one function), plus
//! the test the entry names.

/// One known quirk.
#[derive(Debug, Clone, Copy)]
pub struct Quirk {
    /// The server (family) that does it.
    pub server: &'static str,
    /// What it does.
    pub does: &'static str,
    /// What fhirsync does about it.
    pub answer: &'static str,
    /// Where that is done (a path under `src/`).
    pub home: &'static str,
    /// A test that shows it (a function name under `src/` or `tests/`).
    pub test: &'static str,
}

/// Every known quirk (the README's table of real servers' quirks says the same for users).
pub const QUIRKS: &[Quirk] = &[
    Quirk {
        server: "Helios",
        does: "answers its per-tenant export cap with 400 \"too many concurrent exports\"",
        answer: "the answer is Busy (waited out, bounded by runTimeout), not a bad request",
        home: "fhir/quirks.rs",
        test: "helios_export_cap_is_busy_and_nothing_else_is",
    },
    Quirk {
        server: "Helios",
        does: "says Retry-After: 120 on every export poll, even for a job done in a second",
        answer: "polls start at 100 ms and double up to what the server says",
        home: "run/policy.rs",
        test: "polls_are_paced",
    },
    Quirk {
        server: "Helios",
        does: "has Backport topics (Basic resources) without saying so in its CapabilityStatement",
        answer: "Helios by its software name gets Backport topics; Direct delivery is refused with a hint",
        home: "fhir/quirks.rs",
        test: "topic_styles_and_known_servers",
    },
    Quirk {
        server: "Helios, HAPI, Medplum",
        does: "list no deleted[] in export manifests",
        answer: "the window's deletions are read from _history and confirmed gone before they are applied",
        home: "run/deletes.rs",
        test: "a_source_without_deleted_entries_gives_its_deletions_through_its_history",
    },
    Quirk {
        server: "HAPI",
        does: "keeps answering 202 for a cancelled or errored export, with the state in X-Progress",
        answer: "such a progress text fails the run at once (the next run starts a new export)",
        home: "fhir/quirks.rs",
        test: "a_cancelled_job_answering_202_forever_fails_the_run",
    },
    Quirk {
        server: "HAPI",
        does: "hands an identical kick-off an earlier job still running, and serves repeated searches from a 60 s cache",
        answer: "kick-offs, searches and history pages are sent with Cache-Control: no-cache",
        home: "fhir/paging.rs",
        test: "hapi_pull_quirks_are_what_fhirsync_expects",
    },
    Quirk {
        server: "HAPI",
        does: "answers a cancelled job's DELETE and status with 404, says Retry-After: 120, and serves outputs as Binary URLs that need the token and an NDJSON Accept",
        answer: "a 404 after a cancel is success; outputs are fetched with the token (requiresAccessToken) and Accept: application/fhir+ndjson",
        home: "fhir/bulk.rs",
        test: "hapi_pull_quirks_are_what_fhirsync_expects",
    },
    Quirk {
        server: "HAPI",
        does: "retries a failed rest-hook delivery for about a minute, then drops it silently (the Subscription stays active)",
        answer: "Direct with catchUp watches Pathling: Degraded TargetUnavailable while it is down, one catch-up run when it is back",
        home: "controller/target_watch.rs",
        test: "direct_push_loses_nothing_while_pathling_is_down_for_two_minutes",
    },
    Quirk {
        server: "HAPI",
        does: "sends DELETE notifications only with its subscription-send-delete-messages extension",
        answer: "spec.sendDeletes sets the extension on the Subscriptions",
        home: "fhir/subscription/shape.rs",
        test: "hapi_pushes_changes_into_pathling_directly_and_through_the_relay",
    },
    Quirk {
        server: "Medplum",
        does: "POSTs the resource itself to the bare endpoint (a delete as {} with X-Medplum-Deleted-Resource)",
        answer: "the relay reads both; Direct delivery is refused with a hint (Pathling cannot take such a POST)",
        home: "fhir/quirks.rs",
        test: "medplum_posts_resources_and_deletes_by_header",
    },
    Quirk {
        server: "some Bulk Data servers",
        does: "send Retry-After as a Unix timestamp (seconds or milliseconds) instead of a delay",
        answer: "a number above 10^9 (10^12) is read as a time in seconds (milliseconds)",
        home: "fhir/retry.rs",
        test: "retry_after_as_seconds_http_date_and_epoch",
    },
];

/// A server family fhirsync tells apart by its CapabilityStatement's `software.name`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Helios,
    Hapi,
    Medplum,
    Other,
}

/// The family of a server by its `software.name`.
pub fn family(software: &str) -> Family {
    let s = software.to_ascii_lowercase();
    if s.contains("helios") {
        Family::Helios
    } else if s.contains("medplum") {
        Family::Medplum
    } else if s.contains("hapi") {
        Family::Hapi
    } else {
        Family::Other
    }
}

/// Whether a server has Backport topics although its CapabilityStatement does not say so.
pub fn has_unstated_backport_topics(software: &str) -> bool {
    family(software) == Family::Helios
}

/// Whether a server POSTs the changed resource itself to a Subscription's endpoint (Medplum).
pub fn posts_resources(software: &str) -> bool {
    family(software) == Family::Medplum
}

/// Whether a kick-off's error answer says "busy" in a server's own words (Helios's export cap).
pub fn export_cap_is_busy(status: u16, message: &str) -> bool {
    status == 400 && message.to_ascii_lowercase().contains("too many concurrent")
}

/// Whether an `X-Progress` text says the job will never finish (HAPI: "Build in progress - Status set
/// to CANCELLED at …" / "… ERRORED …"), without mistaking ordinary text such as "0 errors".
pub fn job_is_dead(progress: &str) -> bool {
    let l = progress.to_ascii_lowercase();
    ["cancelled", "canceled", "errored", "aborted"].iter().any(|w| l.contains(w))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helios_export_cap_is_busy_and_nothing_else_is() {
        assert!(export_cap_is_busy(400, "Too many concurrent exports (limit 4)"));
        assert!(!export_cap_is_busy(400, "unknown parameter _typeFilter"));
        assert!(!export_cap_is_busy(429, "too many concurrent exports"));
    }

    #[test]
    fn topic_styles_and_known_servers() {
        assert_eq!(family("Helios FHIR Server"), Family::Helios);
        assert_eq!(family("HAPI FHIR Server"), Family::Hapi);
        assert_eq!(family("Medplum"), Family::Medplum);
        assert_eq!(family(""), Family::Other);
        assert!(has_unstated_backport_topics("Helios FHIR Server") && !has_unstated_backport_topics("HAPI FHIR"));
        assert!(posts_resources("medplum") && !posts_resources("Smile CDR"));
    }

    #[test]
    fn dead_jobs_are_recognised_by_their_progress_text() {
        assert!(job_is_dead("Build in progress - Status set to CANCELLED at 2026-11-26T03:00:00Z"));
        assert!(job_is_dead("Build in progress - Status set to ERRORED at 2026-11-26T03:00:00Z"));
        assert!(job_is_dead("Cancelled"));
        assert!(!job_is_dead("Build in progress - Status set to IN_PROGRESS at 2026-11-26T03:00:00Z"));
        assert!(!job_is_dead("45% complete, 0 errors"));
    }

    /// Every entry names a file that exists and a test that does: the table cannot drift from the code.
    #[test]
    fn every_quirk_has_its_home_and_its_test() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut sources = String::new();
        for dir in ["src", "tests"] {
            let mut stack = vec![root.join(dir)];
            while let Some(d) = stack.pop() {
                for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                    let p = entry.path();
                    if p.is_dir() {
                        stack.push(p);
                    } else if p.extension().is_some_and(|e| e == "rs") {
                        sources.push_str(&std::fs::read_to_string(&p).unwrap_or_default());
                    }
                }
            }
        }
        for q in QUIRKS {
            assert!(root.join("src").join(q.home).is_file(), "{}: no src/{}", q.server, q.home);
            assert!(sources.contains(&format!("fn {}(", q.test)), "{}: no test {}", q.server, q.test);
        }
    }
}
