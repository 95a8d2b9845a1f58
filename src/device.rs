//! Device selection: `cpu`, `cuda` / `cuda:N`, `metal` / `metal:N`.

use candle_core::Device;

use crate::error::{Error, Result};

/// Parses a device name and opens the device, with an error that says what to do when
/// this build or this machine lacks it.
pub fn open_device(name: &str) -> Result<Device> {
    let name = name.trim().to_ascii_lowercase();
    let (kind, ordinal) = match name.split_once(':') {
        Some((k, n)) => {
            let n: usize = n.parse().map_err(|_| {
                Error::config("device", format!("'{name}': '{n}' is not a device number"))
            })?;
            (k.to_string(), n)
        }
        None => (name.clone(), 0),
    };
    match kind.as_str() {
        "cpu" => Ok(Device::Cpu),
        "cuda" => {
            if !cfg!(feature = "cuda") {
                return Err(Error::config(
                    "device",
                    "'cuda' was asked for, but this build has no CUDA support (build with --features cuda)",
                ));
            }
            Device::new_cuda(ordinal).map_err(|e| {
                Error::config("device", format!("cuda:{ordinal} could not be opened: {e}"))
            })
        }
        "metal" => {
            if !cfg!(feature = "metal") {
                return Err(Error::config(
                    "device",
                    "'metal' was asked for, but this build has no Metal support (build with --features metal)",
                ));
            }
            Device::new_metal(ordinal).map_err(|e| {
                Error::config(
                    "device",
                    format!("metal:{ordinal} could not be opened: {e}"),
                )
            })
        }
        other => Err(Error::config(
            "device",
            format!("'{other}' is not a device (cpu, cuda, cuda:N, metal)"),
        )),
    }
}

/// Which accelerators this build can use.
pub fn compiled_backends() -> Vec<&'static str> {
    let mut b = vec!["cpu"];
    if cfg!(feature = "cuda") {
        b.push("cuda");
    }
    if cfg!(feature = "metal") {
        b.push("metal");
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_missing_backends_say_so() {
        assert!(matches!(open_device("cpu"), Ok(Device::Cpu)));
        assert!(matches!(open_device(" CPU "), Ok(Device::Cpu)));
        let err = open_device("tpu").unwrap_err().to_string();
        assert!(err.contains("'tpu' is not a device"), "{err}");
        let err = open_device("cuda:x").unwrap_err().to_string();
        assert!(err.contains("not a device number"), "{err}");
        if !cfg!(feature = "cuda") {
            let err = open_device("cuda:0").unwrap_err().to_string();
            assert!(err.contains("--features cuda"), "{err}");
        }
    }
}
