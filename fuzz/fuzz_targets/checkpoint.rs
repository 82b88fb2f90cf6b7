//! A whole checkpoint directory from one input: `manifest.json`, `model.safetensors`,
//! `ema.safetensors`, `optim.safetensors` and `config.toml`, in that order, separated by
//! `@@PART@@`, loaded by `checkpoint::load` (what `ddpm sample`/`eval`/`--resume` call).
//!
//! Random bytes never match a sha256, so the first byte's low bit asks for the manifest's
//! `files` to be set to the parts' real checksums (and bit 1 for a correct `manifest.sha256`):
//! then the safetensors parser, the tensor construction and the shape checks see the fuzzed
//! bytes. A checkpoint that loads is checked against a fixed tiny network and its weights
//! copied in, as `into_model` does (an error or a success, never a panic).
#![no_main]

use ddpm::checkpoint::{self, EMA_FILE, MANIFEST_FILE, MANIFEST_SUM_FILE, MODEL_FILE, OPTIM_FILE};
use ddpm_fuzz::{fresh_dir, put, split_parts};
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};
use std::sync::OnceLock;
use tch::nn::VarStore;

const NAMES: [&str; 5] = [
    MANIFEST_FILE,
    MODEL_FILE,
    EMA_FILE,
    OPTIM_FILE,
    checkpoint::CONFIG_FILE,
];

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The network of the seed corpus's tiny run (fuzz/seeds/README.md).
fn tiny_network() -> &'static VarStore {
    static VS: OnceLock<VarStore> = OnceLock::new();
    VS.get_or_init(|| {
        let cfg = ddpm::config::Config::from_toml_str(include_str!("../seeds/tiny.toml"), "tiny")
            .expect("the tiny config is valid");
        checkpoint::build_model(&cfg, tch::Device::Cpu, 0)
            .expect("the tiny network builds")
            .0
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let parts = split_parts(rest);
    let mut manifest = parts[0].to_vec();
    if flags & 1 == 1 {
        if let Ok(serde_json::Value::Object(mut m)) =
            serde_json::from_slice::<serde_json::Value>(&manifest)
        {
            let files: serde_json::Map<String, serde_json::Value> = NAMES[1..]
                .iter()
                .zip(parts.iter().skip(1))
                .map(|(name, bytes)| (name.to_string(), sha256_hex(bytes).into()))
                .collect();
            m.insert("files".into(), files.into());
            manifest = serde_json::to_vec(&m).expect("a JSON object serialises");
        }
    }
    let step = serde_json::from_slice::<serde_json::Value>(&manifest)
        .ok()
        .and_then(|v| v.get("step").and_then(serde_json::Value::as_u64))
        .unwrap_or(1);
    let dir = fresh_dir(&checkpoint::dir_name(step));
    put(&dir, MANIFEST_FILE, &manifest);
    if flags & 2 == 2 {
        put(&dir, MANIFEST_SUM_FILE, sha256_hex(&manifest).as_bytes());
    }
    for (name, bytes) in NAMES[1..].iter().zip(parts.iter().skip(1)) {
        put(&dir, name, bytes);
    }
    if let Ok(ckpt) = checkpoint::load(&dir) {
        let vs = tiny_network();
        // The manifest lists the model file's tensors only: an EMA file of other names
        // (possible only with sums fixed up as here) is refused here, with an error.
        let _ = ckpt.load_weights(vs, flags & 4 == 4);
    }
});
