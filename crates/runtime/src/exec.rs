//! The streaming pipeline of one rank. A reader streams the input in shards and writes the first
//! stage; each later stage has workers on their own OS threads (one per device for the model
//! stages, each owning its model replicas, loaded once), linked by bounded channels that hold
//! one shard number each, so at most a few shards are in flight and memory does not grow with
//! the input. Every worker writes its shard atomically and passes the shard on; a collector on
//! the calling thread counts, records progress in the manifest and rank file, and reports.
//!
//! A shard already written with the current fingerprint is passed on without work, so a rerun
//! redoes only what is missing. On a stop request the reader stops taking new shards and the
//! workers finish the shards in flight.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use rbon_core::input::{PromptRow, for_each_prompt, stream_candidates};
use rbon_core::rundir::ShardState;
use rbon_core::shard::ShardMeta;
use rbon_core::{CoreError, Event, Manifest, RankState, RunDir, ShardCtx, StageName, StageState};
use rbon_models::Device;

use crate::config::PipelineConfig;
use crate::outcome::{RunError, StageReport};
use crate::pipeline::Plan;
use crate::ranks::Ranks;
use crate::source::{self, Completers, Completion, Source};

/// What a shard's work returns: its footer metadata and its row count.
type Done = (ShardMeta, usize);

/// Everything the stages of one rank share.
pub(crate) struct Ctx<'a> {
    pub cfg: &'a PipelineConfig,
    pub run: &'a RunDir,
    pub plan: &'a Plan,
    pub progress: &'a dyn rbon_core::Progress,
}

/// What workers tell the collector.
enum Msg {
    /// Stage `stage` wrote shard `shard`.
    Wrote {
        stage: usize,
        shard: usize,
        meta: ShardMeta,
        rows: usize,
        busy: Duration,
    },
    /// Shard `shard` went through every stage.
    Through,
    Failed(RunError),
}

type Results = mpsc::UnboundedSender<Msg>;

/// Per-stage tallies of one rank.
struct Tally {
    stage: StageName,
    label: String,
    fingerprint: String,
    owned: usize,
    skipped: usize,
    written: usize,
    counters: BTreeMap<String, u64>,
    busy: Duration,
    finished: bool,
}

impl Tally {
    fn done(&self) -> usize {
        self.skipped + self.written
    }

    fn add(&mut self, meta: &ShardMeta) {
        for (k, v) in &meta.counters {
            *self.counters.entry(k.clone()).or_default() += v;
        }
    }
}

/// What the pipeline of one rank did.
pub(crate) struct Outcome {
    pub reports: Vec<StageReport>,
    /// The footer metadata of every owned shard, per stage (for merging without rereading).
    pub metas: BTreeMap<StageName, BTreeMap<usize, ShardMeta>>,
}

