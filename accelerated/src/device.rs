//! Choosing the libtorch device and reporting what libtorch offers.

use crate::error::{DdpmError, Result};
use std::fmt;
use std::path::{Path, PathBuf};
use tch::{Cuda, Device};

/// The libtorch version that `torch-sys` 0.24 checks for when it builds (a mismatch fails the build
/// unless `LIBTORCH_BYPASS_VERSION_CHECK` is set).
pub const EXPECTED_LIBTORCH_VERSION: &str = "2.11.0";

/// Where to run: `Auto` takes CUDA device 0 when libtorch sees one, the CPU otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// CUDA device 0 when available, else the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// CUDA device 0; an error when libtorch sees no CUDA device.
    Cuda,
}

impl DeviceChoice {
    /// The `tch::Device` for this choice.
    pub fn resolve(self) -> Result<Device> {
        match self {
            DeviceChoice::Auto => Ok(Device::cuda_if_available()),
            DeviceChoice::Cpu => Ok(Device::Cpu),
            DeviceChoice::Cuda if Cuda::is_available() => Ok(Device::Cuda(0)),
            DeviceChoice::Cuda => Err(DdpmError::CudaUnavailable),
        }
    }
}

/// What the linked libtorch offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TorchInfo {
    /// Version string of the libtorch actually loaded (e.g. `2.11.0+cu130`), or the expected
    /// version when the loaded library cannot be located.
    pub libtorch_version: String,
    /// Where that version was read from.
    pub version_source: String,
    /// Whether libtorch sees a CUDA device.
    pub cuda_available: bool,
    /// Number of CUDA devices.
    pub cuda_device_count: i64,
    /// Whether cuDNN is usable.
    pub cudnn_available: bool,
    /// Threads libtorch uses for intra-op parallelism on the CPU.
    pub cpu_threads: i32,
}

impl fmt::Display for TorchInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "libtorch {} ({}); CUDA available: {}, devices: {}, cuDNN: {}; CPU threads: {}",
            self.libtorch_version,
            self.version_source,
            self.cuda_available,
            self.cuda_device_count,
            self.cudnn_available,
            self.cpu_threads
        )
    }
}

/// Reports the loaded libtorch's version, CUDA availability, device count and cuDNN.
///
/// tch exposes no version call, so the version is read from the files that ship beside the
/// loaded `libtorch_cpu.so` (found in `/proc/self/maps`): `version.py` of a PyTorch wheel or
/// `build-version` of a standalone libtorch archive.
pub fn torch_info() -> TorchInfo {
    let cuda_available = Cuda::is_available();
    let (libtorch_version, version_source) = match loaded_libtorch_version() {
        Some((version, file)) => (version, file.display().to_string()),
        None => (
            EXPECTED_LIBTORCH_VERSION.to_string(),
            "version required by torch-sys at build time; loaded library not located".to_string(),
        ),
    };
    TorchInfo {
        libtorch_version,
        version_source,
        cuda_available,
        cuda_device_count: if cuda_available {
            Cuda::device_count()
        } else {
            0
        },
        cudnn_available: cuda_available && Cuda::cudnn_is_available(),
        cpu_threads: tch::get_num_threads(),
    }
}

fn loaded_libtorch_version() -> Option<(String, PathBuf)> {
    // Make sure libtorch is loaded and mapped before looking for it.
    let _ = tch::get_num_threads();
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    let lib = maps
        .lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|path| path.ends_with("/libtorch_cpu.so"))?;
    let root = Path::new(lib).parent()?.parent()?;
    let from_wheel = root.join("version.py");
    if let Some(v) = std::fs::read_to_string(&from_wheel)
        .ok()
        .and_then(|s| parse_version_py(&s))
    {
        return Some((v, from_wheel));
    }
    let from_archive = root.join("build-version");
    let v = std::fs::read_to_string(&from_archive).ok()?;
    Some((v.trim().to_string(), from_archive))
}

fn parse_version_py(text: &str) -> Option<String> {
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("__version__"))?;
    let value = line.split_once('=')?.1.trim();
    Some(value.trim_matches(|c| c == '\'' || c == '"').to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_version_of_a_wheel() {
        let text = "__all__ = []\n__version__ = '2.11.0+cu130'\ndebug = False\n";
        assert_eq!(parse_version_py(text).as_deref(), Some("2.11.0+cu130"));
    }

    #[test]
    fn loaded_libtorch_is_the_expected_version() {
        let info = torch_info();
        assert!(
            info.libtorch_version.starts_with(EXPECTED_LIBTORCH_VERSION),
            "{info}"
        );
        assert!(DeviceChoice::Cpu.resolve().is_ok());
        if !info.cuda_available {
            assert!(matches!(
                DeviceChoice::Cuda.resolve(),
                Err(DdpmError::CudaUnavailable)
            ));
            assert_eq!(DeviceChoice::Auto.resolve().unwrap(), Device::Cpu);
        }
    }
}
