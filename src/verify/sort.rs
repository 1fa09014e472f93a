//! An external sort of keys in bounded memory: keys are gathered in one buffer; when it is full they
//! are sorted, de-duplicated and written to the staging area as a sorted run; at the end the runs are
//! merged (at most [`FAN_IN`] at a time, in passes when there are more) into one sorted stream of
//! distinct keys. Memory: the buffer's budget, plus [`FAN_IN`] readers.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::BoxStream;

use super::ids::bare;
use super::lines::LineWriter;
use crate::fhir::ndjson::{Line, Lines};
use crate::staging::{Staging, StagingError};

/// Key bytes gathered before a sorted run is spilled.
pub const BUDGET: usize = 8 << 20;
/// Runs merged at once.
pub const FAN_IN: usize = 16;
/// Longest key (a type of 64 and an id of 64, a separator and the pending mark).
pub const KEY_MAX: usize = 160;

/// Gathers keys and spills sorted runs.
pub struct Sorter {
    staging: Arc<dyn Staging>,
    prefix: String,
    budget: usize,
    arena: Vec<u8>,
    keys: Vec<(u32, u32)>,
    runs: Vec<String>,
    made: usize,
    /// Keys pushed.
    pub pushed: u64,
    /// Bytes written to the staging area.
    pub spilled: u64,
}

impl Sorter {
    /// A sorter spilling runs named `{prefix}.{n}.ids`, holding at most `budget` key bytes.
    pub fn new(staging: Arc<dyn Staging>, prefix: &str, budget: usize) -> Self {
        Self {
            staging,
            prefix: prefix.to_string(),
            budget: budget.max(KEY_MAX),
            arena: Vec::new(),
            keys: Vec::new(),
            runs: Vec::new(),
            made: 0,
            pushed: 0,
            spilled: 0,
        }
    }

    /// Adds a key (at most [`KEY_MAX`] bytes; longer ones are the caller's bug and are cut).
    pub async fn push(&mut self, key: &[u8]) -> Result<(), StagingError> {
        let key = &key[..key.len().min(KEY_MAX)];
        if self.arena.len() + key.len() > self.budget && !self.keys.is_empty() {
            self.spill().await?;
        }
        let start = self.arena.len() as u32;
        self.arena.extend_from_slice(key);
        self.keys.push((start, key.len() as u32));
        self.pushed += 1;
        Ok(())
    }

    fn run_name(&mut self) -> String {
        self.made += 1;
        format!("{}.{:06}.ids", self.prefix, self.made)
    }

    async fn spill(&mut self) -> Result<(), StagingError> {
        let name = self.run_name();
        let arena = &self.arena;
        let slice = |k: &(u32, u32)| &arena[k.0 as usize..(k.0 + k.1) as usize];
        self.keys.sort_unstable_by(|a, b| slice(a).cmp(slice(b)));
        let mut w = LineWriter::create(self.staging.as_ref(), &name).await?;
        let mut last: Option<&[u8]> = None;
        for k in &self.keys {
            let key = slice(k);
            if last.is_some_and(|l| bare(l) == bare(key)) {
                continue;
            }
            last = Some(key);
            w.line(key).await?;
        }
        self.spilled += w.finish().await?;
        self.runs.push(name);
        self.keys.clear();
        self.arena.clear();
        Ok(())
    }

    /// Spills what is left and merges the runs down to at most [`FAN_IN`].
    pub async fn finish(mut self) -> Result<Sorted, StagingError> {
        if !self.keys.is_empty() {
            self.spill().await?;
        }
        self.arena = Vec::new();
        self.keys = Vec::new();
        while self.runs.len() > FAN_IN {
            let group: Vec<String> = self.runs.drain(..FAN_IN).collect();
            let name = self.run_name();
            let mut merge = Merge::open(self.staging.as_ref(), &group).await?;
            let mut w = LineWriter::create(self.staging.as_ref(), &name).await?;
            while let Some(k) = merge.next().await? {
                w.line(&k).await?;
            }
            self.spilled += w.finish().await?;
            drop(merge);
            for g in &group {
                self.staging.remove(g).await?;
            }
            self.runs.push(name);
        }
        Ok(Sorted { staging: self.staging, runs: self.runs, keys: self.pushed, spilled: self.spilled })
    }
}