/// Runs the stages of `ctx.plan.chain` over the shards `ranks` owns.
pub(crate) fn execute(
    ctx: &Ctx,
    source: &Source,
    ranks: Ranks,
    devices: &[Device],
    manifest: Option<&mut Manifest>,
) -> Result<Outcome, RunError> {
    let plan = ctx.plan;
    let chain = &plan.chain;
    let owned: Vec<usize> = RankState::owned(ranks.rank, ranks.world_size, plan.n_shards).collect();
    // What earlier runs already wrote, per stage.
    let mut metas: BTreeMap<StageName, BTreeMap<usize, ShardMeta>> = BTreeMap::new();
    let mut done: Vec<Vec<bool>> = Vec::new();
    let mut tallies = Vec::new();
    for (k, &stage) in chain.iter().enumerate() {
        let fp = plan.fp(stage).to_owned();
        let mut d = vec![false; plan.n_shards];
        let mut t = Tally {
            stage,
            label: plan.labels.get(k).cloned().unwrap_or_else(|| stage.to_string()),
            fingerprint: fp.clone(),
            owned: owned.len(),
            skipped: 0,
            written: 0,
            counters: BTreeMap::new(),
            busy: Duration::ZERO,
            finished: false,
        };
        let m = metas.entry(stage).or_default();
        // The input's first stage writes the others of `source.stage()` with it: its shard is
        // done when theirs are too.
        let with: &[StageName] = if k == 0 { source.stage().1 } else { &[] };
        for &i in &owned {
            let state = with.iter().fold(ctx.run.shard_state(stage, i, &fp), |state, &other| match state {
                ShardState::Done(meta) => match ctx.run.shard_state(other, i, plan.fp(other)) {
                    ShardState::Done(_) => ShardState::Done(meta),
                    other_state => other_state,
                },
                state => state,
            });
            match state {
                ShardState::Done(meta) => {
                    d[i] = true;
                    t.skipped += 1;
                    t.add(&meta);
                    m.insert(i, meta);
                }
                ShardState::Corrupt(why) => ctx.progress.event(Event::Info {
                    message: format!("{}: a finished shard is damaged ({why}); making it again", t.label),
                }),
                ShardState::ToMake => {}
            }
        }
        done.push(d);
        tallies.push(t);
    }
    let mut state = RankState {
        rank: ranks.rank,
        world_size: ranks.world_size,
        shards: plan.n_shards,
        chain: chain.clone(),
        stages: BTreeMap::new(),
        export_fingerprint: plan.export_fp.clone().unwrap_or_default(),
        complete: false,
    };
    let mut recorder = Recorder { ctx, manifest, state: &mut state, n_shards: plan.n_shards };
    recorder.record(&tallies)?;
    for t in &mut tallies {
        ctx.progress.event(Event::StageStarted { stage: t.label.clone(), total: t.owned, skipped: t.skipped });
        if t.done() == t.owned {
            t.finished = true;
            ctx.progress.event(Event::StageFinished {
                stage: t.label.clone(),
                counters: t.counters.clone(),
                elapsed: Duration::ZERO,
            });
        }
    }

    let abort = AtomicBool::new(false);
    let (res_tx, mut res_rx) = mpsc::unbounded_channel::<Msg>();
    let mut links = Vec::new();
    let mut inputs = Vec::new();
    for _ in 1..chain.len() {
        let (tx, rx) = mpsc::channel::<usize>(1);
        links.push(Some(tx));
        inputs.push(Mutex::new(rx));
    }
    let mut through = 0usize;
    let mut failure: Option<RunError> = None;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(|e| CoreError::internal(format!("cannot start the pipeline's runtime: {e}")))?;

    std::thread::scope(|s| {
        let done = &done;
        let abort = &abort;
        // The reader: stage 0.
        {
            let next = links.first_mut().and_then(Option::take);
            let res = res_tx.clone();
            let first = devices.first().cloned().unwrap_or(Device::Cpu);
            s.spawn(move || {
                let feed = Feed { ctx, ranks, done: &done[0], next, res: &res, abort };
                if let Err(e) = feed.run(source, &first) {
                    abort.store(true, Ordering::SeqCst);
                    let _ = res.send(Msg::Failed(e));
                }
            });
        }
        // Workers of the later stages: one per device for stages with models.
        for k in 1..chain.len() {
            let Some(stage) = plan.stages.get(k - 1) else { continue };
            let one: Vec<Device> = if stage.per_device() { devices.to_vec() } else { vec![Device::Cpu] };
            let workers: Vec<Device> =
                one.iter().flat_map(|d| std::iter::repeat_n(d.clone(), stage.workers().max(1))).collect();
            let next = links.get_mut(k).and_then(Option::take);
            let (name, label) = (chain[k], tallies[k].label.clone());
            for device in workers {
                let w = Worker {
                    stage: k,
                    input: &inputs[k - 1],
                    next: next.clone(),
                    res: res_tx.clone(),
                    done: &done[k],
                    abort,
                };
                let label = label.clone();
                s.spawn(move || {
                    let mut worker = stage.worker(&device);
                    w.run(|i| {
                        let shard = ShardCtx {
                            run: ctx.run,
                            stage: name,
                            shard: i,
                            fingerprint: plan.fp(name),
                            label: &label,
                            progress: ctx.progress,
                        };
                        Ok(worker.run(&shard)?)
                    })
                });
            }
        }
        drop(res_tx);
        // The collector: counts, records and reports as shards are written.
        runtime.block_on(async {
            while let Some(msg) = res_rx.recv().await {
                match msg {
                    Msg::Wrote { stage, shard, meta, rows, busy } => {
                        let t = &mut tallies[stage];
                        t.written += 1;
                        t.busy += busy;
                        t.add(&meta);
                        metas.entry(t.stage).or_default().insert(shard, meta);
                        ctx.progress.event(Event::ShardDone { stage: t.label.clone(), shard, rows, busy });
                        if t.done() == t.owned && !t.finished {
                            t.finished = true;
                            ctx.progress.event(Event::StageFinished {
                                stage: t.label.clone(),
                                counters: t.counters.clone(),
                                elapsed: t.busy,
                            });
                        }
                        if let Err(e) = recorder.record(&tallies) {
                            abort.store(true, Ordering::SeqCst);
                            failure.get_or_insert(e.into());
                        }
                    }
                    Msg::Through => through += 1,
                    Msg::Failed(e) => {
                        failure.get_or_insert(e);
                    }
                }
            }
        });
    });

    if let Some(e) = failure {
        return Err(e);
    }
    if through < owned.len() {
        return Err(RunError::Interrupted { done: through, total: owned.len() });
    }
    recorder.state.complete = true;
    recorder.record(&tallies)?;
    let reports = tallies
        .iter()
        .map(|t| StageReport {
            stage: t.stage,
            label: t.label.clone(),
            shards: t.owned,
            reused: t.skipped,
            counters: t.counters.clone(),
            busy: t.busy,
        })
        .collect();
    Ok(Outcome { reports, metas })
}

