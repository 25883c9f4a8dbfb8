//! Merging a run: check that every shard of every stage exists with the run's fingerprints,
//! sum the counters into `manifest.json`, and write the trainer-ready exports (DESIGN §5). A
//! single-rank run does this at its end; with several ranks, `rbon finalize RUN_DIR` does it
//! once they are all done. Also `rbon status`: per-stage and per-rank progress of a run.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use rbon_core::rundir::EXPORT_ENTRY;
use rbon_core::shard::ShardMeta;
use rbon_core::stage::{counter, shard_index};
use rbon_core::{CoreError, Event, Manifest, Progress, RankState, RunDir, StageName, StageState};
use rbon_pair::export::{README, SFT_DIR, VBON_DIR};
use rbon_pair::{CardContext, ChatRender, Export, ExportOptions, PairConfig, export_key, write_exports_with};
use rbon_regularize::{SelectConfig, sweep};

use crate::outcome::{RunError, RunReport, StageReport, VERSION};
use crate::ranks::Ranks;

/// What merging needs to know about a run.
pub(crate) struct Merge<'a> {
    pub run: &'a RunDir,
    pub world_size: usize,
    pub n_shards: usize,
    pub chain: Vec<StageName>,
    pub fps: BTreeMap<StageName, String>,
    pub export_fp: String,
    pub name: &'a str,
    pub select: Option<&'a SelectConfig>,
    pub pair: &'a PairConfig,
    /// For `pair.format: standard`.
    pub policy: Option<&'a rbon_sample::PolicyConfig>,
    pub config_text: &'a str,
}

/// The merged state of a run.
pub(crate) struct Merged {
    pub stages: Vec<StageReport>,
    pub exports: Vec<Export>,
    pub exports_reused: bool,
    pub vbon_files: Vec<PathBuf>,
    pub report: Option<rbon_report::Report>,
}

/// The policy's chat template, for standard (plain-string) exports.
struct PolicyTemplate(rbon_models::ChatTokenizer);

impl ChatRender for PolicyTemplate {
    fn render(&self, messages: &[rbon_core::Message], add_generation_prompt: bool) -> Result<String, String> {
        self.0.render(messages, add_generation_prompt).map_err(|e| e.to_string())
    }

    /// What TRL and OpenRLHF append: the tokenizer's `eos_token` (Llama 3's `<|eot_id|>`, where
    /// generation_config's first EOS id is `<|end_of_text|>`), else the first EOS id's text.
    fn eos(&self) -> Option<String> {
        if let Some(t) = self.0.eos_token() {
            return Some(t.to_owned());
        }
        let id = *self.0.eos_ids().first()?;
        self.0.tokenizer().id_to_token(id)
    }
}

fn policy_template(policy: &rbon_sample::PolicyConfig) -> Result<PolicyTemplate, RunError> {
    let dir = rbon_models::ModelDir::resolve(&policy.model).map_err(rbon_sample::SampleError::from)?;
    let choice = rbon_models::chat::template_choice(&policy.chat_template, Path::new("."));
    let tok = rbon_models::ChatTokenizer::load(&dir, &choice).map_err(rbon_sample::SampleError::from)?;
    Ok(PolicyTemplate(tok))
}

