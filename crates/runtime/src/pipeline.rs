//! The stages a pipeline runs, and every stage's fingerprint, known before any work. Each stage
//! after the input is registered here in one line; its fingerprint is derived from its
//! [`Stage::identity`] and the fingerprints of the stages it reads.

use std::collections::BTreeMap;

use rbon_core::rundir::fingerprint;
use rbon_core::{CoreError, FileDigests, Stage, StageName};
use rbon_models::Device;

use crate::config::{Pipeline, PipelineConfig};
use crate::outcome::RunError;
use crate::source::{Source, import_fingerprint, import_label};

/// A stage of the runtime: over the runtime's model devices.
pub(crate) type DynStage = Box<dyn Stage<Device>>;

/// The stages of a run and their fingerprints.
pub(crate) struct Plan {
    pub n_shards: usize,
    /// The input's stage, then `stages`' names, in order.
    pub chain: Vec<StageName>,
    /// What progress and summaries call each stage of `chain`.
    pub labels: Vec<String>,
    /// The stages after the input.
    pub stages: Vec<DynStage>,
    pub fps: BTreeMap<StageName, String>,
    /// The exports' fingerprint, when the run makes pairs.
    pub export_fp: Option<String>,
}

impl Plan {
    pub fn fp(&self, stage: StageName) -> &str {
        self.fps.get(&stage).map(String::as_str).unwrap_or_default()
    }
}

/// The stages after the input, in order. Adding a stage is one line here.
fn stages(cfg: &PipelineConfig, source: &Source) -> Result<Vec<DynStage>, RunError> {
    let batch_tokens = cfg.runtime.batch_tokens.max(1) as usize;
    let mut out: Vec<DynStage> = Vec::new();
    if let Source::Prompts { .. } = source {
        let (Some(policy), Some(sample)) = (&cfg.policy, &cfg.sample) else {
            return Err(CoreError::internal("prompts input without policy and sample passed validation").into());
        };
        let (policy, sample, seed) = (policy.clone(), sample.clone(), cfg.seed);
        out.push(Box::new(rbon_sample::SampleStage::new(policy, sample, seed, batch_tokens)));
        if let Some(score) = cfg.score.clone() {
            out.push(Box::new(rbon_score::ScoreStage { score, batch_tokens }));
        }
    }
    let scored = matches!(source, Source::Candidates { .. }) || cfg.score.is_some();
    if let (Some(select), true) = (&cfg.select, scored) {
        out.push(Box::new(rbon_regularize::SelectStage { select: select.clone(), seed: cfg.seed }));
        let pair = cfg.pair.for_shards();
        out.push(Box::new(rbon_pair::PairStage { pair, select: select.clone(), seed: cfg.seed }));
    }
    Ok(out)
}

#[derive(serde::Serialize)]
struct ExportIdentity<'a> {
    name: &'a str,
    config_text: &'a str,
    /// [`EXPORT_LAYOUT`].
    layout: u32,
}

/// The version of what an export folder holds besides its rows (cards, registries): raised when
/// it changes, so finished runs rewrite their exports rather than keep an older layout. 2: the
/// pairs folder's README.md with one Hub configuration per export.
const EXPORT_LAYOUT: u32 = 2;

/// The pipeline text less its top-level `output` line: where the run directory is mounted is not
/// part of what the exports hold, so ranks that see one shared directory under different paths
/// agree on the exports' fingerprint.
fn without_output(text: &str) -> String {
    text.lines().filter(|l| !l.starts_with("output:")).collect::<Vec<_>>().join("\n")
}

/// Every stage of a run with its fingerprint.
pub(crate) fn plan(p: &Pipeline, source: &Source, n_shards: usize, files: &FileDigests) -> Result<Plan, RunError> {
    let cfg = &p.config;
    let mut fps = BTreeMap::new();
    let (first, also) = source.stage();
    let (source_fp, source_label) = match source {
        Source::Candidates { fp, .. } => (import_fingerprint(cfg, fp, files)?, import_label(cfg)),
        Source::Prompts { fp, .. } => (fp.clone(), first.to_string()),
    };
    for s in std::iter::once(first).chain(also.iter().copied()) {
        fps.insert(s, source_fp.clone());
    }
    let stages = stages(cfg, source)?;
    let mut chain = vec![first];
    let mut labels = vec![source_label];
    for st in &stages {
        let upstream: Vec<&str> = st
            .upstream()
            .iter()
            .map(|u| {
                fps.get(u)
                    .map(String::as_str)
                    .ok_or_else(|| CoreError::internal(format!("{u} runs after {}", st.name())))
            })
            .collect::<Result<_, _>>()?;
        let fp = fingerprint(st.name().as_str(), &st.identity(files)?, &upstream);
        fps.insert(st.name(), fp);
        chain.push(st.name());
        labels.push(st.label());
    }
    let config_text = without_output(p.doc.text());
    let export_fp = fps.get(&StageName::Pairs).map(|fp_pairs| {
        fingerprint(
            "export",
            &ExportIdentity { name: &cfg.name, config_text: &config_text, layout: EXPORT_LAYOUT },
            &[fp_pairs],
        )
    });
    Ok(Plan { n_shards, chain, labels, stages, fps, export_fp })
}
