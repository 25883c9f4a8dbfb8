//! Trainer-ready exports: `pairs/<method>/beta=<β>/train-0000i-of-0000N.parquet` plus a dataset
//! card, merged from the pair shards in shard order (so the bytes do not depend on how many
//! processes made the shards).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::PathBuf;

use arrow_array::cast::AsArray;
use arrow_array::types::Float64Type;
use arrow_array::{BooleanArray, RecordBatch};
use rbon_core::schema::{self, BETA, METHOD};
use rbon_core::shard::{self, ParquetSink, ShardMeta};
use rbon_core::{CoreError, RunDir};
use rbon_regularize::{Method, SelectConfig};

use crate::config::PairConfig;
use crate::stage::{DropReason, PairError, export_key};

/// Rows per exported Parquet file.
pub const ROWS_PER_FILE: usize = 100_000;
/// Rows per row group in exports: bounds the memory of the writers open at once.
const ROW_GROUP_ROWS: usize = 4096;

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
    pub counts: BTreeMap<String, u64>,
}

/// The file name of part `i` of `n`: `train-00000-of-00003.parquet`, the layout the Hugging Face
/// Hub and `load_dataset` read as a train split.
pub fn part_name(i: usize, n: usize) -> String {
    format!("train-{i:05}-of-{n:05}.parquet")
}

/// Writes every export from the `pairs` stage's shards, replacing earlier files.
/// `counts[key]` holds each export's summed counters (from the shards' details).
pub fn write_exports(
    run: &RunDir,
    shards: usize,
    exports: &[(Method, f64)],
    counts: &BTreeMap<String, BTreeMap<String, u64>>,
    card: &CardContext,
) -> Result<Vec<Export>, PairError> {
    let pairs_dir = run.stage_dir("pairs");
    let schema = schema::pairs_schema();
    struct Open {
        method: Method,
        beta: f64,
        dir: PathBuf,
        parts: usize,
        files: Vec<PathBuf>,
        sink: Option<ParquetSink>,
    }
    let mut open: Vec<Open> = Vec::new();
    for &(method, beta) in exports {
        let key = export_key(method, beta);
        let dir = pairs_dir.join(&key);
        // Earlier files may have another part count; stale parts must not be loaded with new ones.
        if dir.exists() {
            fs::remove_dir_all(&dir).map_err(|e| CoreError::io(&dir, e))?;
        }
        let n = counts.get(&key).and_then(|c| c.get("pairs")).copied().unwrap_or(0) as usize;
        open.push(Open { method, beta, dir, parts: n.div_ceil(ROWS_PER_FILE).max(1), files: Vec::new(), sink: None });
    }
    let meta = ShardMeta::default();
    let start = |o: &mut Open| -> Result<(), CoreError> {
        let path = o.dir.join(part_name(o.files.len(), o.parts));
        o.sink = Some(ParquetSink::create(&path, &schema, &meta, Some(ROW_GROUP_ROWS))?);
        o.files.push(path);
        Ok(())
    };
    for o in &mut open {
        start(o)?;
    }
    for i in 0..shards {
        let path = run.shard_path("pairs", i);
        for batch in shard::read_parquet(&path)? {
            let methods = batch.column_by_name(METHOD).map(|c| c.as_string::<i32>().clone());
            let betas = batch.column_by_name(BETA).map(|c| c.as_primitive::<Float64Type>().clone());
            let (Some(methods), Some(betas)) = (methods, betas) else {
                return Err(CoreError::data(path.display().to_string(), "not a pairs shard").into());
            };
            for o in &mut open {
                let mask: BooleanArray = (0..batch.num_rows())
                    .map(|r| Some(methods.value(r) == o.method.as_str() && betas.value(r) == o.beta))
                    .collect();
                let mut part = filter(&batch, &mask)?;
                while part.num_rows() > 0 {
                    let sink = o.sink.as_mut().ok_or_else(|| CoreError::data("pairs", "export closed"))?;
                    let room = ROWS_PER_FILE - sink.rows();
                    if room == 0 {
                        // Counts come from the same shards' footers; more rows means they changed under us.
                        let key = export_key(o.method, o.beta);
                        return Err(
                            CoreError::data(key, "the pair shards hold more rows than their counters say").into()
                        );
                    }
                    let take = room.min(part.num_rows());
                    sink.write(&part.slice(0, take))?;
                    part = part.slice(take, part.num_rows() - take);
                    if sink.rows() == ROWS_PER_FILE && o.files.len() < o.parts {
                        if let Some(s) = o.sink.take() {
                            s.finish()?;
                        }
                        start(o)?;
                    }
                }
            }
        }
    }
    let mut out = Vec::new();
    for mut o in open {
        if let Some(s) = o.sink.take() {
            s.finish()?;
        }
        let key = export_key(o.method, o.beta);
        let c = counts.get(&key).cloned().unwrap_or_default();
        let text = dataset_card(card, o.method, o.beta, &c, o.files.len());
        shard::write_atomic(&o.dir.join("README.md"), text.as_bytes())?;
        out.push(Export { method: o.method, beta: o.beta, dir: o.dir, files: o.files, counts: c });
    }
    Ok(out)
}

