//! Running a pipeline over its run directory. Every stage's fingerprint (its config plus its
//! inputs' fingerprints) is known before any work ([`crate::pipeline`]); a shard that already
//! exists with its stage's fingerprint is reused, and with a single rank a stage whose
//! fingerprint changed is discarded first. The shards then stream through the stages
//! ([`crate::exec`]), and the run is merged into its exports ([`crate::finalize`]).

use rbon_core::rundir::{FROZEN_CONFIG, MANIFEST, RANKS_DIR};
use rbon_core::shard;
use rbon_core::{CoreError, Event, Manifest, Progress, RunDir, StageName};

use crate::config::Pipeline;
use crate::exec::Ctx;
use crate::finalize::{Merge, merge};
use crate::outcome::{RunError, RunReport};
use crate::pipeline::plan;
use crate::ranks::Ranks;
use crate::source::read_source;

/// Options of `rbon run`.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Discard everything in the run directory first.
    pub force: bool,
    /// This process's rank; shard i belongs to rank i mod world size.
    pub ranks: Ranks,
}

/// Whether `dir` holds something other than an rbon run (hidden temporaries and the ranks'
/// folder of a run another rank is just creating do not count).
fn foreign(dir: &std::path::Path) -> bool {
    if dir.join(MANIFEST).is_file() || holds_shards(dir) {
        return false;
    }
    std::fs::read_dir(dir).is_ok_and(|d| {
        d.flatten().any(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            !name.starts_with('.') && name != RANKS_DIR && name != FROZEN_CONFIG
        })
    })
}

/// Whether `dir` holds a finished shard of some stage (an rbon run whose manifest was lost).
fn holds_shards(dir: &std::path::Path) -> bool {
    StageName::ALL.iter().any(|s| {
        std::fs::read_dir(dir.join(s.as_str())).is_ok_and(|d| {
            d.flatten().any(|e| {
                rbon_core::stage::is_shard_file(&e.file_name().to_string_lossy())
                    && shard::read_meta(&e.path()).is_ok_and(|m| m.is_some())
            })
        })
    })
}

/// Runs (or resumes) a pipeline: this rank's shards through every stage, then, with a single
/// rank, the merge into exports.
pub fn run(p: &Pipeline, opts: RunOptions, progress: &dyn Progress) -> Result<RunReport, RunError> {
    let cfg = &p.config;
    let ranks = opts.ranks;
    let multi = ranks.world_size > 1;
    if opts.force && multi {
        return Err(RunError::Usage(
            "--force with several ranks would let one rank delete another's shards; clear the run directory \
             (or run once with --force on a single rank) before launching the ranks"
                .into(),
        ));
    }
    let devices = crate::devices::open(&cfg.runtime.devices).map_err(RunError::Usage)?;
    // Read and check the whole input before touching the run directory: bad data leaves nothing behind.
    let source = read_source(p)?;
    let shard_size = cfg.input.shard_size.max(1) as usize;
    let n_shards = source.prompts().div_ceil(shard_size);

    if foreign(&cfg.output) {
        return Err(CoreError::RunDir {
            path: cfg.output.clone(),
            message: "exists, is not empty and is not an rbon run directory (no manifest.json); \
                      choose another `output`"
                .into(),
        }
        .into());
    }
    let run = RunDir::create(&cfg.output)?;
    let digests = rbon_core::FileDigests::cached_in(run.root().join(rbon_core::digest::DIGESTS));
    let _lock = if multi { run.lock_rank(ranks.rank)? } else { run.lock()? };
    if opts.force {
        run.clear_all()?;
    }
    // The manifest only summarises the shards, which carry their own fingerprints and checks:
    // a lost or garbled one is rebuilt from them.
    let (mut manifest, rebuilt) = match run.read_manifest() {
        Ok(m) => (m, false),
        Err(CoreError::RunDir { message, .. }) => {
            progress.event(Event::Info {
                message: format!("{MANIFEST} could not be read ({message}); rebuilding it from the shards"),
            });
            (Manifest::default(), true)
        }
        Err(e) => return Err(e.into()),
    };
    if !run.manifest_path().is_file() && holds_shards(run.root()) {
        progress.event(Event::Info { message: format!("{MANIFEST} is missing; rebuilding it from the shards") });
    }
    manifest.rbon_version = crate::outcome::VERSION.to_owned();
    manifest.name = cfg.name.clone();
    if !multi || rebuilt || !run.manifest_path().is_file() {
        run.write_manifest(&manifest)?;
    }
    run.freeze_config(p.doc.text())?;
    run.remove_other_ranks(ranks.world_size)?;
    let plan = plan(p, &source, n_shards, &digests)?;
    digests.save()?;

    let also = source.stage().1;
    for &stage in plan.chain.iter().chain(also) {
        let fp = plan.fp(stage);
        if !multi {
            invalidate(&run, &mut manifest, stage, fp, progress)?;
        } else if manifest.stages.get(stage.as_str()).is_some_and(|s| s.fingerprint != fp) {
            // With several ranks, each overwrites only its own stale shards.
            progress.event(Event::Invalidated {
                stage: stage.to_string(),
                reason: "its configuration or inputs changed; this rank redoes its shards".into(),
            });
        }
        shard::remove_stale_temps_of(&run.stage_dir(stage), |i| i.is_some_and(|i| ranks.owns(i)) || !multi)?;
    }
    if multi {
        let owned = rbon_core::RankState::owned(ranks.rank, ranks.world_size, n_shards).count();
        progress.event(Event::Info {
            message: format!("rank {} of {}: {owned} of {n_shards} shards", ranks.rank, ranks.world_size),
        });
    }

    let ctx = Ctx { cfg, run: &run, plan: &plan, progress };
    let outcome = crate::exec::execute(&ctx, &source, ranks, &devices, (!multi).then_some(&mut manifest))?;
    if multi {
        return Ok(RunReport {
            run_dir: cfg.output.clone(),
            stages: outcome.reports,
            ranks,
            finalized: false,
            exports: Vec::new(),
            exports_reused: false,
            vbon_files: Vec::new(),
            report: None,
        });
    }
    let m = Merge {
        run: &run,
        world_size: 1,
        n_shards,
        chain: plan.chain.clone(),
        fps: plan.fps.clone(),
        export_fp: plan.export_fp.clone().unwrap_or_default(),
        name: &cfg.name,
        select: cfg.select.as_ref(),
        pair: &cfg.pair,
        policy: cfg.policy.as_ref(),
        config_text: p.doc.text(),
    };
    let merged = merge(&m, &outcome.metas, &mut manifest, progress)?;
    Ok(RunReport {
        run_dir: cfg.output.clone(),
        stages: outcome.reports,
        ranks,
        finalized: true,
        exports: merged.exports,
        exports_reused: merged.exports_reused,
        vbon_files: merged.vbon_files,
        report: merged.report,
    })
}

/// Discards a stage's output when it was made under another fingerprint.
fn invalidate(
    run: &RunDir,
    m: &mut Manifest,
    stage: StageName,
    fp: &str,
    progress: &dyn Progress,
) -> Result<(), CoreError> {
    let stale = match m.stages.get(stage.as_str()) {
        Some(s) => s.fingerprint != fp,
        // No record: keep only shards whose own fingerprint matches (checked per shard).
        None => false,
    };
    if stale {
        run.clear_stage(stage)?;
        m.stages.remove(stage.as_str());
        progress.event(Event::Invalidated {
            stage: stage.to_string(),
            reason: "its configuration or inputs changed".into(),
        });
    }
    Ok(())
}
