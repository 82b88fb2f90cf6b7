//! A checkpoint's `manifest.json`: parsed as `checkpoint::load` parses it, written back as
//! `checkpoint::save` writes it (and read again: it must read back to itself), then put in a
//! checkpoint directory of its own and loaded, so that the manifest's own checks (format
//! version, step against the directory's name, the file list, the size bounds it implies) run
//! on it. The directory holds nothing else, so the load must fail with an error, not a panic.
#![no_main]

use ddpm::checkpoint::{self, Manifest, MANIFEST_FILE};
use ddpm_fuzz::{fresh_dir, put};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(manifest) = serde_json::from_slice::<Manifest>(data) {
        let text = serde_json::to_vec_pretty(&manifest).expect("a manifest serialises");
        let back: Manifest = serde_json::from_slice(&text).expect("a written manifest reads");
        assert_eq!(back, manifest, "a manifest reads back to itself");
    }
    let dir = fresh_dir("step-0000001");
    put(&dir, MANIFEST_FILE, data);
    let loaded = checkpoint::load(&dir);
    assert!(
        loaded.is_err(),
        "a checkpoint without its data files loaded"
    );
});
