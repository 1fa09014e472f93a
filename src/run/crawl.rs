//! Exporting by search (`export.method: Search`, or `Auto` on a source without `$export`): each
//! type read with [`crate::fhir::crawl`] and staged as NDJSON, then imported exactly like an export.
//!
//! A staged file is finished only where one instant ends and the next begins, and the status then
//! records the type and that instant (`crawl.after`) with the file counts, before the crawl goes on:
//! a restarted process removes any file the status does not count and asks again from `after`.
//! What the crawl covers is recorded as the run's `transactionTime` (its start, or `export.until`),
//! so the watermark is exactly the window's end.

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use tokio::sync::watch;

use super::names::StagedName;
use super::policy::{Attempt, Peer};
use super::transfer::FileError;
use super::{Engine, Failure, Memory, Next, Reason, now};
use crate::api::{BulkExportRunStatus, CrawlStatus, FileCounts, Phase};
use crate::fhir::bulk::ExportRequest;
use crate::fhir::crawl::{Crawl, Item, Query};
use crate::staging::{StagedWriter, Staging};
use crate::text::peer_text;

/// A staged file is finished after this many resources (at the next instant).
pub const FILE_LINES: u64 = 100_000;
/// … or this many bytes (or half of `limits.maxFileSize`, if smaller).
pub const FILE_BYTES: u64 = 256 << 20;

/// The crawl's state in this process.
pub(super) struct CrawlMemory {
    walk: Crawl,
    file: Option<OpenFile>,
    /// The last instant written to the open file.
    last: Option<Timestamp>,
}

struct OpenFile {
    name: StagedName,
    w: Box<dyn StagedWriter>,
    lines: u64,
    bytes: u64,
}

/// The search parameters of `resource_type`'s crawl: its `_typeFilter` (at most one per type: a
/// search cannot OR two of them) and `_elements`.
pub fn search_params(export: &ExportRequest, resource_type: &str) -> Result<Vec<(String, String)>, String> {
    let mut filters = export.type_filters.iter().filter_map(|f| {
        let (t, q) = f.split_once('?').unwrap_or((f.as_str(), ""));
        (t == resource_type).then_some(q)
    });
    let mut params: Vec<(String, String)> = match filters.next() {
        Some(q) => url::form_urlencoded::parse(q.as_bytes()).map(|(k, v)| (k.into_owned(), v.into_owned())).collect(),
        None => vec![],
    };
    if filters.next().is_some() {
        return Err(format!(
            "export.typeFilters has several filters for {resource_type}: a search cannot OR them (a bulk export can); \
             combine them into one, or use export.method: BulkExport"
        ));
    }
    if let Some((k, _)) = params.iter().find(|(k, _)| k.starts_with("_lastUpdated") || k == "_sort" || k == "_count") {
        return Err(format!(
            "export.typeFilters for {resource_type} sets {k}, which the search sets itself; remove it"
        ));
    }
    if !export.elements.is_empty() {
        params.push(("_elements".into(), export.elements.join(",")));
    }
    Ok(params)
}

/// What a sync that searches must not ask for: a level other than System, several filters per type.
pub fn check(export: &ExportRequest) -> Result<(), String> {
    if export.level != crate::fhir::bulk::Level::System {
        return Err("export.method Search reads whole types: export.level must be System (Patient and Group \
                    scopes need a bulk export)"
            .into());
    }
    for f in &export.type_filters {
        let t = f.split_once('?').map(|(t, _)| t).unwrap_or(f);
        if !export.types.is_empty() && !export.types.iter().any(|x| x == t) {
            return Err(format!("export.typeFilters names {}, which is not in export.types", peer_text(t, 64)));
        }
        search_params(export, t)?;
    }
    Ok(())
}

/// The types a CapabilityStatement can search, sorted (a resumed crawl counts the types done in
/// the same order).
pub fn searchable(c: &crate::fhir::capabilities::Capabilities) -> Vec<String> {
    c.resources.iter().filter(|(_, i)| i.contains("search-type")).map(|(t, _)| t.clone()).collect()
}

impl Engine {
    /// The search's window fixed and recorded before its first page: up to now (or `export.until`).
    pub(super) fn start_crawl(&self, st: &mut BulkExportRunStatus, why: &str) {
        let now_ts = Timestamp::now();
        let up_to = self.until().map_or(now_ts, |u| u.min(now_ts));
        st.kickoff_time = Some(now());
        st.crawl = Some(CrawlStatus { up_to: Time(up_to), types_done: 0, after: None, pages: 0 });
        st.files = Some(FileCounts::default());
        st.phase = Phase::Exporting;
        st.queue_position = None;
        st.message = Some(format!("reading the source by search{why}"));
    }

