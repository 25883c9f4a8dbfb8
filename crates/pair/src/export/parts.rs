//! Writing an export's part files: `train-0000i-of-0000N.<ext>`, Parquet through the atomic
//! shard writer or JSON lines, rows re-chunked into fixed row groups so the bytes depend on the
//! rows alone, not on how the shards cut them.

use std::fs;
use std::io::{BufWriter, Write as _};
use std::path::PathBuf;

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use rbon_core::CoreError;
use rbon_core::shard::{ParquetSink, ShardMeta};

use super::{ROW_GROUP_ROWS, ROWS_PER_FILE, part_file};
use crate::config::FileFormat;
use crate::format;

/// An open part file: Parquet through the atomic shard writer, or JSON lines (inside a staged
/// folder, which is itself swapped into place whole).
pub(super) enum Sink {
    Parquet(Box<ParquetSink>),
    Jsonl { path: PathBuf, file: BufWriter<fs::File>, rows: usize },
}

impl Sink {
    fn rows(&self) -> usize {
        match self {
            Sink::Parquet(p) => p.rows(),
            Sink::Jsonl { rows, .. } => *rows,
        }
    }

    fn write(&mut self, batch: &RecordBatch) -> Result<(), CoreError> {
        match self {
            Sink::Parquet(p) => p.write(batch),
            Sink::Jsonl { path, file, rows } => {
                file.write_all(format::jsonl(batch)?.as_bytes()).map_err(|e| CoreError::io(path.as_path(), e))?;
                *rows += batch.num_rows();
                Ok(())
            }
        }
    }

    fn finish(self) -> Result<(), CoreError> {
        match self {
            Sink::Parquet(p) => (*p).finish().map(|_| ()),
            Sink::Jsonl { path, file, .. } => {
                let f = file.into_inner().map_err(|e| CoreError::io(path.as_path(), e.into_error()))?;
                f.sync_all().map_err(|e| CoreError::io(path.as_path(), e))
            }
        }
    }
}

/// A multi-part Parquet export being written: `train-0000i-of-0000N.parquet` in `dir`, with N
/// fixed up front from the expected row count so names never change once written. Rows reach
/// the writer in fixed chunks of `ROW_GROUP_ROWS` whatever batches they arrive in, so the bytes
/// depend on the rows only, not on how the shards cut them.
pub(super) struct Parts {
    dir: PathBuf,
    schema: SchemaRef,
    format: FileFormat,
    parts: usize,
    files: Vec<String>,
    sink: Option<Sink>,
    pending: Vec<RecordBatch>,
    pending_rows: usize,
}

impl Parts {
    pub(super) fn create(
        dir: PathBuf,
        schema: SchemaRef,
        expected_rows: usize,
        format: FileFormat,
    ) -> Result<Self, CoreError> {
        fs::create_dir_all(&dir).map_err(|e| CoreError::io(&dir, e))?;
        let parts = expected_rows.div_ceil(ROWS_PER_FILE).max(1);
        let mut p =
            Self { dir, schema, format, parts, files: Vec::new(), sink: None, pending: Vec::new(), pending_rows: 0 };
        p.next()?;
        Ok(p)
    }

    fn next(&mut self) -> Result<(), CoreError> {
        if let Some(s) = self.sink.take() {
            s.finish()?;
        }
        let name = part_file(self.files.len(), self.parts, self.format);
        let path = self.dir.join(&name);
        self.sink = Some(match self.format {
            FileFormat::Parquet => Sink::Parquet(Box::new(ParquetSink::create(
                &path,
                &self.schema,
                &ShardMeta::default(),
                Some(ROW_GROUP_ROWS),
            )?)),
            FileFormat::Jsonl => {
                let file = fs::File::create(&path).map_err(|e| CoreError::io(&path, e))?;
                Sink::Jsonl { path, file: BufWriter::new(file), rows: 0 }
            }
        });
        self.files.push(name);
        Ok(())
    }

    pub(super) fn write(&mut self, batch: RecordBatch) -> Result<(), CoreError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        self.pending_rows += batch.num_rows();
        self.pending.push(batch);
        while self.pending_rows >= ROW_GROUP_ROWS {
            let all = arrow_select::concat::concat_batches(&self.schema, &self.pending)
                .map_err(|e| CoreError::internal(format!("export: {e}")))?;
            let chunk = all.slice(0, ROW_GROUP_ROWS);
            let rest = all.slice(ROW_GROUP_ROWS, all.num_rows() - ROW_GROUP_ROWS);
            self.pending_rows = rest.num_rows();
            self.pending = vec![rest];
            self.write_rows(chunk)?;
        }
        Ok(())
    }

    fn write_rows(&mut self, mut batch: RecordBatch) -> Result<(), CoreError> {
        while batch.num_rows() > 0 {
            let rows = self.sink.as_ref().map_or(ROWS_PER_FILE, Sink::rows);
            if rows == ROWS_PER_FILE {
                if self.files.len() == self.parts {
                    // Counts come from the same shards; more rows means they changed under us.
                    let where_ = self.dir.display();
                    return Err(CoreError::internal(format!(
                        "{where_}: the shards hold more rows than their counters say"
                    )));
                }
                self.next()?;
                continue;
            }
            let take = (ROWS_PER_FILE - rows).min(batch.num_rows());
            if let Some(s) = self.sink.as_mut() {
                s.write(&batch.slice(0, take))?;
            }
            batch = batch.slice(take, batch.num_rows() - take);
        }
        Ok(())
    }

    /// Flushes and closes; returns the part file names.
    pub(super) fn finish(mut self) -> Result<Vec<String>, CoreError> {
        let rest = std::mem::take(&mut self.pending);
        if !rest.is_empty() {
            let all = arrow_select::concat::concat_batches(&self.schema, &rest)
                .map_err(|e| CoreError::internal(format!("export: {e}")))?;
            self.write_rows(all)?;
        }
        if let Some(s) = self.sink.take() {
            s.finish()?;
        }
        Ok(std::mem::take(&mut self.files))
    }
}