/// Writes the rank's progress: its rank file, and with a single rank the manifest.
struct Recorder<'a, 'b> {
    ctx: &'a Ctx<'a>,
    manifest: Option<&'b mut Manifest>,
    state: &'b mut RankState,
    n_shards: usize,
}

impl Recorder<'_, '_> {
    fn record(&mut self, tallies: &[Tally]) -> Result<(), CoreError> {
        for t in tallies {
            let st = StageState {
                fingerprint: t.fingerprint.clone(),
                shards: t.owned,
                done: t.done(),
                complete: t.done() == t.owned,
                counters: t.counters.clone(),
            };
            if let Some(m) = self.manifest.as_deref_mut() {
                m.stages.insert(t.stage.to_string(), StageState { shards: self.n_shards, ..st.clone() });
            }
            self.state.stages.insert(t.stage.to_string(), st);
        }
        if let Some(m) = self.manifest.as_deref() {
            self.ctx.run.write_manifest(m)?;
        }
        self.ctx.run.write_rank(self.state)
    }
}

/// A worker of one stage: takes shard numbers, makes the shards that are missing, passes them on.
struct Worker<'a> {
    stage: usize,
    input: &'a Mutex<mpsc::Receiver<usize>>,
    next: Option<mpsc::Sender<usize>>,
    res: Results,
    done: &'a [bool],
    abort: &'a AtomicBool,
}

impl Worker<'_> {
    fn run(&self, work: impl FnMut(usize) -> Result<Done, RunError>) {
        self.serve(work);
        // Closing the input wakes an upstream worker blocked on a full channel after a failure.
        if let Ok(mut rx) = self.input.lock() {
            rx.close();
        }
    }

    fn serve(&self, mut work: impl FnMut(usize) -> Result<Done, RunError>) {
        loop {
            // Workers of one stage share its input; the one holding the lock waits for the next shard.
            let next = match self.input.lock() {
                Ok(mut rx) => rx.blocking_recv(),
                Err(_) => None,
            };
            let Some(i) = next else { return };
            if self.abort.load(Ordering::SeqCst) {
                return;
            }
            if !self.done[i] {
                let started = Instant::now();
                match work(i) {
                    Ok((meta, rows)) => {
                        let busy = started.elapsed();
                        let _ = self.res.send(Msg::Wrote { stage: self.stage, shard: i, meta, rows, busy });
                    }
                    Err(e) => {
                        self.abort.store(true, Ordering::SeqCst);
                        let _ = self.res.send(Msg::Failed(e));
                        return;
                    }
                }
            }
            if !pass_on(i, self.next.as_ref(), &self.res) {
                return;
            }
        }
    }
}

