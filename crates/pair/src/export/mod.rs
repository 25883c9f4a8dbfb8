//! Trainer-ready exports: `pairs/<method>/beta=<β>/train-0000i-of-0000N.parquet` plus a dataset
//! card, merged from the pair shards in shard order (so the bytes do not depend on how many
//! processes made the shards). This module merges; [`parts`] writes part files, [`staged`]
//! swaps finished folders into place, [`rows`] builds the SFT and vBoN rows and [`cards`]
//! renders the dataset cards.

mod cards;
mod parts;
mod rows;
mod staged;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::PathBuf;
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, UInt32Type};
use arrow_array::{Array, BooleanArray, Float64Array, RecordBatch, StringArray};
use rbon_core::schema::{self, BETA, METHOD, sft_schema, vbon_schema};
use rbon_core::shard;
use rbon_core::stage::counter;
use rbon_core::tables::{self, SampleScores};
use rbon_core::{CoreError, Message, RunDir, StageName};
use rbon_regularize::{Method, SelectConfig};

pub use cards::{CardEntry, dataset_card, index_card, sft_card, vbon_card};
use parts::Parts;
use rows::{sft_batch, vbon_batch};
use staged::Staged;

use crate::config::{FileFormat, MarginColumn, PairConfig, PairFormat};
use crate::format::{self, ChatRender};
use crate::stage::{PairError, export_key};

/// Rows per exported Parquet file.
pub const ROWS_PER_FILE: usize = 100_000;
/// Rows per row group in exports: bounds the memory of the writers open at once, one per
/// (method, β), each holding at most about two row groups.
const ROW_GROUP_ROWS: usize = 1024;

/// What the dataset cards say about the run.
#[derive(Debug, Clone)]
pub struct CardContext<'a> {
    pub run_name: &'a str,
    pub version: &'a str,
    pub select: &'a SelectConfig,
    pub pair: &'a PairConfig,
    /// The frozen pipeline YAML.
    pub config_text: &'a str,
}

/// One finished export.
#[derive(Debug, Clone, PartialEq)]
pub struct Export {
    pub method: Method,
    pub beta: f64,
    pub dir: PathBuf,
    pub files: Vec<PathBuf>,
    /// The SFT export's files, when `pair.sft` is on.
    pub sft_files: Vec<PathBuf>,
    pub counts: BTreeMap<String, u64>,
}

/// The file name of part `i` of `n`: `train-00000-of-00003.parquet`, the layout the Hugging Face
/// Hub and `load_dataset` read as a train split.
pub fn part_name(i: usize, n: usize) -> String {
    part_file(i, n, FileFormat::Parquet)
}

/// [`part_name`] with the extension of `format`.
pub fn part_file(i: usize, n: usize, format: FileFormat) -> String {
    format!("train-{i:05}-of-{n:05}.{}", format.extension())
}

/// How an export is written besides what the config says.
#[derive(Clone, Copy, Default)]
pub struct ExportOptions<'a> {
    /// Renders prompts and responses for `pair.format: standard` (the policy's chat template).
    pub render: Option<&'a dyn ChatRender>,
}

impl std::fmt::Debug for ExportOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportOptions").field("render", &self.render.is_some()).finish()
    }
}

