//! Config files as `ddpm train --config` reads them, and the flag layer on top.
//! The first byte picks the path, the rest is the text:
//! - 0: a TOML file through `Config::from_toml_str` (what `Config::from_file` does for .toml);
//! - 1: a JSON file through `Config::from_file` (written to a scratch `config.json`);
//! - 2: a TOML file, then (after `@@PART@@`) a TOML table of overrides through
//!   `Config::with_overrides`, as `ddpm train`'s flags and `--resume` layer on a config.
//!
//! Every config that validates must save (`to_toml`) and read back to itself, as a run's
//! config.toml and a resumed run's settings do.
#![no_main]

use ddpm::config::Config;
use ddpm_fuzz::{put, scratch, split_parts};
use libfuzzer_sys::fuzz_target;

fn round_trip(cfg: &Config) {
    let text = cfg.to_toml().expect("a valid config saves");
    let back = Config::from_toml_str(&text, "saved").expect("a saved config reads back");
    assert_eq!(&back, cfg, "a saved config reads back to itself");
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => {
            if let Ok(text) = std::str::from_utf8(rest) {
                if let Ok(cfg) = Config::from_toml_str(text, "fuzz.toml") {
                    round_trip(&cfg);
                }
            }
        }
        1 => {
            let path = put(scratch(), "config.json", rest);
            if let Ok(cfg) = Config::from_file(&path) {
                round_trip(&cfg);
            }
        }
        _ => {
            let parts = split_parts(rest);
            let (Some(base), Some(over)) = (parts.first(), parts.get(1)) else {
                return;
            };
            let (Ok(base), Ok(over)) = (std::str::from_utf8(base), std::str::from_utf8(over))
            else {
                return;
            };
            let base = if base.trim().is_empty() {
                Config::mnist()
            } else {
                match Config::from_toml_str(base, "fuzz.toml") {
                    Ok(cfg) => cfg,
                    Err(_) => return,
                }
            };
            let Ok(over) = toml::from_str::<toml::Table>(over) else {
                return;
            };
            if let Ok(cfg) = base.with_overrides(over, "the flags") {
                round_trip(&cfg);
            }
        }
    }
});
