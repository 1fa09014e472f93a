//! A staging file written one line at a time, in chunks of [`CHUNK`] bytes: sorted runs, merged
//! runs and the list of extras all go through it.

use bytes::BytesMut;

use crate::staging::{StagedWriter, Staging, StagingError};

/// Bytes written to the file at a time.
const CHUNK: usize = 256 * 1024;

/// Lines into one staging file.
pub struct LineWriter {
    w: Box<dyn StagedWriter>,
    buf: BytesMut,
    /// Bytes written so far.
    pub written: u64,
}

impl LineWriter {
    /// Starts the file `name` (invisible until [`LineWriter::finish`]).
    pub async fn create(staging: &dyn Staging, name: &str) -> Result<Self, StagingError> {
        Ok(Self { w: staging.create(name).await?, buf: BytesMut::with_capacity(CHUNK), written: 0 })
    }

    /// Appends `line` and a newline.
    pub async fn line(&mut self, line: &[u8]) -> Result<(), StagingError> {
        self.buf.extend_from_slice(line);
        self.buf.extend_from_slice(b"\n");
        if self.buf.len() >= CHUNK {
            self.written += self.buf.len() as u64;
            self.w.write(self.buf.split().freeze()).await?;
        }
        Ok(())
    }

    /// Writes what is left and makes the file visible; returns the bytes written.
    pub async fn finish(mut self) -> Result<u64, StagingError> {
        self.written += self.buf.len() as u64;
        self.w.write(self.buf.freeze()).await?;
        self.w.finish().await?;
        Ok(self.written)
    }
}
