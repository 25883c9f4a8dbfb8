//! Atomic Parquet shards. A shard is written to a temporary name in its directory, fsynced and
//! renamed into place, so it exists exactly when its final file does and a kill at any moment
//! leaves either the whole shard or nothing. Each shard carries, in its Parquet key-value
//! metadata, the fingerprint of the configuration that made it and its counters, so a rerun can
//! trust a shard without any other bookkeeping. A stage's shard also carries a check
//! ([`CHECK_KEY`]): its folder and file name, row count, and the SHA-256 of all its bytes, so a shard flipped, truncated or copied over another is found and made again
//! ([`read_checked`]).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use parquet::file::reader::{FileReader, SerializedFileReader};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{CoreError, Result};

/// Key of rbon's entry in a shard's Parquet key-value metadata.
pub const META_KEY: &str = "rbon";

/// Key of a stage shard's check in its Parquet key-value metadata.
pub const CHECK_KEY: &str = "rbon.check";

/// What a stage shard's footer says about its bytes and place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct ShardCheck {
    /// `<stage folder>/<file name>`: a shard copied over another does not pass.
    place: String,
    rows: u64,
    /// SHA-256 of the whole file as written with 64 zeros in place of this value.
    sha256: String,
}

fn place_of(path: &Path) -> String {
    let name =
        |p: Option<&Path>| p.and_then(Path::file_name).map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    format!("{}/{}", name(path.parent()), name(Some(path)))
}

/// What a shard records about itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardMeta {
    /// Fingerprint of the stage configuration and inputs that produced the shard.
    pub fingerprint: String,
    /// Stage counters for this shard (rows, drops by reason, ...).
    pub counters: BTreeMap<String, u64>,
    /// Counters broken down by a stage-defined key (e.g. per exported method and β).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub details: BTreeMap<String, BTreeMap<String, u64>>,
}

fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

fn sync_dir(dir: &Path) -> Result<()> {
    // Directories cannot be opened for fsync on every platform; where they can, the rename is
    // only durable after it.
    #[cfg(unix)]
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| CoreError::io(dir, e))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Writes `bytes` to `path` atomically (temp file, fsync, rename, fsync of the directory).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(|e| CoreError::io(dir, e))?;
    let tmp = temp_path(path);
    let res = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    if let Err(e) = res {
        let _ = fs::remove_file(&tmp);
        return Err(CoreError::io(&tmp, e));
    }
    fs::rename(&tmp, path).map_err(|e| CoreError::io(path, e))?;
    sync_dir(dir)
}

fn writer_properties(meta: &ShardMeta) -> WriterProperties {
    let json = serde_json::to_string(meta).unwrap_or_default();
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .set_key_value_metadata(Some(vec![KeyValue::new(META_KEY.to_owned(), json)]))
        .build()
}

/// A Parquet file being written under a temporary name; [`ParquetSink::finish`] fsyncs it and
/// renames it into place. Dropping it unfinished removes the temporary file.
#[derive(Debug)]
pub struct ParquetSink {
    path: PathBuf,
    tmp: PathBuf,
    writer: Option<ArrowWriter<File>>,
    rows: usize,
}

impl ParquetSink {
    /// Starts a file; `row_group_rows` bounds the rows buffered in memory (None: the default).
    pub fn create(path: &Path, schema: &SchemaRef, meta: &ShardMeta, row_group_rows: Option<usize>) -> Result<Self> {
        let dir = path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(|e| CoreError::io(dir, e))?;
        let tmp = temp_path(path);
        let file = File::create(&tmp).map_err(|e| CoreError::io(&tmp, e))?;
        let mut props = writer_properties(meta);
        if let Some(n) = row_group_rows {
            props = props.into_builder().set_max_row_group_row_count(Some(n)).build();
        }
        let writer = ArrowWriter::try_new(file, schema.clone(), Some(props))
            .map_err(|source| CoreError::Parquet { path: path.to_owned(), source })?;
        Ok(Self { path: path.to_owned(), tmp, writer: Some(writer), rows: 0 })
    }

    pub fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        if let Some(w) = self.writer.as_mut() {
            w.write(batch).map_err(|source| CoreError::Parquet { path: self.path.clone(), source })?;
            self.rows += batch.num_rows();
        }
        Ok(())
    }

    /// Rows written so far.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Closes, fsyncs and renames the file into place.
    pub fn finish(mut self) -> Result<PathBuf> {
        let Some(w) = self.writer.take() else { return Ok(self.path.clone()) };
        let file = w.into_inner().map_err(|source| CoreError::Parquet { path: self.path.clone(), source })?;
        file.sync_all().map_err(|e| CoreError::io(&self.tmp, e))?;
        if let Err(e) = fs::rename(&self.tmp, &self.path) {
            let _ = fs::remove_file(&self.tmp);
            return Err(CoreError::io(&self.path, e));
        }
        sync_dir(self.path.parent().unwrap_or(Path::new(".")))?;
        Ok(self.path.clone())
    }
}

