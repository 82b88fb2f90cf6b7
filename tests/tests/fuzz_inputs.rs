//! Fuzz tests that run in the README's test command (issue 14, item 9): the inputs a user
//! hands the `ddpm` binary — config files (TOML, JSON, the flag layer), checkpoint manifests
//! and whole checkpoint directories, the images of a `--data` folder, the MNIST CSV (plain
//! and gzip) — mutated from the seed corpora of the cargo-fuzz targets (fuzz/seeds/, real
//! files of a tiny run) and fed to the library's real entry points. None may panic; what
//! parses must hold its invariants (a valid config saves and reads back to itself, a decoded
//! image is side × side × C bytes, …). The long runs (10⁶ inputs a target) are the nightly
//! cargo-fuzz targets of fuzz/ (`scripts/fuzz.sh`, docs/reliability.md); these are the same
//! harnesses at a few hundred cases each, seeded (`PROPTEST_SEED`), so a regression is caught
//! without nightly. The crashes the long runs found have their minimised inputs at the end.

use ddpm::checkpoint::{self, Manifest};
use ddpm::config::Config;
use ddpm::data::folder::{self, Channels};
use ddpm::data::mnist;
use ddpm_tests::check;
use proptest::prelude::*;
use sha2::{Digest, Sha256};
use std::path::Path;

const PART: &[u8] = b"\n@@PART@@\n";

fn seed(target: &str, name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/seeds")
        .join(target)
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read the seed {}: {e}", path.display()))
}

/// One edit of a byte string: at a position (a fraction of its length), overwrite, insert,
/// delete a run of bytes, or cut the rest.
#[derive(Debug, Clone)]
enum Edit {
    Set(f64, u8),
    Insert(f64, Vec<u8>),
    Delete(f64, usize),
    Truncate(f64),
}

fn edit() -> impl Strategy<Value = Edit> {
    let interesting = prop_oneof![
        Just(b"0".to_vec()),
        Just(b"-1".to_vec()),
        Just(b"18446744073709551615".to_vec()),
        Just(b"1e400".to_vec()),
        Just(b"nan".to_vec()),
        Just(b"[".to_vec()),
        Just(b"{".to_vec()),
        Just(b"\"".to_vec()),
        Just(b",".to_vec()),
        Just(b"\n".to_vec()),
        Just(vec![0xff, 0xff, 0xff, 0x7f]),
        proptest::collection::vec(any::<u8>(), 1..8),
    ];
    prop_oneof![
        4 => (0.0..1.0f64, any::<u8>()).prop_map(|(p, b)| Edit::Set(p, b)),
        2 => (0.0..1.0f64, interesting).prop_map(|(p, s)| Edit::Insert(p, s)),
        2 => (0.0..1.0f64, 1usize..16).prop_map(|(p, n)| Edit::Delete(p, n)),
        1 => (0.0..1.0f64).prop_map(Edit::Truncate),
    ]
}

fn apply(mut bytes: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for e in edits {
        let at = |p: f64, len: usize| ((p * len as f64) as usize).min(len);
        match e {
            Edit::Set(p, b) => {
                if !bytes.is_empty() {
                    let i = at(*p, bytes.len() - 1);
                    bytes[i] = *b;
                }
            }
            Edit::Insert(p, s) => {
                let i = at(*p, bytes.len());
                bytes.splice(i..i, s.iter().copied());
            }
            Edit::Delete(p, n) => {
                let i = at(*p, bytes.len());
                let j = (i + n).min(bytes.len());
                bytes.drain(i..j);
            }
            Edit::Truncate(p) => {
                let i = at(*p, bytes.len());
                bytes.truncate(i);
            }
        }
    }
    bytes
}

/// A seed (without its first, mode byte) and up to `n` edits of it.
fn mutated(seed: Vec<u8>, n: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(edit(), 0..=n).prop_map(move |edits| apply(seed.clone(), &edits))
}

fn round_trip(cfg: &Config) -> Result<(), TestCaseError> {
    let text = cfg
        .to_toml()
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let back =
        Config::from_toml_str(&text, "saved").map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(&back, cfg, "a saved config reads back to itself");
    Ok(())
}

