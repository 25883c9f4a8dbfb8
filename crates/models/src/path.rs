//! Which implementation runs the models on a device. On the CPU, rbon's own kernels (packed
//! scoring rows, the decode matmul, the host sampler) are the default; every other device runs
//! candle's ops. `RBON_KERNELS=candle` makes the CPU take candle's path too, so the code the GPU
//! runs is exercised, and its parity tests run, on machines without one.

use std::sync::OnceLock;

use candle_core::Device;

/// The environment variable that picks the CPU's path.
pub const ENV: &str = "RBON_KERNELS";

/// The values [`ENV`] may take: `packed` (the default) or `candle`.
pub const CHOICES: [&str; 2] = ["packed", "candle"];

/// The value of [`ENV`] when it is set to something other than [`CHOICES`], for the CLI to
/// report (the library only ever falls back to the default).
pub fn invalid_setting() -> Option<String> {
    let v = std::env::var(ENV).ok()?;
    (!CHOICES.contains(&v.trim())).then_some(v)
}

fn candle_forced() -> bool {
    static FORCED: OnceLock<bool> = OnceLock::new();
    *FORCED.get_or_init(|| std::env::var(ENV).is_ok_and(|v| v.trim() == "candle"))
}

/// Opens a device named as in `runtime.devices`: `cpu`, `cuda:N` or `metal` (CUDA and Metal need
/// a build with that feature; candle says so otherwise).
pub fn open_device(spec: &str) -> Result<Device, String> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        "metal" => Device::new_metal(0).map_err(|e| format!("{spec}: {e}")),
        other => {
            let n = other.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok());
            let n = n.ok_or_else(|| format!("unknown device `{other}`; expected cpu, cuda:N or metal"))?;
            Device::new_cuda(n).map_err(|e| format!("{spec}: {e}"))
        }
    }
}

/// The name of an opened device, as `runtime.devices` spells it.
pub fn describe(d: &Device) -> String {
    match d.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Whether models on `device` use rbon's CPU kernels (rather than candle's ops, as on a GPU).
pub fn host_kernels(device: &Device) -> bool {
    matches!(device, Device::Cpu) && !candle_forced()
}

/// The device named by `RBON_TEST_DEVICE` (default `cpu`). The parity and sampling suites run
/// on it, so the same tests that hold the CPU to transformers' goldens check a GPU
/// (`scripts/gpu-check.sh` runs them with `RBON_TEST_DEVICE=cuda:0`).
pub fn test_device() -> Result<Device, String> {
    open_device(std::env::var("RBON_TEST_DEVICE").as_deref().unwrap_or("cpu"))
}