fn filter(batch: &RecordBatch, mask: &BooleanArray) -> Result<RecordBatch, CoreError> {
    let cols = batch
        .columns()
        .iter()
        .map(|c| arrow_select::filter::filter(c.as_ref(), mask))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CoreError::data("pairs", e.to_string()))?;
    RecordBatch::try_new(batch.schema(), cols).map_err(|e| CoreError::data("pairs", e.to_string()))
}

/// The README.md of one export: Hub front matter, what the rows are, counts, and the config.
pub fn dataset_card(
    card: &CardContext,
    method: Method,
    beta: f64,
    counts: &BTreeMap<String, u64>,
    files: usize,
) -> String {
    let get = |k: &str| counts.get(k).copied().unwrap_or(0);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "---\ntags:\n- trl\n- dpo\n- rbon\n- preference\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: \"train-*.parquet\"\n---\n"
    );
    let beta_text = if method.uses_beta() { format!(", β = {beta}") } else { String::new() };
    let _ = writeln!(s, "# {}: `{}`{} preference pairs\n", card.run_name, method, beta_text);
    let _ = writeln!(
        s,
        "Made by rbon {} from N candidate responses per prompt. **chosen** is the pick of `{}`{}; \
         **rejected** is chosen by the `{}` rule. Format: Conversational / Type: Preference, with an \
         explicit prompt (TRL).\n",
        card.version,
        method,
        beta_text,
        card.pair.rejected.as_str()
    );
    let objective = match method {
        Method::Bon => "R_p(x, y)".to_owned(),
        Method::RbonKl => format!("R_p(x, y) + {beta} · log π_ref(y | x)"),
        Method::RbonWd => format!("R_p(x, y) − {beta} · WD(y)"),
        Method::Mbr => "− WD(y)".to_owned(),
        Method::RbonLen => format!("R_p(x, y) − {beta} / |y|"),
        Method::Oracle | Method::Random => String::new(),
    };
    let _ = writeln!(
        s,
        "Selection objective (argmax over the N samples, ties to the lowest index): `{objective}`, with proxy reward `{}`.\n",
        card.select.proxy
    );
    let _ = writeln!(s, "## Counts\n\n| | rows |\n|---|---|");
    let _ = writeln!(s, "| pairs written | {} |", get("pairs"));
    for d in DropReason::ALL {
        let _ = writeln!(s, "| {} | {} |", d.counter().replace('_', " "), get(d.counter()));
    }
    let _ = writeln!(s, "\nFiles: {files} (`train-*.parquet`).\n");
    let _ = writeln!(
        s,
        "## Columns\n\n| column | type | meaning |\n|---|---|---|\n\
         | prompt | list<struct<role, content>> | the conversation before the response |\n\
         | chosen | list<struct<role, content>> | one assistant message |\n\
         | rejected | list<struct<role, content>> | one assistant message |\n\
         | prompt_id | string | id of the prompt (input id column, or SHA-256 of the canonical prompt) |\n\
         | method, beta | string, float64 | the selection rule and its β (0 for rules without one) |\n\
         | chosen_index, rejected_index | uint32 | sample indices among the prompt's N candidates |\n\
         | score_chosen, score_rejected | float64 | proxy reward of each response |\n\
         | margin | float64 | score_chosen − score_rejected |\n"
    );
    let _ = writeln!(
        s,
        "## Training on it\n\n\
         - TRL: `load_dataset(\"parquet\", data_files=\"train-*.parquet\")` and pass it to `DPOTrainer`.\n\
         - OpenRLHF: `--dataset <this folder> --data.apply_chat_template --data.prompt_key prompt \
         --data.chosen_key chosen --data.rejected_key rejected`.\n"
    );
    let _ = writeln!(s, "## Pipeline\n\n```yaml\n{}\n```", card.config_text.trim_end());
    s
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::path::Path;

    use arrow_array::UInt32Array;
    use rbon_core::Message;
    use rbon_core::messages::read_messages;

    use super::*;
    use crate::stage::{PairRow, pairs_batch};

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
            assert_eq!(b.schema(), schema::pairs_schema());
            let ids = b.column_by_name("prompt_id").unwrap().as_string::<i32>();
            let methods = b.column_by_name("method").unwrap().as_string::<i32>();
            let betas = b.column_by_name("beta").unwrap().as_primitive::<Float64Type>();
            let idx = b.column_by_name("chosen_index").unwrap().as_any().downcast_ref::<UInt32Array>().unwrap();
            let chosen = b.column_by_name("chosen").unwrap();
            for r in 0..b.num_rows() {
                let c = read_messages(chosen.as_ref(), r).unwrap();
                assert_eq!(c.len(), 1);
                assert_eq!(c[0].role, "assistant");
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
            let b = pairs_batch(rows).unwrap();
            shard::write_parquet(&run.shard_path("pairs", i), &schema::pairs_schema(), &[b], &ShardMeta::default())
                .unwrap();
        }
        // Parts left by an earlier run with another part count must not survive.
        let stale = run.stage_dir("pairs").join("bon/beta=0/train-00001-of-00002.parquet");
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
        };
        let pair = PairConfig::default();
        let config_text = "name: export-test\nseed: 0\n";
        let card = CardContext { run_name: "export-test", version: "9.9.9", select: &select, pair: &pair, config_text };

        let out = write_exports(&run, 2, &exports, &counts, &card).unwrap();
        assert!(!stale.exists(), "stale part survived");
        assert_eq!(out.len(), 4);
        let pairs_dir = run.stage_dir("pairs");
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
        assert_eq!(first.len(), 2 + 2 * exports.len(), "{:?}", first.keys());
        let again = write_exports(&run, 2, &exports, &counts, &card).unwrap();
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
            let b = pairs_batch(part).unwrap();
            shard::write_parquet(&run.shard_path("pairs", i), &schema::pairs_schema(), &[b], &ShardMeta::default())
                .unwrap();
        }
        let counts = BTreeMap::from([("bon/beta=0".to_owned(), counters(n as u64, 0))]);
        let select = SelectConfig { proxy: "proxy".into(), gold: vec![], methods: vec![Method::Bon], betas: vec![] };
        let pair = PairConfig::default();
        let card = CardContext { run_name: "big", version: "0", select: &select, pair: &pair, config_text: "" };
        let out = write_exports(&run, 2, &[(Method::Bon, 0.0)], &counts, &card).unwrap();
        let dir = run.stage_dir("pairs").join("bon/beta=0");
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
}