/// Checks and merges every shard, then writes the exports. `known` holds footers already read.
pub(crate) fn merge(
    m: &Merge,
    known: &BTreeMap<StageName, BTreeMap<usize, ShardMeta>>,
    manifest: &mut Manifest,
    progress: &dyn Progress,
) -> Result<Merged, RunError> {
    let run = m.run;
    let mut metas: BTreeMap<StageName, Vec<ShardMeta>> = BTreeMap::new();
    let mut missing: BTreeMap<usize, Vec<(StageName, usize)>> = BTreeMap::new();
    for &stage in &m.chain {
        let fp = m.fps.get(&stage).map(String::as_str).unwrap_or_default();
        let mut v = Vec::with_capacity(m.n_shards);
        for i in 0..m.n_shards {
            let meta = match known.get(&stage).and_then(|k| k.get(&i)) {
                Some(meta) => Some(meta.clone()),
                None => run.finished_shard(stage, i, fp),
            };
            match meta {
                Some(meta) => v.push(meta),
                None => missing.entry(i % m.world_size.max(1)).or_default().push((stage, i)),
            }
        }
        metas.insert(stage, v);
    }
    if !missing.is_empty() {
        let lines: Vec<String> = missing
            .iter()
            .map(|(rank, v)| {
                let shown: Vec<String> = v.iter().take(4).map(|(s, i)| format!("{s} shard {i}")).collect();
                let more = if v.len() > 4 { format!(" and {} more", v.len() - 4) } else { String::new() };
                format!("rank {rank}: {}{more}", shown.join(", "))
            })
            .collect();
        return Err(RunError::NotFinished(format!(
            "not every shard is written; rerun these ranks with the same command: {}",
            lines.join("; ")
        )));
    }
    // Shards past the end belong to an earlier, larger split of the input.
    for stage in StageName::ALL {
        let dir = run.stage_dir(stage);
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let idx = rbon_core::stage::is_shard_file(&name).then(|| shard_index(&name)).flatten();
            if idx.is_some_and(|i: usize| i >= m.n_shards) {
                std::fs::remove_file(e.path()).map_err(|err| CoreError::io(e.path(), err))?;
            }
        }
    }

    manifest.rbon_version = VERSION.to_owned();
    manifest.name = m.name.to_owned();
    let mut stages = Vec::new();
    for &stage in &m.chain {
        let mut counters: BTreeMap<String, u64> = BTreeMap::new();
        for meta in metas.get(&stage).into_iter().flatten() {
            for (k, v) in &meta.counters {
                *counters.entry(k.clone()).or_default() += v;
            }
        }
        let st = StageState {
            fingerprint: m.fps.get(&stage).cloned().unwrap_or_default(),
            shards: m.n_shards,
            done: m.n_shards,
            complete: true,
            counters: counters.clone(),
        };
        manifest.stages.insert(stage.to_string(), st);
        stages.push(StageReport {
            stage,
            label: stage.to_string(),
            shards: m.n_shards,
            reused: 0,
            counters,
            busy: Default::default(),
        });
    }
    // An import writes the prompts and scores shards beside its samples shards.
    if !m.chain.contains(&StageName::Prompts)
        && let Some(import) = manifest.stages.get(StageName::Samples.as_str()).cloned()
    {
        for stage in [StageName::Prompts, StageName::Scores] {
            let mut st = import.clone();
            let prompts = stage == StageName::Prompts;
            st.counters.retain(|k, _| prompts == (k == counter::PROMPTS));
            manifest.stages.insert(stage.to_string(), st);
        }
    }
    run.write_manifest(manifest)?;

    let Some(select) = m.select.filter(|_| m.chain.contains(&StageName::Pairs)) else {
        return Ok(Merged { stages, exports: Vec::new(), exports_reused: false, vbon_files: Vec::new(), report: None });
    };
    let pair_metas = metas.get(&StageName::Pairs).map(Vec::as_slice).unwrap_or_default();
    let (exports, exports_reused) = exports(m, select, pair_metas, &stages, manifest, progress)?;
    let vbon_files = export_files(&run.root().join(VBON_DIR));
    let report = rbon_report::build_report(run.root(), rbon_report::ReportOptions::default())?;
    Ok(Merged { stages, exports, exports_reused, vbon_files, report: Some(report) })
}