/// Hands shard `i` to the next stage, or reports it through; false when the pipeline is closing.
fn pass_on(i: usize, next: Option<&mpsc::Sender<usize>>, res: &Results) -> bool {
    match next {
        Some(tx) => tx.blocking_send(i).is_ok(),
        None => res.send(Msg::Through).is_ok(),
    }
}

/// The reader: streams the input in shards of `shard_size` and makes the first stage's shards.
struct Feed<'a> {
    ctx: &'a Ctx<'a>,
    ranks: Ranks,
    done: &'a [bool],
    next: Option<mpsc::Sender<usize>>,
    res: &'a Results,
    abort: &'a AtomicBool,
}

impl Feed<'_> {
    /// Whether to go on to shard `i` (false once a stop is requested or the pipeline failed).
    fn go_on(&self) -> bool {
        !self.abort.load(Ordering::SeqCst) && !self.ctx.progress.stop_requested()
    }

    /// Makes shard `i` of the first stage unless it exists, then passes it on.
    fn shard(&self, i: usize, work: impl FnOnce() -> Result<Done, RunError>) -> Result<bool, RunError> {
        if !self.ranks.owns(i) {
            return Ok(true);
        }
        if !self.go_on() {
            return Ok(false);
        }
        if !self.done[i] {
            let started = Instant::now();
            let (meta, rows) = work()?;
            let busy = started.elapsed();
            let _ = self.res.send(Msg::Wrote { stage: 0, shard: i, meta, rows, busy });
        }
        Ok(pass_on(i, self.next.as_ref(), self.res))
    }

    fn prompts(&self, i: usize, rows: &[PromptRow]) -> Result<Done, RunError> {
        source::write_prompts(self.ctx.cfg, self.ctx.run, self.ctx.plan.fp(StageName::Prompts), i, rows)
    }

    fn run(&self, source: &Source, device: &Device) -> Result<(), RunError> {
        let shard_size = self.ctx.cfg.input.shard_size.max(1) as usize;
        match source {
            Source::Prompts { .. } => {
                let mut chunk: Vec<PromptRow> = Vec::with_capacity(shard_size);
                let mut i = 0usize;
                let mut failure = None;
                let mut more = true;
                for_each_prompt(&self.ctx.cfg.input, |row| {
                    chunk.push(row);
                    if chunk.len() < shard_size {
                        return Ok(true);
                    }
                    let rows = std::mem::take(&mut chunk);
                    match self.shard(i, || self.prompts(i, &rows)) {
                        Ok(m) => more = m,
                        Err(e) => {
                            failure = Some(e);
                            more = false;
                        }
                    }
                    i += 1;
                    Ok(more)
                })?;
                if let Some(e) = failure {
                    return Err(e);
                }
                if more && !chunk.is_empty() {
                    self.shard(i, || self.prompts(i, &chunk))?;
                }
            }
            Source::Candidates { path, index, .. } => {
                let complete = Completion {
                    cfg: self.ctx.cfg,
                    rewards: &index.header.rewards,
                    embedding_dim: index.embedding_dim,
                };
                let mut models = Completers::default();
                // Shards imported earlier go straight on; the others are streamed from the file.
                let n_shards = index.prompts().div_ceil(shard_size);
                for i in (0..n_shards).filter(|&i| self.ranks.owns(i) && self.done[i]) {
                    if !self.shard(i, || Err(CoreError::internal("an imported shard was redone").into()))? {
                        return Ok(());
                    }
                }
                let want = |i: usize| self.ranks.owns(i) && !self.done[i];
                let mut failure = None;
                stream_candidates(path, index, shard_size, want, |i, groups| {
                    let fp = self.ctx.plan.fp(StageName::Samples);
                    match self.shard(i, || source::import(self.ctx.run, fp, i, groups, &complete, &mut models, device))
                    {
                        Ok(more) => Ok(more),
                        Err(e) => {
                            failure = Some(e);
                            Ok(false)
                        }
                    }
                })?;
                if let Some(e) = failure {
                    return Err(e);
                }
            }
        }
        Ok(())
    }
}