/// Sorted runs, ready to be merged.
pub struct Sorted {
    staging: Arc<dyn Staging>,
    runs: Vec<String>,
    /// Keys pushed (duplicates included).
    pub keys: u64,
    /// Bytes spilled.
    pub spilled: u64,
}

impl Sorted {
    /// The distinct keys, in order.
    pub async fn open(&self) -> Result<Merge, StagingError> {
        Merge::open(self.staging.as_ref(), &self.runs).await
    }
}

type Reader = Lines<BoxStream<'static, Result<Bytes, StagingError>>>;

/// A k-way merge of sorted runs yielding distinct keys (a key and the same key marked pending count
/// as one; the first wins).
pub struct Merge {
    readers: Vec<Reader>,
    heap: BinaryHeap<Reverse<(Bytes, usize)>>,
    last: Option<Bytes>,
}

impl Merge {
    async fn open(staging: &dyn Staging, runs: &[String]) -> Result<Self, StagingError> {
        let mut m = Merge { readers: Vec::with_capacity(runs.len()), heap: BinaryHeap::new(), last: None };
        for (i, r) in runs.iter().enumerate() {
            m.readers.push(Lines::new(staging.read(r).await?, KEY_MAX));
            m.refill(i).await?;
        }
        Ok(m)
    }

    async fn refill(&mut self, i: usize) -> Result<(), StagingError> {
        loop {
            match self.readers[i].next().await {
                None => return Ok(()),
                Some(Err(e)) => return Err(e),
                Some(Ok(Line::Text(t))) => {
                    self.heap.push(Reverse((t, i)));
                    return Ok(());
                }
                Some(Ok(Line::TooLong(_))) => continue, // never written by a Sorter
            }
        }
    }

    /// The next distinct key.
    pub async fn next(&mut self) -> Result<Option<Bytes>, StagingError> {
        while let Some(Reverse((k, i))) = self.heap.pop() {
            self.refill(i).await?;
            if self.last.as_ref().is_some_and(|l| bare(l) == bare(&k)) {
                continue;
            }
            self.last = Some(k.clone());
            return Ok(Some(k));
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::staging::volume::VolumeStaging;

    #[tokio::test]
    async fn sorts_and_dedupes_across_many_runs_and_passes() {
        let dir = tempfile::tempdir().unwrap();
        let staging: Arc<dyn Staging> =
            Arc::new(VolumeStaging::new(dir.path().to_str().unwrap(), "file:///x", "ns", "run"));
        // a tiny budget: every ~10 keys spill a run, so 2,000 keys make ~200 runs and two merge passes
        let mut s = Sorter::new(staging.clone(), "side", 200);
        let mut want = std::collections::BTreeSet::new();
        for i in 0..2000u32 {
            let id = (i.wrapping_mul(7919)) % 1500; // duplicates on purpose
            let key = format!("Patient {id:05}");
            s.push(key.as_bytes()).await.unwrap();
            want.insert(key);
        }
        s.push(b"Patient 00003\tp").await.unwrap(); // the same resource, marked pending: one key
        let sorted = s.finish().await.unwrap();
        assert!(sorted.runs.len() <= FAN_IN);
        let mut m = sorted.open().await.unwrap();
        let mut got = vec![];
        while let Some(k) = m.next().await.unwrap() {
            got.push(String::from_utf8(k.to_vec()).unwrap());
        }
        let want: Vec<String> = want.into_iter().collect();
        assert_eq!(got, want);
        // merged passes removed their inputs
        let left = staging.list().await.unwrap();
        assert!(left.len() <= FAN_IN, "{}", left.len());
    }
}