/// The exports, merged from every pair shard in shard order; left alone when up to date.
fn exports(
    m: &Merge,
    select: &SelectConfig,
    pair_metas: &[ShardMeta],
    stages: &[StageReport],
    manifest: &mut Manifest,
    progress: &dyn Progress,
) -> Result<(Vec<Export>, bool), RunError> {
    let run = m.run;
    // `best`: each method's β tuned on `select.tune`'s subset, from every shard's selections.
    let cfg_pair = m.pair;
    let mut tuned = BTreeMap::new();
    let mut export_fp = m.export_fp.clone();
    if cfg_pair.best {
        tuned = rbon_report::tune(run.root(), select)?.map(|t| t.best()).unwrap_or_default();
        let best: Vec<(String, f64)> = tuned.iter().map(|(k, v)| (k.as_str().to_owned(), *v)).collect();
        export_fp = rbon_core::rundir::fingerprint("export-best", &best, &[&m.export_fp]);
    }
    let exports: Vec<_> =
        sweep(select).into_iter().filter(|&(me, b)| cfg_pair.exports(select, me, b, &tuned)).collect();
    let mut details: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for meta in pair_metas {
        for (k, c) in &meta.details {
            let e = details.entry(k.clone()).or_default();
            for (ck, v) in c {
                *e.entry(ck.clone()).or_default() += v;
            }
        }
    }
    let export_done = manifest.stages.get(EXPORT_ENTRY).is_some_and(|s| s.complete && s.fingerprint == export_fp)
        && exports.iter().all(|&(me, b)| {
            let dir = run.stage_dir(StageName::Pairs).join(export_key(me, b));
            dir.join(README).is_file() && (!cfg_pair.sft || dir.join(SFT_DIR).join(README).is_file())
        })
        && (!cfg_pair.vbon || run.root().join(VBON_DIR).join(README).is_file());
    if export_done {
        let list = exports
            .iter()
            .map(|&(me, b)| {
                let dir = run.stage_dir(StageName::Pairs).join(export_key(me, b));
                let sft_files = if cfg_pair.sft { export_files(&dir.join(SFT_DIR)) } else { Vec::new() };
                let files = export_files(&dir);
                let counts = details.get(&export_key(me, b)).cloned().unwrap_or_default();
                Export { method: me, beta: b, dir, files, sft_files, counts }
            })
            .collect();
        return Ok((list, true));
    }
    manifest.stages.insert(EXPORT_ENTRY.into(), StageState { fingerprint: export_fp.clone(), ..Default::default() });
    run.write_manifest(manifest)?;
    let card = CardContext { run_name: m.name, version: VERSION, select, pair: cfg_pair, config_text: m.config_text };
    let get = |k: &str| {
        stages.iter().find(|s| s.stage == StageName::Samples).and_then(|s| s.counters.get(k)).copied().unwrap_or(0)
            as usize
    };
    let template = match (cfg_pair.format, m.policy) {
        (rbon_pair::PairFormat::Standard, Some(p)) => Some(policy_template(p)?),
        (rbon_pair::PairFormat::Standard, None) => {
            return Err(RunError::Usage("pair.format: standard needs a `policy` (its chat template)".into()));
        }
        _ => None,
    };
    let opts = ExportOptions { render: template.as_ref().map(|t| t as &dyn ChatRender) };
    let totals = (get(counter::PROMPTS), get(counter::SAMPLES));
    let written = write_exports_with(run, m.n_shards, &exports, &details, totals, &card, opts)?;
    for e in &written {
        for f in &e.files {
            progress.event(Event::Wrote { path: f.clone() });
        }
    }
    let files: usize = written.iter().map(|e| e.files.len()).sum();
    manifest.stages.insert(
        EXPORT_ENTRY.into(),
        StageState {
            fingerprint: export_fp,
            shards: files,
            done: files,
            complete: true,
            counters: BTreeMap::from([
                (counter::EXPORTS.to_owned(), written.len() as u64),
                (counter::FILES.to_owned(), files as u64),
            ]),
        },
    );
    run.write_manifest(manifest)?;
    Ok((written, false))
}

/// The data files of an export folder (Parquet or JSONL parts).
fn export_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "parquet" || x == "jsonl"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

fn not_a_run(dir: &Path) -> RunError {
    CoreError::RunDir { path: dir.to_owned(), message: "is not an rbon run directory (no manifest.json)".into() }.into()
}

