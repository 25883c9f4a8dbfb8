//! The model suites in one binary, for a machine with a GPU but no Rust toolchain:
//! `scripts/build-cuda.sh --bundle DIR` builds it with CUDA and `scripts/gpu-check.sh` runs it
//! with `RBON_TEST_DEVICE=cuda:0` (and `RBON_DATA`, the repository's `data/` there). `cargo test`
//! leaves it out: each suite also runs in its own crate.

#[path = "../../models/tests/parity.rs"]
mod models_parity;
#[path = "sampling.rs"]
mod sampling;
#[path = "../../score/tests/parity.rs"]
mod score_parity;
