//! Pending → Exporting → Transferring: Pathling's preflight, the one-export-per-source queue, the
//! kick-off (its intent recorded before it is sent) and the status polls.

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use tokio::sync::watch;

use super::policy::{Attempt, Peer};
use super::resolve::RunKind;
use super::{Engine, Failure, Memory, Next, Reason, now};
use crate::api::{BulkExportRunStatus, ExportMethod, Phase};
use crate::fhir::bulk::Poll;
use crate::fhir::class::{Ask, refuses};
use crate::fhir::quirks::job_is_dead;

/// The place in a queue as shown: exact up to 1, then the next power of ten above it.
pub fn queue_bound(ahead: usize) -> u32 {
    match ahead {
        0 | 1 => ahead as u32,
        n => 10u32.saturating_pow((n as f64).log10().floor() as u32 + 1),
    }
}

/// Kick-offs lost in crashes before a run gives up (each may have left an export on the source).
pub const MAX_LOST_KICKOFFS: u32 = 3;

impl Engine {
    /// Pending: check that Pathling answers, wait for the source's export slot, record the intent,
    /// kick off.
    pub(super) async fn start(
        &self,
        st: &mut BulkExportRunStatus,
        mem: &mut Memory,
        progress: &watch::Sender<BulkExportRunStatus>,
    ) -> Result<Next, Failure> {
        if self.setup.kind == RunKind::PingAndPull {
            return self.import(st, mem, progress).await; // Pathling exports from the source itself
        }
        // a wrong Pathling URL fails in seconds, before anything is exported; its generation is
        // known from here on (what a run can do there is decided before anything is sent)
        if !mem.target_checked {
            let http = self.setup.pathling.http();
            match self.setup.pathling.generation().await {
                Ok(d) => {
                    mem.streaks.ok();
                    mem.target_checked = true;
                    tracing::debug!(run = %self.id, generation = d.generation.name(), why = %d.why, "Pathling's generation");
                    if self.setup.kind.is_verify() && !d.generation.exports() {
                        return Err(Failure::new(
                            Reason::VerifyFailed,
                            format!(
                                "{} ({}) cannot export its own data, which a verification compares against the source: \
                                 remove spec.verify for this target",
                                d.generation.name(),
                                d.why
                            ),
                        ));
                    }
                }
                Err(e) => {
                    let a = Attempt {
                        what: "checking that Pathling answers (GET metadata)",
                        peer: Peer::Target,
                        reason: Reason::ImportFailed,
                        first_contact: !http.has_answered(),
                    };
                    return self.on_error(st, mem, a, &e);
                }
            }
        }
        if mem.source_lock.is_none() {
            let key = format!("source:{}", self.setup.source_key);
            let capacity = self.setup.source_capacity;
            mem.source_lock = Some(
                self.queue(st, progress, &key, capacity, "an export slot on the same source and credential").await,
            );
        }
        match self.setup.method {
            ExportMethod::Search => {
                self.start_crawl(st, "");
                return Ok(Next::Continue);
            }
            ExportMethod::Auto if !mem.method_checked => {
                mem.method_checked = true;
                match crate::fhir::capabilities::read(self.setup.source.http()).await {
                    Ok(c) if !super::preflight::offers_export(&c, crate::api::ExportLevel::System) => {
                        // the crawl's types come from the same statement, not a second read
                        mem.crawl_types = Some(super::crawl::searchable(&c)).filter(|t| !t.is_empty());
                        return self.fall_back_to_search(st, "its CapabilityStatement lists no $export");
                    }
                    Ok(_) => {}
                    // the kick-off finds out
                    Err(e) => {
                        tracing::debug!(run = %self.id, error = %e, "the source's CapabilityStatement is unreadable")
                    }
                }
            }
            _ => {}
        }
        if st.kickoff_time.is_some() && st.export_status_url.is_none() && !mem.kickoff_intent {
            // recorded by a process that stopped before the answer came
            st.lost_kickoffs += 1;
            if st.lost_kickoffs > MAX_LOST_KICKOFFS {
                return Err(Failure::new(
                    Reason::ExportFailed,
                    format!(
                        "{} kick-offs were interrupted before their answer arrived; each may have left an export on the source that fhirsync cannot release",
                        st.lost_kickoffs
                    ),
                ));
            }
            tracing::warn!(run = %self.id, "a kick-off's answer was lost in a restart; an export may be running on the source that cannot be released");
        }
        if !mem.kickoff_intent {
            mem.kickoff_intent = true;
            st.kickoff_time = Some(now());
            st.message = Some(match st.lost_kickoffs {
                0 => "starting the export".into(),
                n => format!(
                    "starting the export again: {n} earlier kick-off(s) were interrupted before their answer came; \
                     the source may still run an export fhirsync cannot find or release (Bulk Data offers no way to)"
                ),
            });
            return Ok(Next::Continue); // stored before the kick-off is sent
        }
        let mut req = self.setup.export.clone();
        if mem.verify.full_export {
            req.elements.clear();
        }
        match self.setup.source.kickoff(&req).await {
            Ok(url) => {
                mem.streaks.ok();
                st.export_status_url = Some(url);
                st.phase = Phase::Exporting;
                st.queue_position = None;
                st.message = Some("export started; polling the source".into());
                // the first poll comes early: many jobs finish in a second (Helios says 120 s anyway)
                mem.reset_polls();
                Ok(Next::Wait(self.poll_wait(st, mem, None, self.setup.values.source.max_poll)))
            }
            Err(e) if self.setup.kind.is_verify() && !req.elements.is_empty() && refuses(&e, Ask::Parameter) => {
                // a source that refuses _elements: read the ids from a full export instead
                tracing::info!(run = %self.id, error = %e, "the source refused _elements=id; verifying from a full export");
                mem.verify.full_export = true;
                st.message = Some("the source refused _elements: reading ids from a full export".into());
                Ok(Next::Continue)
            }
            Err(e) if self.setup.method == ExportMethod::Auto && refuses(&e, Ask::Operation) => {
                let why = format!("answered its $export kick-off with {}", e.status().unwrap_or_default());
                self.fall_back_to_search(st, &why)
            }
            Err(e) => {
                let a = Attempt {
                    what: "export kick-off",
                    peer: Peer::Source,
                    reason: Reason::ExportFailed,
                    first_contact: !self.setup.source.http().has_answered(),
                };
                self.on_error(st, mem, a, &e)
            }
        }
    }