/// Writes every export from the shards, replacing earlier files: the pairs of each (method, β),
/// and when configured their SFT halves and the vBoN table. `counts[key]` holds each export's
/// summed pair counters (from the shards' details); `prompts` and `samples` are the run's totals.
/// `opts.render` is required by `pair.format: standard`. Conversational exports also get
/// `pairs/dataset_info.json` for LLaMA-Factory.
pub fn write_exports_with(
    run: &RunDir,
    shards: usize,
    exports: &[(Method, f64)],
    counts: &BTreeMap<String, BTreeMap<String, u64>>,
    totals: (usize, usize),
    card: &CardContext,
    opts: ExportOptions,
) -> Result<Vec<Export>, PairError> {
    let (prompts, samples) = totals;
    let file_format = card.pair.file_format;
    let render = match (card.pair.format, opts.render) {
        (PairFormat::Standard, None) => {
            return Err(PairError::Core(CoreError::internal(
                "pair.format: standard needs the policy's chat template to render the pairs, and none was given",
            )));
        }
        (PairFormat::Standard, r) => r,
        (PairFormat::Conversational, _) => None,
    };
    let export_schema = match render {
        Some(_) => schema::pairs_standard_schema(),
        None => schema::pairs_export_schema(),
    };
    // `pair.margin: none` leaves the margin column out of the exports.
    let keep: Vec<usize> = (0..export_schema.fields().len())
        .filter(|&i| card.pair.margin == MarginColumn::Proxy || export_schema.field(i).name() != schema::MARGIN)
        .collect();
    let export_schema = Arc::new(export_schema.project(&keep).map_err(|e| CoreError::internal(format!("pairs: {e}")))?);
    let pairs_dir = run.stage_dir(StageName::Pairs);
    let count = |key: &str| counts.get(key).and_then(|c| c.get(counter::PAIRS)).copied().unwrap_or(0) as usize;
    let mut staged = Vec::new();
    let mut dpo = Vec::new();
    let mut sft = Vec::new();
    for &(m, b) in exports {
        let st = Staged::new(pairs_dir.join(export_key(m, b)))?;
        dpo.push(Parts::create(st.tmp.clone(), export_schema.clone(), count(&export_key(m, b)), file_format)?);
        if card.pair.sft {
            sft.push(Parts::create(st.tmp.join(SFT_DIR), sft_schema(), prompts, file_format)?);
        }
        staged.push(st);
    }
    let vbon_dir = run.root().join(VBON_DIR);
    let mut vbon = match card.pair.vbon {
        true => {
            let st = Staged::new(vbon_dir.clone())?;
            let parts = Parts::create(st.tmp.clone(), vbon_schema(), samples, file_format)?;
            Some((st, parts))
        }
        false => {
            if vbon_dir.exists() {
                fs::remove_dir_all(&vbon_dir).map_err(|e| CoreError::io(&vbon_dir, e))?;
            }
            None
        }
    };
    for i in 0..shards {
        let path = run.shard_path(StageName::Pairs, i);
        for batch in shard::read_parquet(&path)? {
            let (methods, betas) = method_beta(&batch, &path)?;
            for (parts, &(m, b)) in dpo.iter_mut().zip(exports) {
                let rows = filter(&batch, &mask(&methods, &betas, m, b))?;
                if rows.num_rows() == 0 {
                    continue;
                }
                let rows = match render {
                    Some(r) => format::standard_batch(&rows, r)?,
                    None => format::conversational_batch(&rows)?,
                };
                parts.write(rows.project(&keep).map_err(|e| CoreError::internal(format!("pairs: {e}")))?)?;
            }
        }
        if !card.pair.sft && vbon.is_none() {
            continue;
        }
        let prompt_rows = tables::read_prompts_shard(run, i)?;
        let prompt_of: HashMap<&str, &[Message]> =
            prompt_rows.iter().map(|(id, m)| (id.as_str(), m.as_slice())).collect();
        let data = SampleScores::read(run, i)?;
        if card.pair.sft {
            let row_of: HashMap<(&str, u32), usize> =
                (0..data.prompt_ids.len()).map(|r| ((data.prompt_ids[r].as_str(), data.sample_idx[r]), r)).collect();
            let sel_path = run.shard_path(StageName::Selections, i);
            for batch in shard::read_parquet(&sel_path)? {
                let (methods, betas) = method_beta(&batch, &sel_path)?;
                let not_sel = || CoreError::internal(format!("{}: not a selections shard", sel_path.display()));
                let index =
                    batch.column_by_name(schema::INDEX).ok_or_else(not_sel)?.as_primitive::<UInt32Type>().clone();
                let ids = batch.column_by_name(schema::PROMPT_ID).ok_or_else(not_sel)?.as_string::<i32>().clone();
                for (parts, &(m, b)) in sft.iter_mut().zip(exports) {
                    let picks: Vec<(&str, u32)> = (0..batch.num_rows())
                        .filter(|&r| methods.value(r) == m.as_str() && betas.value(r) == b && index.is_valid(r))
                        .map(|r| (ids.value(r), index.value(r)))
                        .collect();
                    parts.write(sft_batch(&picks, m, b, &prompt_of, &row_of, &data)?)?;
                }
            }
        }
        if let Some((_, v)) = vbon.as_mut() {
            v.write(vbon_batch(card.select, &prompt_of, &data)?)?;
        }
    }
    let mut out = Vec::new();
    let mut info: Vec<(String, Vec<String>)> = Vec::new();
    let mut entries: Vec<CardEntry> = Vec::new();
    let ext = file_format.extension();
    let mut sft = sft.into_iter();
    for ((parts, st), &(m, b)) in dpo.into_iter().zip(staged).zip(exports) {
        let names = parts.finish()?;
        let c = counts.get(&export_key(m, b)).cloned().unwrap_or_default();
        shard::write_atomic(&st.tmp.join(README), dataset_card(card, m, b, &c, names.len())?.as_bytes())?;
        let sft_names = match sft.next() {
            Some(p) => {
                let names = p.finish()?;
                let text = sft_card(card, m, b, prompts, names.len())?;
                shard::write_atomic(&st.tmp.join(SFT_DIR).join(README), text.as_bytes())?;
                names
            }
            None => Vec::new(),
        };
        let dir = st.commit()?;
        let key = export_key(m, b);
        // An export without pairs gets no configuration: `datasets` cannot read its empty part.
        let rows = c.get(counter::PAIRS).copied().unwrap_or(0);
        if rows > 0 {
            entries.push(CardEntry {
                method: m,
                beta: b,
                sft: false,
                rows,
                glob: format!("{key}/train-*.{ext}"),
                card: format!("{key}/{README}"),
            });
        }
        if !sft_names.is_empty() {
            entries.push(CardEntry {
                method: m,
                beta: b,
                sft: true,
                rows: prompts as u64,
                glob: format!("{key}/{SFT_DIR}/train-*.{ext}"),
                card: format!("{key}/{SFT_DIR}/{README}"),
            });
        }
        info.push((format!("{}_beta={b}", m.as_str()), names.iter().map(|n| format!("{key}/{n}")).collect()));
        let files = names.iter().map(|n| dir.join(n)).collect();
        let sft_files = sft_names.iter().map(|n| dir.join(SFT_DIR).join(n)).collect();
        out.push(Export { method: m, beta: b, dir, files, sft_files, counts: c });
    }
    if let Some((st, v)) = vbon {
        let names = v.finish()?;
        shard::write_atomic(&st.tmp.join(README), vbon_card(card, samples, names.len())?.as_bytes())?;
        st.commit()?;
    }
    // The pairs folder as one Hugging Face dataset, a configuration per export.
    let index_path = pairs_dir.join(README);
    if entries.is_empty() {
        if index_path.exists() {
            fs::remove_file(&index_path).map_err(|e| CoreError::io(&index_path, e))?;
        }
    } else {
        shard::write_atomic(&index_path, index_card(card, &entries)?.as_bytes())?;
    }
    // LLaMA-Factory reads the conversational exports through this file (`dataset_dir: <run>/pairs`).
    let info_path = pairs_dir.join(DATASET_INFO);
    if render.is_none() && !info.is_empty() {
        shard::write_atomic(&info_path, format::dataset_info(&info).as_bytes())?;
    } else if info_path.exists() {
        fs::remove_file(&info_path).map_err(|e| CoreError::io(&info_path, e))?;
    }
    Ok(out)
}

