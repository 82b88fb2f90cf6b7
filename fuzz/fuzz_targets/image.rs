//! One image file of a `--data` folder, decoded, cropped, resized and converted by
//! `data::folder::prepare`, the function the folder loader calls for every file. The first
//! byte picks the target side (1..=32), grey or RGB, and the file's extension (.png or .jpg:
//! the loader picks files by extension, then the decoder guesses the format from the bytes).
#![no_main]

use ddpm::data::folder::{self, Channels};
use ddpm_fuzz::{put, scratch};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&choice, bytes)) = data.split_first() else {
        return;
    };
    let side = u32::from(choice % 32) + 1;
    let channels = if choice & 32 == 0 {
        Channels::Grey
    } else {
        Channels::Rgb
    };
    let name = if choice & 64 == 0 {
        "img.png"
    } else {
        "img.jpg"
    };
    let path = put(scratch(), name, bytes);
    if let Ok(pixels) = folder::prepare(&path, side, channels) {
        let want = (side * side) as usize * channels.count() as usize;
        assert_eq!(
            pixels.len(),
            want,
            "an image decodes to side × side × C bytes"
        );
    }
});