    /// The types a search reads: `export.types`, or every type the source can search.
    async fn crawl_types(
        &self,
        st: &mut BulkExportRunStatus,
        mem: &mut Memory,
    ) -> Result<Result<Vec<String>, Next>, Failure> {
        if !self.setup.export.types.is_empty() {
            return Ok(Ok(self.setup.export.types.clone()));
        }
        if let Some(t) = &mem.crawl_types {
            return Ok(Ok(t.clone()));
        }
        match crate::fhir::capabilities::read(self.setup.source.http()).await {
            Ok(c) => {
                mem.streaks.ok();
                let types = searchable(&c);
                if types.is_empty() {
                    return Err(Failure::new(
                        Reason::ExportFailed,
                        "the source's CapabilityStatement lists no type it can search; list them in export.types",
                    ));
                }
                mem.crawl_types = Some(types.clone());
                Ok(Ok(types))
            }
            Err(e) => {
                let a = Attempt {
                    what: "reading the source's CapabilityStatement (which types to search)",
                    peer: Peer::Source,
                    reason: Reason::ExportFailed,
                    first_contact: !self.setup.source.http().has_answered(),
                };
                self.on_error(st, mem, a, &e).map(Err)
            }
        }
    }

    /// Exporting by search: reads pages until a file is finished or a type ends (each then stored).
    pub(super) async fn crawl(
        &self,
        st: &mut BulkExportRunStatus,
        mem: &mut Memory,
        progress: &watch::Sender<BulkExportRunStatus>,
    ) -> Result<Next, Failure> {
        let staging = self.staging()?;
        let types = match self.crawl_types(st, mem).await? {
            Ok(t) => t,
            Err(next) => return Ok(next),
        };
        let cs = st.crawl.clone().ok_or_else(|| Failure::new(Reason::ExportFailed, "no crawl recorded"))?;
        let Some(t) = types.get(cs.types_done as usize).cloned() else {
            st.transaction_time = Some(cs.up_to.clone());
            st.resource_count = Some(st.resources.values().sum());
            st.progress = None;
            st.phase = Phase::Importing;
            st.message = Some(format!(
                "read {} resources of {} types by search in {} pages; importing",
                st.resource_count.unwrap_or(0),
                types.len(),
                cs.pages
            ));
            return Ok(Next::Continue);
        };
        if mem.crawl.is_none() {
            staging.claim(&self.uid).await.map_err(|e| Failure::new(Reason::TransferFailed, e.to_string()))?;
            self.drop_uncounted(staging.as_ref(), st).await?;
            let params = search_params(&self.setup.export, &t).map_err(|m| Failure::new(Reason::InvalidSpec, m))?;
            let query = Query { resource_type: t.clone(), params, up_to: cs.up_to.0 };
            let after = cs.after.as_ref().map(|a| a.0).or(self.setup.since);
            mem.crawl = Some(CrawlMemory { walk: Crawl::new(query, after), file: None, last: None });
        }
        loop {
            let Some(cm) = mem.crawl.as_mut() else { return Ok(Next::Continue) };
            let page = cm.walk.next_page(self.setup.source.http()).await;
            let items = match page {
                Ok(Some(items)) => items,
                Ok(None) => {
                    mem.streaks.ok();
                    if let Some(f) = mem.crawl.take().and_then(|cm| cm.file) {
                        self.finish_file(st, f, &t).await?;
                    }
                    if let Some(c) = st.crawl.as_mut() {
                        c.types_done += 1;
                        c.after = None;
                    }
                    return Ok(Next::Continue);
                }
                Err(e) => {
                    let a = Attempt {
                        what: "reading a search page",
                        peer: Peer::Source,
                        reason: Reason::ExportFailed,
                        first_contact: !self.setup.source.http().has_answered(),
                    };
                    return self.on_error(st, mem, a, &e);
                }
            };
            mem.streaks.ok();
            if let Some(c) = st.crawl.as_mut() {
                c.pages = c.pages.saturating_add(1);
            }
            let finished = self.write_items(staging.as_ref(), st, mem, &t, items).await?;
            let (staged, pages) = (st.resources.values().sum::<i64>(), st.crawl.as_ref().map_or(0, |c| c.pages));
            let open = mem.crawl.as_ref().and_then(|c| c.file.as_ref()).map_or(0, |f| f.lines as i64);
            let msg = format!(
                "searching {t} ({}/{} types): {} resources read in {pages} pages",
                cs.types_done + 1,
                types.len(),
                staged + open
            );
            progress.send_modify(|s| s.progress = Some(msg.clone()));
            st.progress = Some(msg);
            if finished {
                return Ok(Next::Continue); // stored before the crawl goes on
            }
        }
    }