impl Drop for ParquetSink {
    fn drop(&mut self) {
        if self.writer.is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Writes record batches as one Parquet file, atomically. The same batches and metadata always
/// give the same bytes.
pub fn write_parquet(path: &Path, schema: &SchemaRef, batches: &[RecordBatch], meta: &ShardMeta) -> Result<()> {
    let mut sink = ParquetSink::create(path, schema, meta, None)?;
    for b in batches {
        sink.write(b)?;
    }
    sink.finish().map(|_| ())
}

/// Writes a stage's shard: as [`write_parquet`], with a check in its footer that
/// [`read_checked`] reads.
///
/// The file is made in memory (a shard is a few MB at most) with 64 zeros in place of the
/// check's hash; the hash of those bytes, every byte of the file, is then patched in (a Parquet
/// footer holds key-value strings verbatim).
pub fn write_shard(path: &Path, schema: &SchemaRef, batches: &[RecordBatch], meta: &ShardMeta) -> Result<()> {
    let pq = |source| CoreError::Parquet { path: path.to_owned(), source };
    let mut w = ArrowWriter::try_new(Vec::new(), schema.clone(), Some(writer_properties(meta))).map_err(pq)?;
    let mut rows = 0u64;
    for b in batches {
        w.write(b).map_err(pq)?;
        rows += b.num_rows() as u64;
    }
    w.flush().map_err(pq)?;
    let prefix = w.bytes_written();
    let placeholder = "0".repeat(64);
    let check = ShardCheck { place: place_of(path), rows, sha256: placeholder.clone() };
    let json = serde_json::to_string(&check).map_err(|e| CoreError::internal(e.to_string()))?;
    w.append_key_value_metadata(KeyValue::new(CHECK_KEY.to_owned(), json));
    let mut bytes = w.into_inner().map_err(pq)?;
    let needle = format!("\"sha256\":\"{placeholder}\"");
    let at = bytes
        .get(prefix..)
        .and_then(|footer| footer.windows(needle.len()).position(|w| w == needle.as_bytes()))
        .ok_or_else(|| CoreError::internal("the shard check is not in the footer"))?;
    let at = prefix + at + needle.len() - 65;
    let sha = crate::seed::hex(&Sha256::digest(&bytes));
    bytes[at..at + 64].copy_from_slice(sha.as_bytes());
    write_atomic(path, &bytes)
}

/// Reads a stage shard once: `None` when its footer holds no rbon metadata or another
/// fingerprint (a shard of another configuration, to be made again); otherwise its metadata,
/// or what does not match the check in its footer ([`write_shard`]: its place, row count and
/// the hash of all its bytes). An error is a file that cannot be read as Parquet at all.
pub fn read_checked(path: &Path, fingerprint: &str) -> Result<Option<std::result::Result<ShardMeta, String>>> {
    let bytes = bytes::Bytes::from(fs::read(path).map_err(|e| CoreError::io(path, e))?);
    let reader = SerializedFileReader::new(bytes.clone())
        .map_err(|source| CoreError::Parquet { path: path.to_owned(), source })?;
    let file_meta = reader.metadata().file_metadata();
    let kv = file_meta.key_value_metadata();
    let value = |key: &str| kv.and_then(|kv| kv.iter().find(|k| k.key == key).and_then(|k| k.value.clone()));
    let Some(meta) = value(META_KEY).and_then(|v| serde_json::from_str::<ShardMeta>(&v).ok()) else { return Ok(None) };
    if meta.fingerprint != fingerprint {
        return Ok(None);
    }
    let check = (|| {
        let check = value(CHECK_KEY).ok_or("its footer has no check (written by an older rbon)")?;
        let check: ShardCheck = serde_json::from_str(&check).map_err(|e| format!("its check does not parse: {e}"))?;
        if check.place != place_of(path) {
            return Err(format!("it holds {} (copied over this one)", check.place));
        }
        if u64::try_from(file_meta.num_rows()).ok() != Some(check.rows) {
            return Err(format!("it has {} rows, its check says {}", file_meta.num_rows(), check.rows));
        }
        let mut bytes = bytes.to_vec();
        let needle = format!("\"sha256\":\"{}\"", check.sha256);
        let Some(at) = bytes.windows(needle.len()).rposition(|w| w == needle.as_bytes()) else {
            return Err("its check is not where it was written".into());
        };
        let at = at + needle.len() - 65;
        bytes[at..at + 64].fill(b'0');
        if crate::seed::hex(&Sha256::digest(&bytes)) != check.sha256 {
            return Err("its bytes do not match its checksum".into());
        }
        Ok(())
    })();
    Ok(Some(check.map(|()| meta)))
}

/// Reads a whole Parquet file.
pub fn read_parquet(path: &Path) -> Result<Vec<RecordBatch>> {
    let file = File::open(path).map_err(|e| CoreError::io(path, e))?;
    let pq = |source| CoreError::Parquet { path: path.to_owned(), source };
    let reader = ParquetRecordBatchReaderBuilder::try_new(file).map_err(pq)?.build().map_err(pq)?;
    reader
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|source| CoreError::Arrow { path: path.to_owned(), source })
}

/// Reads rbon's metadata from a shard's footer; `None` when the file has none.
pub fn read_meta(path: &Path) -> Result<Option<ShardMeta>> {
    let file = File::open(path).map_err(|e| CoreError::io(path, e))?;
    let reader =
        SerializedFileReader::new(file).map_err(|source| CoreError::Parquet { path: path.to_owned(), source })?;
    let kv = reader.metadata().file_metadata().key_value_metadata();
    Ok(kv
        .and_then(|kv| kv.iter().find(|k| k.key == META_KEY).and_then(|k| k.value.clone()))
        .and_then(|v| serde_json::from_str(&v).ok()))
}

/// Removes temporary files left in `dir` by writers that were killed.
pub fn remove_stale_temps(dir: &Path) -> Result<()> {
    remove_stale_temps_of(dir, |_| true)
}

/// Removes the temporary files left in `dir` that `mine(shard index, if it is a shard's)`
/// selects: with several ranks in one directory, each clears only its own (another rank's may
/// be in flight).
pub fn remove_stale_temps_of(dir: &Path, mine: impl Fn(Option<usize>) -> bool) -> Result<()> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(());
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        let index = crate::stage::shard_index(&name);
        if mine(index) && name.starts_with('.') && name.contains(".tmp-") && e.path().is_file() {
            fs::remove_file(e.path()).map_err(|err| CoreError::io(e.path(), err))?;
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use arrow_array::{StringArray, UInt32Array};
    use arrow_schema::{DataType, Field, Schema};
    use std::sync::Arc;

    #[test]
    fn roundtrip_with_meta_and_stable_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let schema = Arc::new(Schema::new(vec![
            Field::new("a", DataType::Utf8, false),
            Field::new("b", DataType::UInt32, false),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(StringArray::from(vec!["x", "y"])), Arc::new(UInt32Array::from(vec![1, 2]))],
        )
        .unwrap();
        let meta =
            ShardMeta { fingerprint: "f".into(), counters: [("rows".to_owned(), 2)].into(), ..Default::default() };
        let p1 = dir.path().join("s/one.parquet");
        let p2 = dir.path().join("s/two.parquet");
        write_parquet(&p1, &schema, std::slice::from_ref(&batch), &meta).unwrap();
        write_parquet(&p2, &schema, std::slice::from_ref(&batch), &meta).unwrap();
        assert_eq!(fs::read(&p1).unwrap(), fs::read(&p2).unwrap());
        assert_eq!(read_parquet(&p1).unwrap(), vec![batch]);
        assert_eq!(read_meta(&p1).unwrap(), Some(meta));
        // No temporary file is left behind.
        assert_eq!(fs::read_dir(dir.path().join("s")).unwrap().count(), 2);
    }

    #[test]
    fn shard_checks_catch_any_changed_byte_and_a_moved_file() {
        let dir = tempfile::tempdir().unwrap();
        let schema = Arc::new(Schema::new(vec![Field::new("a", DataType::UInt32, false)]));
        let batch =
            RecordBatch::try_new(schema.clone(), vec![Arc::new(UInt32Array::from((0..500).collect::<Vec<u32>>()))])
                .unwrap();
        let p = dir.path().join("scores/shard-00001.parquet");
        write_shard(&p, &schema, std::slice::from_ref(&batch), &ShardMeta::default()).unwrap();
        // Passes only as an intact shard of this fingerprint; a garbled footer is one to remake.
        let verify = |p: &Path| match read_checked(p, "") {
            Ok(Some(r)) => r.map(|_| ()),
            Ok(None) => Err("not a shard of this configuration".to_owned()),
            Err(e) => Err(e.to_string()),
        };
        verify(&p).unwrap();
        assert_eq!(read_parquet(&p).unwrap(), vec![batch.clone()]);
        let good = fs::read(&p).unwrap();
        // Every byte of the file counts, footer included.
        for at in (0..good.len()).step_by(7) {
            let mut bad = good.clone();
            bad[at] ^= 0x01;
            fs::write(&p, &bad).unwrap();
            assert!(verify(&p).is_err(), "a flip at byte {at} of {} passed", good.len());
        }
        let other = dir.path().join("scores/shard-00002.parquet");
        fs::write(&other, &good).unwrap();
        assert!(verify(&other).unwrap_err().contains("holds scores/shard-00001.parquet"));
        // Files written without a check (exports, reports) are not shards.
        write_parquet(&p, &schema, &[batch], &ShardMeta::default()).unwrap();
        assert!(verify(&p).unwrap_err().contains("no check"));
    }
}
