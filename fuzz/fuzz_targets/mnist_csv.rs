//! The MNIST CSV as `data.source = "mnist"` reads it: `data::mnist::load` on a file written
//! from the input, plain (`.csv`) or gzip-compressed (`.csv.gz`; the first byte's low bit),
//! padded to 32 or not (bit 1). A load that succeeds holds whole images.
#![no_main]

use ddpm::data::mnist;
use ddpm_fuzz::{put, scratch};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, bytes)) = data.split_first() else {
        return;
    };
    let name = if flags & 1 == 1 {
        "mnist.csv.gz"
    } else {
        "mnist.csv"
    };
    let path = put(scratch(), name, bytes);
    let pad = flags & 2 == 2;
    if let Ok(set) = mnist::load(&path, pad) {
        let side = if pad { 32 } else { 28 };
        assert!(!set.is_empty(), "a loaded MNIST set holds images");
        assert_eq!(
            set.item_shape(),
            [1, side, side],
            "MNIST images are 1 × S × S"
        );
    }
});