/// Mutated TOML and JSON configs (the seeds of fuzz/seeds/config/) through
/// `Config::from_toml_str` and `Config::from_file`: errors or configs that round-trip.
#[test]
fn mutated_config_files_parse_or_fail_cleanly() {
    let toml_seeds =
        ["tiny-toml", "saved-toml", "sigma-toml"].map(|n| seed("config", n)[1..].to_vec());
    let json_seeds = ["saved-json", "tiny-json"].map(|n| seed("config", n)[1..].to_vec());
    for text in &toml_seeds {
        Config::from_toml_str(std::str::from_utf8(text).unwrap(), "seed").expect("the seeds parse");
    }
    let dir = tempfile::tempdir().unwrap();
    let json_path = dir.path().join("config.json");
    for text in &json_seeds {
        std::fs::write(&json_path, text).unwrap();
        Config::from_file(&json_path).expect("the seeds parse");
    }
    let strategy = (0..toml_seeds.len() + json_seeds.len()).prop_flat_map(move |i| {
        let s = if i < 3 {
            toml_seeds[i].clone()
        } else {
            json_seeds[i - 3].clone()
        };
        (Just(i >= 3), mutated(s, 4))
    });
    check(1000, strategy, |(json, bytes)| {
        let parsed = if json {
            std::fs::write(&json_path, &bytes).unwrap();
            Config::from_file(&json_path)
        } else {
            match std::str::from_utf8(&bytes) {
                Ok(text) => Config::from_toml_str(text, "fuzz.toml"),
                Err(_) => return Ok(()),
            }
        };
        if let Ok(cfg) = parsed {
            round_trip(&cfg)?;
        }
        Ok(())
    });
}