/// The ranks' files of a run, the world size, and the ranks that have not run yet.
type RankFiles = (BTreeMap<usize, RankState>, usize, Vec<usize>);

/// The ranks' files of a run, checked to be consistent: every rank ran the same pipeline.
fn rank_files(run: &RunDir) -> Result<RankFiles, RunError> {
    let ranks = run.read_ranks()?;
    let Some(first) = ranks.values().next() else {
        return Err(RunError::NotFinished("no rank has run in this directory yet (no ranks/rank-*.json)".into()));
    };
    let world = first.world_size.max(1);
    let missing: Vec<usize> = (0..world).filter(|r| !ranks.contains_key(r)).collect();
    for r in ranks.values() {
        if r.world_size != first.world_size
            || r.shards != first.shards
            || r.chain != first.chain
            || r.export_fingerprint != first.export_fingerprint
            || r.stages
                .iter()
                .map(|(k, s)| (k, &s.fingerprint))
                .ne(first.stages.iter().map(|(k, s)| (k, &s.fingerprint)))
        {
            return Err(RunError::NotFinished(format!(
                "rank {} ran another configuration than rank {} (different fingerprints or shard counts); \
                 rerun it with the same pipeline file",
                r.rank, first.rank
            )));
        }
    }
    Ok((ranks, world, missing))
}

/// `rbon finalize RUN_DIR`: merges the shards every rank wrote and writes the exports.
pub fn finalize(run_dir: &Path, progress: &dyn Progress) -> Result<RunReport, RunError> {
    let run = RunDir::open(run_dir).ok_or_else(|| not_a_run(run_dir))?;
    let _lock = run.lock()?;
    let (ranks, world, missing) = rank_files(&run)?;
    if !missing.is_empty() {
        let shown: Vec<String> = missing.iter().map(|r| r.to_string()).collect();
        return Err(RunError::NotFinished(format!(
            "rank{} {} of {world} ha{} not run here yet (no ranks/rank-NNNNN.json)",
            if missing.len() == 1 { "" } else { "s" },
            shown.join(", "),
            if missing.len() == 1 { "s" } else { "ve" }
        )));
    }
    let first = ranks.values().next().ok_or_else(|| RunError::NotFinished("no rank files".into()))?;
    let frozen_path = run.frozen_config_path();
    let frozen = crate::config::load_frozen(&frozen_path).map_err(|d| {
        let msgs: Vec<String> = d.iter().map(|x| x.to_string()).collect();
        RunError::NotFinished(format!("the frozen pipeline cannot be read: {}", msgs.join("; ")))
    })?;
    let mut manifest = run.read_manifest()?;
    let merge_input = Merge {
        run: &run,
        world_size: world,
        n_shards: first.shards,
        chain: first.chain.clone(),
        fps: first.stages.iter().filter_map(|(k, s)| Some((k.parse().ok()?, s.fingerprint.clone()))).collect(),
        export_fp: first.export_fingerprint.clone(),
        name: &frozen.name,
        select: frozen.select.as_ref(),
        pair: &frozen.pair,
        policy: frozen.policy.as_ref(),
        config_text: &frozen.text,
    };
    let merged = merge(&merge_input, &BTreeMap::new(), &mut manifest, progress)?;
    Ok(RunReport {
        run_dir: run_dir.to_owned(),
        stages: merged.stages,
        finalized: true,
        ranks: Ranks { rank: 0, world_size: world },
        exports: merged.exports,
        exports_reused: merged.exports_reused,
        vbon_files: merged.vbon_files,
        report: merged.report,
    })
}

/// Progress of one stage of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageStatus {
    pub stage: StageName,
    /// Shards written with the run's fingerprint, of `total`.
    pub done: usize,
    pub total: usize,
    /// Per rank: (written, owned).
    pub ranks: Vec<(usize, usize)>,
}