fn method_beta(batch: &RecordBatch, path: &std::path::Path) -> Result<(StringArray, Float64Array), CoreError> {
    let methods = batch.column_by_name(METHOD).map(|c| c.as_string::<i32>().clone());
    let betas = batch.column_by_name(BETA).map(|c| c.as_primitive::<Float64Type>().clone());
    match (methods, betas) {
        (Some(m), Some(b)) => Ok((m, b)),
        _ => Err(CoreError::internal(format!("{}: has no method/beta columns", path.display()))),
    }
}

fn mask(methods: &StringArray, betas: &Float64Array, m: Method, b: f64) -> BooleanArray {
    (0..methods.len()).map(|r| Some(methods.value(r) == m.as_str() && betas.value(r) == b)).collect()
}

/// LLaMA-Factory's dataset registry, written at `pairs/dataset_info.json`.
pub const DATASET_INFO: &str = "dataset_info.json";

/// Folder of the variational-BoN export in the run directory.
pub use rbon_core::rundir::VBON_DIR;
/// Folder of an export's SFT half, inside the export's folder.
pub const SFT_DIR: &str = "sft";
/// Every export folder's dataset card.
pub const README: &str = "README.md";

fn filter(batch: &RecordBatch, mask: &BooleanArray) -> Result<RecordBatch, CoreError> {
    let cols = batch
        .columns()
        .iter()
        .map(|c| arrow_select::filter::filter(c.as_ref(), mask))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CoreError::internal(format!("pairs: {e}")))?;
    RecordBatch::try_new(batch.schema(), cols).map_err(|e| CoreError::internal(format!("pairs: {e}")))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::path::Path;

    use arrow_array::UInt32Array;
    use rbon_core::Message;
    use rbon_core::messages::read_messages;

    use super::*;
    use crate::stage::{DropReason, PairRow, pairs_batch};
    use rbon_core::shard::ShardMeta;

    fn row(pid: &str, method: Method, beta: f64, chosen_index: u32) -> PairRow {
        PairRow {
            prompt_id: pid.to_owned(),
            method,
            beta,
            prompt: vec![Message::user(format!("question {pid}"))],
            chosen: format!("{pid} good {chosen_index}"),
            rejected: format!("{pid} bad"),
            chosen_index,
            rejected_index: 99,
            score_chosen: 1.5,
            score_rejected: -0.5,
            margin: 2.0,
        }
    }

    fn counters(pairs: u64, same: u64) -> BTreeMap<String, u64> {
        let mut c: BTreeMap<String, u64> = DropReason::ALL.map(|d| (d.counter().to_owned(), 0)).into_iter().collect();
        c.insert("pairs".into(), pairs);
        c.insert("dropped_same_index".into(), same);
        c
    }

    /// Every file under `dir`, relative path → bytes.
    fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
        let mut out = BTreeMap::new();
        let mut stack = vec![dir.to_owned()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.insert(p.strip_prefix(dir).unwrap().to_owned(), fs::read(&p).unwrap());
                }
            }
        }
        out
    }

    /// (prompt_id, method, beta, chosen_index, chosen text) of every row of a Parquet file.
    fn read_rows(path: &Path) -> Vec<(String, String, f64, u32, String)> {
        let mut out = Vec::new();
        for b in shard::read_parquet(path).unwrap() {
            assert_eq!(b.schema(), schema::pairs_export_schema());
            let single = b.column_by_name("chosen_message").unwrap().as_struct();
            let ids = b.column_by_name("prompt_id").unwrap().as_string::<i32>();
            let methods = b.column_by_name("method").unwrap().as_string::<i32>();
            let betas = b.column_by_name("beta").unwrap().as_primitive::<Float64Type>();
            let idx = b.column_by_name("chosen_index").unwrap().as_any().downcast_ref::<UInt32Array>().unwrap();
            let chosen = b.column_by_name("chosen").unwrap();
            for r in 0..b.num_rows() {
                let c = read_messages(chosen.as_ref(), r).unwrap();
                assert_eq!(c.len(), 1);
                assert_eq!(c[0].role, "assistant");
                let content = single.column_by_name("content").unwrap().as_string::<i32>().value(r);
                let role = single.column_by_name("role").unwrap().as_string::<i32>().value(r);
                assert_eq!((role, content), ("assistant", c[0].content.as_str()));
                out.push((
                    ids.value(r).to_owned(),
                    methods.value(r).to_owned(),
                    betas.value(r),
                    idx.value(r),
                    c[0].content.clone(),
                ));
            }
        }
        out
    }

    /// Shard `i` of the pairs stage, holding `rows`.
    fn write_pairs_shard(run: &RunDir, i: usize, rows: &[PairRow]) {
        let batch = pairs_batch(rows).unwrap();
        let path = run.shard_path(StageName::Pairs, i);
        shard::write_parquet(&path, &schema::pairs_schema(), &[batch], &ShardMeta::default()).unwrap();
    }
    #[test]
    fn exports_follow_shard_order_filter_by_method_and_beta_and_are_reproducible() {
        let tmp = tempfile::tempdir().unwrap();
        let run = RunDir::create(&tmp.path().join("run")).unwrap();
        let shards = [
            vec![
                row("p0", Method::Bon, 0.0, 1),
                row("p0", Method::RbonKl, 0.5, 2),
                row("p1", Method::Bon, 0.0, 3),
                row("p1", Method::RbonKl, 1.0, 4),
            ],
            vec![row("p2", Method::Bon, 0.0, 5), row("p2", Method::RbonKl, 0.5, 6), row("p3", Method::RbonKl, 0.5, 7)],
        ];
        for (i, rows) in shards.iter().enumerate() {
            write_pairs_shard(&run, i, rows);
        }
        // Parts left by an earlier run with another part count must not survive.
        let stale = run.stage_dir(StageName::Pairs).join("bon/beta=0/train-00001-of-00002.parquet");
        fs::create_dir_all(stale.parent().unwrap()).unwrap();
        fs::write(&stale, b"stale").unwrap();

        let exports = [(Method::Bon, 0.0), (Method::RbonKl, 0.5), (Method::RbonKl, 1.0), (Method::Mbr, 0.0)];
        let counts = BTreeMap::from([
            ("bon/beta=0".to_owned(), counters(3, 2)),
            ("rbon_kl/beta=0.5".to_owned(), counters(3, 0)),
            ("rbon_kl/beta=1".to_owned(), counters(1, 4)),
            ("mbr/beta=0".to_owned(), counters(0, 5)),
        ]);
        let select = SelectConfig {
            proxy: "proxy".into(),
            gold: vec![],
            methods: vec![Method::Bon, Method::RbonKl, Method::Mbr],
            betas: vec![0.5, 1.0],
            lambdas: vec![],
            tune: None,
        };
        let pair = PairConfig::default();
        let config_text = "name: export-test\nseed: 0\n";
        let card = CardContext { run_name: "export-test", version: "9.9.9", select: &select, pair: &pair, config_text };

        let out = write_exports_with(&run, 2, &exports, &counts, (0, 0), &card, ExportOptions::default()).unwrap();
        assert!(!stale.exists(), "stale part survived");
        assert_eq!(out.len(), 4);
        let pairs_dir = run.stage_dir(StageName::Pairs);
        let expect: [(&str, &[(&str, u32)]); 4] = [
            ("bon/beta=0", &[("p0", 1), ("p1", 3), ("p2", 5)]),
            ("rbon_kl/beta=0.5", &[("p0", 2), ("p2", 6), ("p3", 7)]),
            ("rbon_kl/beta=1", &[("p1", 4)]),
            ("mbr/beta=0", &[]),
        ];
        for (e, ((method, beta), (key, rows))) in out.iter().zip(exports.iter().zip(expect)) {
            assert_eq!((e.method, e.beta), (*method, *beta));
            assert_eq!(e.dir, pairs_dir.join(key));
            assert_eq!(e.files, vec![pairs_dir.join(key).join("train-00000-of-00001.parquet")]);
            assert_eq!(e.counts, counts[key]);
            let got = read_rows(&e.files[0]);
            let want: Vec<_> = rows
                .iter()
                .map(|&(p, i)| (p.to_owned(), method.as_str().to_owned(), *beta, i, format!("{p} good {i}")))
                .collect();
            assert_eq!(got, want, "{key}");
            let names: Vec<String> =
                fs::read_dir(&e.dir).unwrap().map(|f| f.unwrap().file_name().to_string_lossy().into_owned()).collect();
            let mut names = names;
            names.sort();
            assert_eq!(names, ["README.md", "train-00000-of-00001.parquet"], "{key}");

            let readme = fs::read_to_string(e.dir.join("README.md")).unwrap();
            let c = &counts[key];
            assert!(readme.contains(&format!("| pairs written | {} |", c["pairs"])), "{readme}");
            assert!(readme.contains(&format!("| dropped same index | {} |", c["dropped_same_index"])), "{readme}");
            assert!(readme.contains("| dropped identical text | 0 |"), "{readme}");
            assert!(readme.contains("| dropped below margin | 0 |"), "{readme}");
            assert!(readme.contains(config_text.trim_end()), "{readme}");
            assert!(readme.contains("rbon 9.9.9"), "{readme}");
            assert!(readme.starts_with("---\n"), "{readme}");
            assert_eq!(readme.contains(&format!("β = {beta}")), method.uses_beta(), "{readme}");
        }

        let first = snapshot(&pairs_dir);
        // Two pair shards, a card and a file per export, LLaMA-Factory's registry and the
        // folder's own card.
        assert_eq!(first.len(), 4 + 2 * exports.len(), "{:?}", first.keys());
        let index = String::from_utf8(first[Path::new("README.md")].clone()).unwrap();
        let front = index.split("---\n").nth(1).unwrap();
        // mbr exported no pair: its empty part has no configuration (`datasets` cannot read it).
        assert!(!front.contains("mbr-beta=0"), "{front}");
        for (key, name) in [
            ("bon/beta=0", "bon-beta=0"),
            ("rbon_kl/beta=0.5", "rbon_kl-beta=0.5"),
            ("rbon_kl/beta=1", "rbon_kl-beta=1"),
        ] {
            let entry = format!(
                "- config_name: \"{name}\"\n  data_files:\n  - split: train\n    path: \"{key}/train-*.parquet\"\n"
            );
            assert!(front.contains(&entry), "{front}");
        }
        assert!(front.starts_with("license: unknown\ntask_categories:\n- text-generation\n"), "{front}");
        assert!(front.contains("size_categories:\n- n<1K\n"), "{front}");
        assert!(index.contains("| `rbon_kl-beta=0.5` | rbon_kl | 0.5 | 3 |"), "{index}");
        let info: serde_json::Value = serde_json::from_slice(&first[Path::new("dataset_info.json")]).unwrap();
        assert_eq!(info["rbon_kl_beta=0.5"]["file_name"], "rbon_kl/beta=0.5/train-00000-of-00001.parquet");
        assert_eq!(info.as_object().unwrap().len(), exports.len());
        let again = write_exports_with(&run, 2, &exports, &counts, (0, 0), &card, ExportOptions::default()).unwrap();
        assert_eq!(again, out);
        assert!(first == snapshot(&pairs_dir), "a rerun changed the bytes of an export");
    }

    #[test]
    fn a_large_export_is_split_into_parts_of_rows_per_file() {
        let tmp = tempfile::tempdir().unwrap();
        let run = RunDir::create(tmp.path()).unwrap();
        let n = ROWS_PER_FILE + 3;
        // Two shards, the first ending short of a part boundary, the second crossing it.
        let rows: Vec<PairRow> = (0..n).map(|i| row(&format!("p{i}"), Method::Bon, 0.0, i as u32)).collect();
        let cut = ROWS_PER_FILE - 2;
        for (i, part) in [&rows[..cut], &rows[cut..]].into_iter().enumerate() {
            write_pairs_shard(&run, i, part);
        }
        let counts = BTreeMap::from([("bon/beta=0".to_owned(), counters(n as u64, 0))]);
        let select = SelectConfig {
            proxy: "proxy".into(),
            gold: vec![],
            methods: vec![Method::Bon],
            betas: vec![],
            lambdas: vec![],
            tune: None,
        };
        let pair = PairConfig::default();
        let card = CardContext { run_name: "big", version: "0", select: &select, pair: &pair, config_text: "" };
        let out = write_exports_with(&run, 2, &[(Method::Bon, 0.0)], &counts, (0, 0), &card, ExportOptions::default())
            .unwrap();
        let dir = run.stage_dir(StageName::Pairs).join("bon/beta=0");
        assert_eq!(
            out[0].files,
            vec![dir.join("train-00000-of-00002.parquet"), dir.join("train-00001-of-00002.parquet")]
        );
        let idx = |p: &Path| -> Vec<u32> {
            shard::read_parquet(p)
                .unwrap()
                .iter()
                .flat_map(|b| {
                    let c = b.column_by_name("chosen_index").unwrap();
                    c.as_any().downcast_ref::<UInt32Array>().unwrap().values().to_vec()
                })
                .collect()
        };
        let (a, b) = (idx(&out[0].files[0]), idx(&out[0].files[1]));
        assert_eq!(a.len(), ROWS_PER_FILE);
        assert_eq!(b, [ROWS_PER_FILE as u32, ROWS_PER_FILE as u32 + 1, ROWS_PER_FILE as u32 + 2]);
        assert!(a.iter().enumerate().all(|(i, &x)| x == i as u32));
        assert!(fs::read_to_string(dir.join("README.md")).unwrap().contains("Files: 2"));
    }

    /// Renders `role: content` lines; the generation prompt is `assistant:`, EOS is `</s>`.
    struct Lines;

    impl ChatRender for Lines {
        fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, String> {
            let mut s: String = messages.iter().map(|m| format!("{}: {}</s>\n", m.role, m.content)).collect();
            if add_generation_prompt {
                s.push_str("assistant: ");
            }
            Ok(s)
        }
        fn eos(&self) -> Option<String> {
            Some("</s>".into())
        }
    }

    #[test]
    fn standard_jsonl_exports_render_strings_without_a_trailing_eos() {
        let tmp = tempfile::tempdir().unwrap();
        let run = RunDir::create(tmp.path()).unwrap();
        let rows = vec![row("p0", Method::Bon, 0.0, 1), row("p1", Method::Bon, 0.0, 2)];
        write_pairs_shard(&run, 0, &rows);
        // A registry left by an earlier conversational export must not survive.
        fs::write(run.stage_dir(StageName::Pairs).join(DATASET_INFO), "{}").unwrap();
        let select = SelectConfig {
            proxy: "proxy".into(),
            gold: vec![],
            methods: vec![Method::Bon],
            betas: vec![],
            lambdas: vec![],
            tune: None,
        };
        let pair = PairConfig { format: PairFormat::Standard, file_format: FileFormat::Jsonl, ..Default::default() };
        let card = CardContext { run_name: "s", version: "0", select: &select, pair: &pair, config_text: "" };
        let counts = BTreeMap::from([("bon/beta=0".to_owned(), counters(2, 0))]);
        let exports = [(Method::Bon, 0.0)];
        let err = write_exports_with(&run, 1, &exports, &counts, (0, 0), &card, ExportOptions::default()).unwrap_err();
        assert!(err.to_string().contains("chat template"), "{err}");
        let opts = ExportOptions { render: Some(&Lines) };
        let out = write_exports_with(&run, 1, &exports, &counts, (0, 0), &card, opts).unwrap();
        let file = run.stage_dir(StageName::Pairs).join("bon/beta=0/train-00000-of-00001.jsonl");
        assert_eq!(out[0].files, vec![file.clone()]);
        assert!(!run.stage_dir(StageName::Pairs).join(DATASET_INFO).exists());
        let text = fs::read_to_string(&file).unwrap();
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["prompt"], "user: question p0</s>\nassistant: ");
        assert_eq!(lines[0]["chosen"], "p0 good 1");
        assert_eq!(lines[0]["rejected"], "p0 bad");
        assert_eq!(lines[1]["chosen_index"], 2);
        assert_eq!(lines[1]["margin"], 2.0);
        // Keys keep the column order of the schema.
        assert!(text.starts_with("{\"prompt_id\":\"p0\",\"method\":\"bon\",\"beta\":0.0,"), "{text}");
        let readme = fs::read_to_string(file.with_file_name("README.md")).unwrap();
        assert!(readme.contains("train-*.jsonl") && readme.contains("Standard"), "{readme}");
    }
    #[test]
    fn margin_none_leaves_the_column_out_and_the_card_names_the_license_and_tags() {
        let tmp = tempfile::tempdir().unwrap();
        let run = RunDir::create(&tmp.path().join("run")).unwrap();
        write_pairs_shard(&run, 0, &[row("p0", Method::Bon, 0.0, 1), row("p1", Method::Bon, 0.0, 2)]);
        let select = SelectConfig {
            proxy: "proxy".into(),
            gold: vec![],
            methods: vec![Method::Bon],
            betas: vec![],
            lambdas: vec![],
            tune: None,
        };
        let pair = PairConfig {
            margin: MarginColumn::None,
            card: crate::config::CardConfig { license: "cc-by-4.0".into(), tags: vec!["my \"tag\"".into()] },
            ..PairConfig::default()
        };
        let card = CardContext { run_name: "m", version: "9.9.9", select: &select, pair: &pair, config_text: "" };
        let counts = BTreeMap::from([("bon/beta=0".to_owned(), counters(2, 0))]);
        let out = write_exports_with(&run, 1, &[(Method::Bon, 0.0)], &counts, (0, 0), &card, ExportOptions::default())
            .unwrap();
        let batches = shard::read_parquet(&out[0].files[0]).unwrap();
        let names: Vec<String> = batches[0].schema().fields().iter().map(|f| f.name().clone()).collect();
        let want: Vec<String> =
            schema::pairs_export_schema().fields().iter().map(|f| f.name().clone()).filter(|n| n != "margin").collect();
        assert_eq!(names, want);
        assert_eq!(batches[0].num_rows(), 2);
        let index = fs::read_to_string(run.stage_dir(StageName::Pairs).join(README)).unwrap();
        assert!(index.starts_with("---\nlicense: cc-by-4.0\n"), "{index}");
        assert!(index.contains("- \"my \\\"tag\\\"\"\n"), "{index}");
        assert!(!index.contains("margin loss"), "{index}");
        assert!(!fs::read_to_string(out[0].dir.join(README)).unwrap().contains("| margin |"));
        // The default keeps it, and says what OpenRLHF does with it.
        let card = CardContext { pair: &PairConfig::default(), ..card };
        let out = write_exports_with(&run, 1, &[(Method::Bon, 0.0)], &counts, (0, 0), &card, ExportOptions::default())
            .unwrap();
        assert_eq!(shard::read_parquet(&out[0].files[0]).unwrap()[0].schema(), schema::pairs_export_schema());
        let index = fs::read_to_string(run.stage_dir(StageName::Pairs).join(README)).unwrap();
        assert!(index.contains("margin loss") && index.contains("license: unknown"), "{index}");
    }
}