    /// Writes a page's resources, finishing the open file at an instant's end once it is full.
    /// Returns whether a file was finished.
    async fn write_items(
        &self,
        staging: &dyn Staging,
        st: &mut BulkExportRunStatus,
        mem: &mut Memory,
        t: &str,
        items: Vec<Item>,
    ) -> Result<bool, Failure> {
        let roll_bytes = FILE_BYTES.min(self.setup.values.max_file_bytes / 2).max(1);
        let cm = mem.crawl.as_mut().ok_or_else(|| Failure::new(Reason::ExportFailed, "no crawl in progress"))?;
        let mut finished = false;
        let mut buf: Vec<u8> = vec![];
        for it in items {
            let full = cm.file.as_ref().is_some_and(|f| f.lines >= FILE_LINES || f.bytes >= roll_bytes);
            if full
                && cm.last.is_some_and(|l| it.at > l)
                && let Some(mut f) = cm.file.take()
            {
                // every resource up to `last` is in this file or an earlier one
                write(&mut f, std::mem::take(&mut buf)).await?;
                self.finish_file(st, f, t).await?;
                if let Some(c) = st.crawl.as_mut() {
                    c.after = cm.last.map(Time);
                }
                finished = true;
            }
            let f = match &mut cm.file {
                Some(f) => f,
                None => {
                    let index = st.files.as_ref().map_or(0, |f| f.staged) as usize;
                    let name = StagedName::output(t, index).ok_or_else(|| {
                        Failure::new(Reason::InvalidSpec, format!("{} is not a resource type", peer_text(t, 64)))
                    })?;
                    let w = staging.create(&name.file_name()).await.map_err(|e| staging_failure(&name, e))?;
                    cm.file.insert(OpenFile { name, w, lines: 0, bytes: 0 })
                }
            };
            f.lines += 1;
            f.bytes += it.line.len() as u64 + 1;
            if f.bytes > self.setup.values.max_file_bytes {
                return Err(too_large(&f.name, FileError::FileTooLarge { limit: self.setup.values.max_file_bytes }));
            }
            if (st.bytes as u64).saturating_add(f.bytes) > self.setup.values.max_run_bytes {
                return Err(too_large(&f.name, FileError::RunTooLarge { limit: self.setup.values.max_run_bytes }));
            }
            buf.extend_from_slice(&it.line);
            buf.push(b'\n');
            cm.last = Some(it.at);
            if buf.len() >= 1 << 20 {
                write(f, std::mem::take(&mut buf)).await?;
            }
        }
        if let Some(f) = cm.file.as_mut() {
            write(f, buf).await?;
        }
        Ok(finished)
    }

    /// Finishes a staged file and counts it in the status.
    async fn finish_file(&self, st: &mut BulkExportRunStatus, f: OpenFile, t: &str) -> Result<(), Failure> {
        let name = f.name.clone();
        f.w.finish().await.map_err(|e| staging_failure(&name, e))?;
        let files = st.files.get_or_insert_with(FileCounts::default);
        files.staged += 1;
        files.total = files.staged;
        st.bytes += f.bytes as i64;
        *st.resources.entry(t.to_string()).or_default() += f.lines as i64;
        st.resource_count = Some(st.resources.values().sum());
        Ok(())
    }

    /// Removes staged output files the status does not count: finished by a process that stopped
    /// before it stored them (the crawl reads their resources again).
    async fn drop_uncounted(&self, staging: &dyn Staging, st: &BulkExportRunStatus) -> Result<(), Failure> {
        let counted = st.files.as_ref().map_or(0, |f| f.staged) as usize;
        let names = staging
            .list()
            .await
            .map_err(|e| Failure::new(Reason::TransferFailed, format!("listing staged files: {e}")))?;
        for n in names {
            if let Some(StagedName::Output { index, .. }) = StagedName::parse(&n)
                && index >= counted
            {
                staging
                    .remove(&n)
                    .await
                    .map_err(|e| Failure::new(Reason::TransferFailed, format!("removing {n}: {e}")))?;
            }
        }
        Ok(())
    }
}

async fn write(f: &mut OpenFile, buf: Vec<u8>) -> Result<(), Failure> {
    if buf.is_empty() {
        return Ok(());
    }
    f.w.write(buf.into()).await.map_err(|e| staging_failure(&f.name, e))
}

fn staging_failure(name: &StagedName, e: crate::staging::StagingError) -> Failure {
    Failure::new(Reason::TransferFailed, format!("staging {}: {e}", name.file_name()))
}

fn too_large(name: &StagedName, e: FileError) -> Failure {
    Failure::new(Reason::TransferFailed, format!("file {} failed: {e}", name.file_name()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::bulk::Level;

    fn export(filters: &[&str]) -> ExportRequest {
        ExportRequest {
            level: Level::System,
            types: vec!["Patient".into(), "Observation".into()],
            type_filters: filters.iter().map(|s| s.to_string()).collect(),
            elements: vec![],
            since: None,
            until: None,
        }
    }

    #[test]
    fn type_filters_become_search_parameters_or_are_refused() {
        let e = export(&["Observation?status=final&category=laboratory"]);
        assert_eq!(
            search_params(&e, "Observation").unwrap(),
            vec![("status".to_string(), "final".to_string()), ("category".to_string(), "laboratory".to_string())]
        );
        assert!(search_params(&e, "Patient").unwrap().is_empty());
        let table = [
            (export(&["Observation?status=final", "Observation?status=amended"]), "cannot OR"),
            (export(&["Observation?_sort=-date"]), "sets _sort"),
            (export(&["Encounter?status=finished"]), "not in export.types"),
            (ExportRequest { level: Level::Patient, ..export(&[]) }, "level must be System"),
        ];
        for (e, want) in table {
            let got = check(&e).unwrap_err();
            assert!(got.contains(want), "{got}");
        }
        assert!(check(&export(&["Observation?status=final"])).is_ok());
    }
}