/// What `rbon status` shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub run_dir: PathBuf,
    pub name: String,
    pub world_size: usize,
    pub shards: usize,
    pub stages: Vec<StageStatus>,
    /// Ranks without a rank file yet.
    pub not_started: Vec<usize>,
    /// Ranks that went through every stage.
    pub complete: Vec<usize>,
    /// Whether the exports are written for the current shards (`None`: the run makes none).
    pub exports: Option<bool>,
}

/// `rbon status RUN_DIR`: reads the shards' footers, so it is right even for ranks that were killed.
pub fn status(run_dir: &Path) -> Result<Status, RunError> {
    let run = RunDir::open(run_dir).ok_or_else(|| not_a_run(run_dir))?;
    let manifest = run.read_manifest()?;
    let ranks = run.read_ranks()?;
    let Some(first) = ranks.values().next() else {
        return Ok(Status {
            run_dir: run_dir.to_owned(),
            name: manifest.name,
            world_size: 0,
            shards: 0,
            stages: Vec::new(),
            not_started: Vec::new(),
            complete: Vec::new(),
            exports: None,
        });
    };
    let world = first.world_size.max(1);
    let mut stages = Vec::new();
    for &stage in &first.chain {
        let fp = first.stages.get(stage.as_str()).map(|s| s.fingerprint.as_str()).unwrap_or_default();
        let mut per_rank = vec![(0usize, 0usize); world];
        for i in 0..first.shards {
            let r = &mut per_rank[i % world];
            r.1 += 1;
            if run.finished_shard(stage, i, fp).is_some() {
                r.0 += 1;
            }
        }
        let done = per_rank.iter().map(|r| r.0).sum();
        stages.push(StageStatus { stage, done, total: first.shards, ranks: per_rank });
    }
    let exports = first.chain.contains(&StageName::Pairs).then(|| {
        manifest.stages.get(EXPORT_ENTRY).is_some_and(|s| s.complete && s.fingerprint == first.export_fingerprint)
    });
    Ok(Status {
        run_dir: run_dir.to_owned(),
        name: manifest.name,
        world_size: world,
        shards: first.shards,
        stages,
        not_started: (0..world).filter(|r| !ranks.contains_key(r)).collect(),
        complete: ranks.values().filter(|r| r.complete).map(|r| r.rank).collect(),
        exports,
    })
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "run: {} ({})", self.run_dir.display(), self.name)?;
        if self.world_size == 0 {
            return writeln!(f, "  nothing has run here yet");
        }
        let plural = if self.world_size == 1 { "" } else { "s" };
        writeln!(f, "  {} shards, {} rank{plural}", self.shards, self.world_size)?;
        let show_ranks = self.world_size > 1 && self.world_size <= 16;
        write!(f, "  {:<12} {:>13}", "stage", "shards")?;
        if show_ranks {
            for r in 0..self.world_size {
                write!(f, " {:>9}", format!("rank {r}"))?;
            }
        }
        writeln!(f)?;
        for s in &self.stages {
            let pct = if s.total == 0 { 100.0 } else { 100.0 * s.done as f64 / s.total as f64 };
            write!(f, "  {:<12} {:>13}", s.stage.as_str(), format!("{}/{} {:>3.0}%", s.done, s.total, pct))?;
            if show_ranks {
                for (done, owned) in &s.ranks {
                    write!(f, " {:>9}", format!("{done}/{owned}"))?;
                }
            }
            writeln!(f)?;
        }
        if !self.not_started.is_empty() {
            let shown: Vec<String> = self.not_started.iter().map(|r| r.to_string()).collect();
            writeln!(f, "  not started: rank {}", shown.join(", "))?;
        }
        let all_done = self.stages.iter().all(|s| s.done == s.total);
        match self.exports {
            Some(true) => writeln!(f, "  exports: written"),
            Some(false) if all_done && self.world_size > 1 => {
                writeln!(
                    f,
                    "  exports: not yet written; every shard is done: run `rbon finalize {}`",
                    self.run_dir.display()
                )
            }
            Some(false) => writeln!(f, "  exports: not yet written (shards remain)"),
            None => writeln!(f, "  exports: none (the pipeline has no `select` section)"),
        }
    }
}
