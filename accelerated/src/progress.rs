//! One look for every long-running command's progress bar: elapsed, bar, count, rate, ETA.

use indicatif::{ProgressBar, ProgressStyle};

/// A bar over `len` units named `unit` (e.g. "steps"), starting at `at`; hidden when `show` is
/// false (--no-progress, or tests).
pub fn bar(show: bool, len: u64, at: u64, unit: &str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len).with_position(at);
    let template =
        format!("{{elapsed_precise}} {{wide_bar}} {{human_pos}}/{{human_len}} {unit} {{msg}} {{per_sec}} ETA {{eta}}");
    // The template is fixed text; only a brace in `unit` could break it, and then the plain bar does.
    let style =
        ProgressStyle::with_template(&template).unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar
}