/// Random flag layers (keys of every section, values of every TOML type, extremes included)
/// through `Config::with_overrides` on the tiny config: errors or configs that round-trip.
#[test]
fn random_flag_layers_parse_or_fail_cleanly() {
    let base = Config::from_toml_str(
        std::str::from_utf8(&seed("config", "tiny-toml")[1..]).unwrap(),
        "tiny",
    )
    .unwrap();
    let table = base.to_table().unwrap();
    let keys: Vec<String> = ddpm::config::keys(&table)
        .into_iter()
        .chain(
            [
                "preset",
                "model.t_max",
                "train.bogus",
                "sample.sigma.data_std",
            ]
            .map(String::from),
        )
        .collect();
    let value = prop_oneof![
        any::<i64>().prop_map(toml::Value::Integer),
        prop_oneof![
            Just(0i64),
            Just(1),
            Just(-1),
            Just(2),
            Just(1 << 40),
            Just(i64::MAX)
        ]
        .prop_map(toml::Value::Integer),
        any::<f64>().prop_map(toml::Value::Float),
        prop_oneof![
            Just(0.0f64),
            Just(-0.0),
            Just(1.0),
            Just(f64::NAN),
            Just(f64::INFINITY),
            Just(1e-300)
        ]
        .prop_map(toml::Value::Float),
        any::<bool>().prop_map(toml::Value::Boolean),
        "[a-z0-9_]{0,12}".prop_map(toml::Value::String),
        Just(toml::Value::Array(vec![])),
        proptest::collection::vec(0i64..5, 0..4)
            .prop_map(|v| toml::Value::Array(v.into_iter().map(toml::Value::Integer).collect())),
    ];
    let strategy = proptest::collection::vec((0..keys.len(), value), 1..5);
    check(1000, strategy, |sets| {
        let mut over = toml::Table::new();
        for (k, v) in sets {
            ddpm::config::set_key(&mut over, &keys[k], v);
        }
        if let Ok(cfg) = base.with_overrides(over, "the flags") {
            round_trip(&cfg)?;
        }
        Ok(())
    });
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn split_parts(data: &[u8]) -> Vec<Vec<u8>> {
    let mut parts = Vec::new();
    let mut rest = data;
    while let Some(i) = rest.windows(PART.len()).position(|w| w == PART) {
        parts.push(rest[..i].to_vec());
        rest = &rest[i + PART.len()..];
    }
    parts.push(rest.to_vec());
    parts
}

/// Mutated manifests: parsed as `checkpoint::load` parses them, they read back to themselves;
/// alone in a checkpoint directory, the load fails with an error.
#[test]
fn mutated_manifests_parse_or_fail_cleanly() {
    let seeds = ["tiny", "step-1", "version-2"].map(|n| seed("manifest", n));
    for bytes in &seeds {
        serde_json::from_slice::<Manifest>(bytes).expect("the seeds parse");
    }
    let dir = tempfile::tempdir().unwrap();
    let step_dir = dir.path().join("step-0000001");
    std::fs::create_dir(&step_dir).unwrap();
    let strategy = (0..seeds.len()).prop_flat_map(move |i| mutated(seeds[i].clone(), 4));
    check(1000, strategy, |bytes| {
        if let Ok(m) = serde_json::from_slice::<Manifest>(&bytes) {
            let back: Manifest = serde_json::from_slice(&serde_json::to_vec(&m).unwrap()).unwrap();
            prop_assert_eq!(back, m);
        }
        std::fs::write(step_dir.join(checkpoint::MANIFEST_FILE), &bytes).unwrap();
        prop_assert!(checkpoint::load(&step_dir).is_err());
        Ok(())
    });
}

/// The tiny run's checkpoint with one file mutated (the manifest's sums set to the mutated
/// files', so the safetensors parser and the shape checks see the bytes): `checkpoint::load`
/// returns a checkpoint or an error.
#[test]
fn mutated_checkpoints_load_or_fail_cleanly() {
    let parts = split_parts(&seed("checkpoint", "fixed-sums")[1..]);
    assert_eq!(parts.len(), 5, "the checkpoint seed holds five files");
    let names = [
        checkpoint::MANIFEST_FILE,
        checkpoint::MODEL_FILE,
        checkpoint::EMA_FILE,
        checkpoint::OPTIM_FILE,
        checkpoint::CONFIG_FILE,
    ];
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("step-0000002");
    std::fs::create_dir(&ckpt).unwrap();
    for (name, bytes) in names.iter().zip(&parts) {
        std::fs::write(ckpt.join(name), bytes).unwrap();
    }
    checkpoint::load(&ckpt).expect("the seed checkpoint loads");
    // Edits near the start of a safetensors file hit its header (the interesting part).
    let strategy = (0..parts.len(), any::<bool>()).prop_flat_map(move |(i, head)| {
        let mut file = parts[i].clone();
        let tail = if head && i > 0 {
            file.split_off(file.len().min(400))
        } else {
            Vec::new()
        };
        let all = parts.clone();
        (Just(i), mutated(file, 3)).prop_map(move |(i, mut edited)| {
            edited.extend_from_slice(&tail);
            let mut files = all.clone();
            files[i] = edited;
            files
        })
    });
    check(500, strategy, |mut files| {
        if let Ok(serde_json::Value::Object(mut m)) =
            serde_json::from_slice::<serde_json::Value>(&files[0])
        {
            let sums: serde_json::Map<String, serde_json::Value> = (1..5)
                .map(|i| (names[i].to_string(), sha256_hex(&files[i]).into()))
                .collect();
            m.insert("files".into(), sums.into());
            files[0] = serde_json::to_vec(&m).unwrap();
        }
        for (name, bytes) in names.iter().zip(&files) {
            std::fs::write(ckpt.join(name), bytes).unwrap();
        }
        if let Ok(c) = checkpoint::load(&ckpt) {
            prop_assert_eq!(c.manifest.step, 2);
        }
        Ok(())
    });
}

/// Mutated PNGs and JPEGs of a `--data` folder through `data::folder::prepare`, at random
/// sides and channels: an error, or side × side × C bytes.
#[test]
fn mutated_images_decode_or_fail_cleanly() {
    let names = [
        "grey8-0",
        "rgb-12x10",
        "palette-9x9",
        "grey16-10x10",
        "greyalpha-8x8",
        "python.png",
        "python.jpg",
    ];
    let seeds: Vec<(bool, Vec<u8>)> = names
        .iter()
        .map(|n| (n.ends_with("jpg"), seed("image", n)[1..].to_vec()))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().to_path_buf();
    let strategy =
        (0..seeds.len(), 1u32..=16, any::<bool>()).prop_flat_map(move |(i, side, rgb)| {
            let (jpg, s) = seeds[i].clone();
            (Just((jpg, side, rgb)), mutated(s, 3))
        });
    check(1500, strategy, |((jpg, side, rgb), bytes)| {
        let path = dir.join(if jpg { "img.jpg" } else { "img.png" });
        std::fs::write(&path, &bytes).unwrap();
        let channels = if rgb { Channels::Rgb } else { Channels::Grey };
        if let Ok(pixels) = folder::prepare(&path, side, channels) {
            prop_assert_eq!(
                pixels.len(),
                (side * side) as usize * channels.count() as usize
            );
        }
        Ok(())
    });
}

/// Mutated MNIST rows, plain and gzip-compressed, through `data::mnist::load`: an error, or
/// whole 28×28 (32×32 padded) images.
#[test]
fn mutated_mnist_csv_loads_or_fails_cleanly() {
    let plain = seed("mnist_csv", "plain-3-pad")[1..].to_vec();
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().to_path_buf();
    std::fs::write(dir.join("seed.csv"), &plain).unwrap();
    assert_eq!(
        mnist::load(&dir.join("seed.csv"), false)
            .expect("the seed loads")
            .len(),
        3
    );
    let strategy = (any::<bool>(), any::<bool>(), mutated(plain, 4));
    check(1000, strategy, |(gz, pad, bytes)| {
        let path = if gz {
            use std::io::Write;
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            enc.write_all(&bytes).unwrap();
            let mut packed = enc.finish().unwrap();
            // A damaged archive too: cut its tail off every other time.
            if bytes.len() % 2 == 1 {
                packed.truncate(packed.len() * 3 / 4);
            }
            let path = dir.join("mnist.csv.gz");
            std::fs::write(&path, packed).unwrap();
            path
        } else {
            let path = dir.join("mnist.csv");
            std::fs::write(&path, &bytes).unwrap();
            path
        };
        if let Ok(set) = mnist::load(&path, pad) {
            let side = if pad { 32 } else { 28 };
            prop_assert_eq!(set.item_shape(), vec![1, side, side]);
        }
        Ok(())
    });
}

// Regressions: the crashes the fuzz runs (and their harnesses) found, each as its minimised
// input.

/// A network wider than 64 bits can count: `base_channels · mult` wrapped to 0 in a release
/// build and `UNetConfig::validate` divided by it (a panic in `ddpm train --config`). Now the
/// width is refused, naming both keys.
#[test]
fn regression_a_level_too_wide_to_count_is_refused() {
    let text =
        b"[model]\nbase_channels = 4611686018427387904\nchannel_mults = [1, 4]\nimage_size = 28\n";
    let err = Config::from_toml_str(std::str::from_utf8(text).unwrap(), "wide.toml")
        .expect_err("a level of 2^64 channels is refused")
        .to_string();
    assert!(
        err.contains("model.base_channels") && err.contains("too wide"),
        "{err}"
    );
    // The time features' width 4 · base overflows first for a single level.
    let text =
        "[model]\nbase_channels = 4611686018427387904\nchannel_mults = [1]\nimage_size = 28\n";
    assert!(Config::from_toml_str(text, "wide.toml").is_err());
}

/// A JPEG (the fuzz artifact, 434 bytes) on which zune-jpeg (the image crate's JPEG decoder)
/// multiplies a DC coefficient by its quantiser with an i32 overflow: a panic only where
/// overflow checks are on (cargo fuzz -a); a release build, as shipped, wraps and decodes or
/// errors. Upstream, not ddpm's; this keeps the release behaviour (no panic) checked.
#[test]
fn regression_a_jpeg_overflowing_the_decoder_does_not_panic_in_release() {
    let bytes = OVERFLOWING_JPEG;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.jpg");
    std::fs::write(&path, bytes).unwrap();
    // Debug builds of the tests would hit the upstream overflow check; the gate runs --release.
    if cfg!(debug_assertions) {
        return;
    }
    let side = u32::from(0x67u8 % 32) + 1;
    if let Ok(pixels) = folder::prepare(&path, side, Channels::Rgb) {
        assert_eq!(pixels.len(), (side * side * 3) as usize);
    }
}

/// fuzz/artifacts/image/crash-353bdab2… without its first (choice) byte: side 8, RGB, .jpg.
const OVERFLOWING_JPEG: &[u8] = &[
    0xff, 0xd8, 0xff, 0xe0, 0x00, 0x10, 0x4a, 0x46, 0x49, 0x46, 0x00, 0x01, 0x01, 0x01, 0x00, 0x01,
    0x00, 0x01, 0x00, 0x00, 0xff, 0xdb, 0x00, 0x43, 0x00, 0x5b, 0x03, 0x02, 0x02, 0x02, 0x02, 0x02,
    0x03, 0x02, 0x02, 0x02, 0x03, 0x03, 0x03, 0x03, 0x04, 0x06, 0x04, 0x04, 0x04, 0x04, 0x04, 0x08,
    0x06, 0x06, 0x05, 0x06, 0x09, 0x08, 0x0a, 0x0a, 0x09, 0x08, 0x09, 0x09, 0x0a, 0x0c, 0x0f, 0x0c,
    0x0a, 0x0b, 0x0e, 0x0b, 0x09, 0x09, 0x0d, 0x11, 0x0d, 0x0e, 0x0f, 0x10, 0x10, 0x11, 0x10, 0x0a,
    0x0c, 0x16, 0x13, 0x12, 0x10, 0x13, 0x0f, 0x10, 0x10, 0x10, 0xff, 0xdb, 0x00, 0x43, 0x01, 0x03,
    0x03, 0x03, 0x04, 0x03, 0x04, 0x08, 0x04, 0x01, 0x05, 0x10, 0x0b, 0x09, 0x0b, 0x10, 0x10, 0x10,
    0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x10,
    0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x10,
    0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0xff,
    0xc0, 0x00, 0x11, 0x08, 0x00, 0xee, 0xff, 0xe9, 0x03, 0x01, 0x22, 0x00, 0x02, 0x11, 0x01, 0x03,
    0x11, 0x01, 0xff, 0xc4, 0x00, 0x16, 0x00, 0x01, 0x01, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x07, 0x04, 0x05, 0xff, 0xc4, 0x00, 0x24, 0x10, 0x00,
    0x01, 0x04, 0x01, 0x04, 0x02, 0x02, 0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01,
    0x02, 0x03, 0x04, 0x06, 0x05, 0x07, 0x08, 0x12, 0x13, 0x11, 0x22, 0x00, 0x14, 0x09, 0x31, 0x32,
    0xff, 0xc4, 0x00, 0x15, 0x01, 0x01, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x06, 0xff, 0xc4, 0x00, 0x23, 0x11, 0x00, 0x01, 0x02, 0x05,
    0x03, 0x05, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x53, 0x41, 0x44, 0x49,
    0x04, 0x05, 0x06, 0x21, 0x00, 0x12, 0x31, 0x7a, 0x89, 0x50, 0x4e, 0xe1, 0xff, 0xda, 0x00, 0x0c,
    0x03, 0x01, 0x00, 0x02, 0x11, 0x03, 0x11, 0x00, 0x3f, 0x00, 0x14, 0xa6, 0xd2, 0x6a, 0x1b, 0x73,
    0xc1, 0xe6, 0x13, 0x12, 0xd4, 0x95, 0x1c, 0xf3, 0x11, 0x63, 0xe4, 0x25, 0x65, 0xbe, 0xba, 0x5a,
    0xec, 0x69, 0x45, 0xe5, 0xb2, 0xb1, 0x20, 0xa5, 0x40, 0x54, 0x1f, 0xd2, 0xca, 0xb8, 0xfa, 0xf2,
    0x20, 0xab, 0x96, 0x3d, 0x97, 0x6c, 0x93, 0x35, 0xe6, 0x9b, 0x81, 0x85, 0x7b, 0x21, 0x29, 0x98,
    0x67, 0xa9, 0x6b, 0x94, 0xb9, 0x49, 0x65, 0x4f, 0xb9, 0xc8, 0x85, 0x29, 0x11, 0x4b, 0x81, 0x2a,
    0xf0, 0x7a, 0x9c, 0x9c, 0x9c, 0x6e, 0x6e, 0x6e, 0x9c, 0x9c, 0x94, 0x60, 0x14, 0x82, 0x62, 0x13,
    0x8d, 0xb8, 0x52, 0x98, 0x28, 0x37, 0x05, 0x89, 0x72, 0x79, 0x60, 0xe4, 0x32, 0x89, 0x6f, 0xc3,
    0x82, 0x8e, 0xa7, 0x52, 0x8c, 0xea, 0x20, 0x8d, 0xbe, 0x78, 0x19, 0x1f, 0x07, 0xad, 0x7f, 0xff,
    0xd9,
];
