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
    if let Some(v) = rbon_models::path::invalid_setting() {
        return Err(format!(
            "{}={v:?} is not one of {}",
            rbon_models::path::ENV,
            rbon_models::path::CHOICES.join(", ")
        ));
    }
    let mut out = Vec::new();
    for spec in specs {
        check_device(spec)?;
        match spec.as_str() {
            "cuda:*" => {
                let before = out.len();
                while let Ok(d) = Device::new_cuda(out.len() - before) {
                    out.push(d);
                }
                if out.len() == before {
                    return Err("cuda:*: no CUDA device found".into());
                }
            }
            other => out.push(rbon_models::path::open_device(other)?),
        }
    }
    if out.is_empty() {
        return Err("runtime.devices names no device".into());
    }
    Ok(out)
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