    /// `method: Auto` on a source without `$export`: the run reads it by search instead, and says so.
    fn fall_back_to_search(&self, st: &mut BulkExportRunStatus, why: &str) -> Result<Next, Failure> {
        if self.setup.kind.is_verify() {
            return Err(Failure::new(
                Reason::VerifyFailed,
                format!(
                    "the source {why}; a verification compares ids from a bulk export and cannot run by search yet"
                ),
            ));
        }
        tracing::info!(run = %self.id, "the source {why}: reading it by search (export.method: Auto)");
        self.start_crawl(st, &format!(" (export.method Auto: the source {why})"));
        Ok(Next::Continue)
    }

    /// Waits in the fair queue for `key`, showing the position in the status while waiting.
    pub(super) async fn queue(
        &self,
        st: &mut BulkExportRunStatus,
        progress: &watch::Sender<BulkExportRunStatus>,
        key: &str,
        capacity: usize,
        what: &str,
    ) -> super::locks::LockGuard {
        let mut shown = None;
        let g = self
            .locks
            .acquire(key, &self.id, capacity, |p| {
                // the place in coarse steps: with a thousand runs queued, an exact place would
                // change (and be written) for every run at every turn of the queue
                let bound = queue_bound(p.ahead);
                if shown == Some(bound) {
                    return;
                }
                shown = Some(bound);
                let place = match bound {
                    0 => "next in line".to_string(),
                    1 => "1 run ahead".to_string(),
                    n => format!("fewer than {n} runs ahead"),
                };
                let message = format!("waiting for {what}: {place} ({capacity} at a time)");
                progress.send_modify(|s| {
                    s.queue_position = Some(bound);
                    s.message = Some(message.clone());
                });
                st.message = Some(message);
            })
            .await;
        st.queue_position = None;
        g
    }

    /// Exporting: one poll of the status URL.
    pub(super) async fn poll_export(&self, st: &mut BulkExportRunStatus, mem: &mut Memory) -> Result<Next, Failure> {
        let url = st
            .export_status_url
            .clone()
            .ok_or_else(|| Failure::new(Reason::ExportFailed, "no export status URL recorded"))?;
        match self.setup.source.poll(&url).await {
            Ok(Poll::InProgress { progress, wait }) => {
                mem.streaks.ok();
                if let Some(p) = &progress
                    && job_is_dead(p)
                {
                    // HAPI keeps answering 202 for a cancelled or errored job
                    return Err(Failure::new(
                        Reason::ExportFailed,
                        format!(
                            "the source reports the export job as {p:?}; it will not complete. The next run starts a new export"
                        ),
                    ));
                }
                st.progress = progress;
                st.message = Some("export in progress on the source".into());
                Ok(Next::Wait(self.poll_wait(st, mem, wait, self.setup.values.source.max_poll)))
            }
            Ok(Poll::Complete(m)) => {
                mem.streaks.ok();
                mem.reset_polls();
                // what the export covers: up to its transactionTime, and never past `_until`
                let tt = m.transaction_time.as_deref().and_then(|t| t.parse::<Timestamp>().ok());
                st.transaction_time = [tt, self.until()].into_iter().flatten().min().map(Time);
                st.progress = Some("export complete".into());
                st.poll_attempts = 0;
                if self.setup.kind.is_verify() {
                    st.phase = Phase::Verifying;
                    st.message = Some(format!("reading ids from {} files", m.output.len()));
                } else {
                    st.phase = Phase::Transferring;
                    st.message = Some(format!("transferring {} files", m.output.len()));
                }
                mem.manifest = Some(std::sync::Arc::new(*m));
                Ok(Next::Continue)
            }
            Err(e) => {
                let a = Attempt {
                    what: "polling the export's status",
                    peer: Peer::Source,
                    reason: Reason::ExportFailed,
                    first_contact: false,
                };
                self.on_error(st, mem, a, &e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::queue_bound;

    #[test]
    fn queue_places_move_in_few_steps() {
        let table = [(0, 0), (1, 1), (2, 10), (9, 10), (10, 100), (99, 100), (100, 1000), (999, 1000), (1000, 10000)];
        for (ahead, shown) in table {
            assert_eq!(queue_bound(ahead), shown, "{ahead}");
        }
        let steps: std::collections::BTreeSet<u32> = (0..1000).map(queue_bound).collect();
        assert_eq!(steps.len(), 5, "a run queued behind 999 others writes its place 5 times");
    }
}
