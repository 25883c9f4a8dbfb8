//! Which rank this process is, of how many (DESIGN §5): from `--rank/--world-size`, or from the
//! environment a scheduler sets — Slurm job arrays, Kubernetes Indexed Jobs, torchrun-style
//! `RANK`/`WORLD_SIZE`. Shard i belongs to rank i mod world size.

/// This process's place among the ranks sharing a run directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ranks {
    pub rank: usize,
    pub world_size: usize,
}

impl Default for Ranks {
    fn default() -> Self {
        Self { rank: 0, world_size: 1 }
    }
}

impl Ranks {
    /// Whether shard `i` is this rank's.
    pub fn owns(&self, shard: usize) -> bool {
        shard % self.world_size.max(1) == self.rank
    }

    fn checked(rank: usize, world_size: usize, from: &str) -> Result<Self, String> {
        if world_size == 0 {
            return Err(format!("{from}: the world size must be at least 1"));
        }
        if rank >= world_size {
            return Err(format!(
                "{from}: rank {rank} is out of range for a world size of {world_size} (0..{world_size})"
            ));
        }
        Ok(Self { rank, world_size })
    }
}

fn parse(var: &str, v: &str) -> Result<usize, String> {
    v.trim().parse::<usize>().map_err(|_| format!("{var}={v:?} is not a non-negative integer"))
}

