//! `runtime.devices`: the devices model workers run on. Each device gets its own worker thread
//! that loads its own replica of the models; CUDA and Metal need the `cuda`/`metal` features.

use rbon_models::Device;

/// Whether a device string is well formed, and whether this build can use it.
pub fn check_device(dev: &str) -> Result<(), String> {
    let cuda_index = dev.strip_prefix("cuda:");
    let ok_form = dev == "cpu"
        || dev == "metal"
        || dev == "cuda:*"
        || cuda_index.is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    if !ok_form {
        return Err(format!("unknown device `{dev}`; expected cpu, cuda:N, cuda:* or metal"));
    }
    if cuda_index.is_some() && !cfg!(feature = "cuda") {
        return Err(format!("`{dev}`: this build of rbon has no CUDA support; build it with `--features cuda`"));
    }
    if dev == "metal" && !cfg!(feature = "metal") {
        return Err(format!("`{dev}`: this build of rbon has no Metal support; build it with `--features metal`"));
    }
    Ok(())
}

/// Opens the configured devices; `cuda:*` is every CUDA device present.
pub fn open(specs: &[String]) -> Result<Vec<Device>, String> {
    let mut out = Vec::new();
    for spec in specs {
        check_device(spec)?;
        match spec.as_str() {
            "cpu" => out.push(Device::Cpu),
            "metal" => out.push(Device::new_metal(0).map_err(|e| format!("{spec}: {e}"))?),
            "cuda:*" => {
                let before = out.len();
                while let Ok(d) = Device::new_cuda(out.len() - before) {
                    out.push(d);
                }
                if out.len() == before {
                    return Err("cuda:*: no CUDA device found".into());
                }
            }
            other => {
                let n: usize =
                    other.trim_start_matches("cuda:").parse().map_err(|_| format!("bad device `{other}`"))?;
                out.push(Device::new_cuda(n).map_err(|e| format!("{spec}: {e}"))?);
            }
        }
    }
    if out.is_empty() {
        return Err("runtime.devices names no device".into());
    }
    Ok(out)
}

/// A short name for progress lines.
pub fn describe(d: &Device) -> String {
    match d.location() {
        rbon_models::DeviceLocation::Cpu => "cpu".into(),
        rbon_models::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        rbon_models::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn device_strings() {
        assert!(check_device("cpu").is_ok());
        assert!(check_device("gpu").unwrap_err().contains("unknown device"));
        assert!(check_device("cuda:").unwrap_err().contains("unknown device"));
        if !cfg!(feature = "cuda") {
            assert!(check_device("cuda:0").unwrap_err().contains("--features cuda"));
            assert!(open(&["cuda:*".into()]).is_err());
        }
        assert_eq!(open(&["cpu".into(), "cpu".into()]).map(|d| d.len()), Ok(2));
    }
}
