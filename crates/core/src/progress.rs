//! Progress events. Libraries never print: they report through [`Progress`], and the CLI draws
//! the events (bars, logs) or drops them.

use std::collections::BTreeMap;
use std::time::Duration;

/// Something a stage reports while it runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A stage begins: `total` shards, of which `skipped` were already done and are reused.
    StageStarted { stage: String, total: usize, skipped: usize },
    /// Tokens were generated (for a tokens/s readout).
    Tokens { stage: String, tokens: usize },
    /// Requests sent to an inference server and not yet answered (the server engine).
    InFlight { stage: String, requests: usize },
    /// One shard was written, in `busy` time.
    ShardDone { stage: String, shard: usize, rows: usize, busy: Duration },
    /// A stage finished; `counters` sums every shard's counters (reused ones included), and
    /// `elapsed` is the time its workers spent (stages overlap, so these do not add up to the wall time).
    StageFinished { stage: String, counters: BTreeMap<String, u64>, elapsed: Duration },
    /// A stage's earlier output was discarded because its configuration or inputs changed.
    Invalidated { stage: String, reason: String },
    /// Something worth a line (which shards this rank owns, the devices in use).
    Info { message: String },
    /// A file was written outside the shard stages (exports, cards).
    Wrote { path: std::path::PathBuf },
}

/// Receives progress events; must be cheap and must not block for long. It is also how the
/// caller asks a run to stop: stages check between shards.
pub trait Progress: Send + Sync {
    fn event(&self, event: Event);

    /// True once the caller wants the run to stop after the shards in flight (e.g. on Ctrl-C).
    fn stop_requested(&self) -> bool {
        false
    }
}

/// Discards every event.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn event(&self, _: Event) {}
}