/// Resolves the rank from the command line, then the environment (`env` looks a variable up),
/// in this order: `--rank` with `--world-size`; `SLURM_ARRAY_TASK_ID` with
/// `SLURM_ARRAY_TASK_COUNT` (minus `SLURM_ARRAY_TASK_MIN`); `JOB_COMPLETION_INDEX` with
/// `--world-size` (or `WORLD_SIZE`); `RANK` with `WORLD_SIZE`. With none of them: rank 0 of 1.
pub fn resolve(
    rank: Option<usize>,
    world_size: Option<usize>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Ranks, String> {
    let var = |k: &str| env(k).filter(|v| !v.trim().is_empty());
    if let Some(r) = rank {
        let Some(w) = world_size else {
            return Err("--rank needs --world-size".into());
        };
        return Ranks::checked(r, w, "--rank/--world-size");
    }
    if let Some(id) = var("SLURM_ARRAY_TASK_ID") {
        let id = parse("SLURM_ARRAY_TASK_ID", &id)?;
        let min = var("SLURM_ARRAY_TASK_MIN").map(|m| parse("SLURM_ARRAY_TASK_MIN", &m)).transpose()?.unwrap_or(0);
        let count = match (world_size, var("SLURM_ARRAY_TASK_COUNT")) {
            (Some(w), _) => w,
            (None, Some(c)) => parse("SLURM_ARRAY_TASK_COUNT", &c)?,
            (None, None) => return Err("SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not".into()),
        };
        let Some(r) = id.checked_sub(min) else {
            return Err(format!("SLURM_ARRAY_TASK_ID={id} is below SLURM_ARRAY_TASK_MIN={min}"));
        };
        return Ranks::checked(r, count, "Slurm array (use a contiguous --array=0-N without a step)");
    }
    if let Some(idx) = var("JOB_COMPLETION_INDEX") {
        let r = parse("JOB_COMPLETION_INDEX", &idx)?;
        let w = match (world_size, var("WORLD_SIZE")) {
            (Some(w), _) => w,
            (None, Some(w)) => parse("WORLD_SIZE", &w)?,
            (None, None) => {
                return Err(
                    "JOB_COMPLETION_INDEX is set: give --world-size (the Job's completions) or WORLD_SIZE".into()
                );
            }
        };
        return Ranks::checked(r, w, "JOB_COMPLETION_INDEX");
    }
    if let Some(r) = var("RANK") {
        let r = parse("RANK", &r)?;
        let w = match (world_size, var("WORLD_SIZE")) {
            (Some(w), _) => w,
            (None, Some(w)) => parse("WORLD_SIZE", &w)?,
            (None, None) => return Err("RANK is set but WORLD_SIZE is not (or give --world-size)".into()),
        };
        return Ranks::checked(r, w, "RANK/WORLD_SIZE");
    }
    match world_size {
        Some(0) => Err("--world-size: the world size must be at least 1".into()),
        Some(1) | None => Ok(Ranks::default()),
        Some(w) => Err(format!(
            "--world-size {w} without a rank: give --rank, or run under a Slurm array, a Kubernetes Indexed Job \
             (JOB_COMPLETION_INDEX) or with RANK set"
        )),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn with(vars: &[(&str, &str)], rank: Option<usize>, world: Option<usize>) -> Result<Ranks, String> {
        let m: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        resolve(rank, world, |k| m.get(k).cloned())
    }

    #[test]
    fn sources_in_order() {
        assert_eq!(with(&[], None, None), Ok(Ranks { rank: 0, world_size: 1 }));
        assert_eq!(with(&[("RANK", "3")], Some(1), Some(2)), Ok(Ranks { rank: 1, world_size: 2 }));
        let slurm = [("SLURM_ARRAY_TASK_ID", "12"), ("SLURM_ARRAY_TASK_MIN", "10"), ("SLURM_ARRAY_TASK_COUNT", "4")];
        assert_eq!(with(&slurm, None, None), Ok(Ranks { rank: 2, world_size: 4 }));
        assert_eq!(
            with(&[("SLURM_ARRAY_TASK_ID", "1"), ("SLURM_ARRAY_TASK_COUNT", "2")], None, None),
            Ok(Ranks { rank: 1, world_size: 2 })
        );
        assert_eq!(with(&[("JOB_COMPLETION_INDEX", "5")], None, Some(8)), Ok(Ranks { rank: 5, world_size: 8 }));
        assert_eq!(
            with(&[("JOB_COMPLETION_INDEX", "5"), ("WORLD_SIZE", "6")], None, None),
            Ok(Ranks { rank: 5, world_size: 6 })
        );
        assert_eq!(with(&[("RANK", "1"), ("WORLD_SIZE", "3")], None, None), Ok(Ranks { rank: 1, world_size: 3 }));
        // Slurm wins over a torchrun-style RANK inherited from elsewhere.
        assert_eq!(
            with(
                &[("RANK", "0"), ("WORLD_SIZE", "9"), ("SLURM_ARRAY_TASK_ID", "1"), ("SLURM_ARRAY_TASK_COUNT", "2")],
                None,
                None
            ),
            Ok(Ranks { rank: 1, world_size: 2 })
        );
    }

    #[test]
    fn errors_name_the_variable() {
        assert!(with(&[], Some(0), None).unwrap_err().contains("--world-size"));
        assert!(with(&[], Some(2), Some(2)).unwrap_err().contains("out of range"));
        assert!(with(&[], None, Some(0)).unwrap_err().contains("world size"));
        assert!(with(&[], None, Some(3)).unwrap_err().contains("without a rank"));
        assert!(with(&[("RANK", "x"), ("WORLD_SIZE", "2")], None, None).unwrap_err().contains("RANK=\"x\""));
        assert!(with(&[("RANK", "1")], None, None).unwrap_err().contains("WORLD_SIZE"));
        assert!(with(&[("JOB_COMPLETION_INDEX", "1")], None, None).unwrap_err().contains("--world-size"));
        assert!(with(&[("SLURM_ARRAY_TASK_ID", "1")], None, None).unwrap_err().contains("SLURM_ARRAY_TASK_COUNT"));
        assert!(
            with(&[("SLURM_ARRAY_TASK_ID", "4"), ("SLURM_ARRAY_TASK_COUNT", "4")], None, None)
                .unwrap_err()
                .contains("contiguous")
        );
        assert!(Ranks { rank: 1, world_size: 3 }.owns(4) && !Ranks { rank: 1, world_size: 3 }.owns(5));
    }
}
