//! Progress as the person running `ddpm` sees it: an indicatif bar on stderr, with the
//! library's notes logged above it.

use ddpm::progress::Progress;
use indicatif::{ProgressBar, ProgressStyle};

/// A bar drawn from the library's [`Progress`] reports; hidden by --no-progress.
pub struct Bar {
    show: bool,
    bar: ProgressBar,
}

impl Bar {
    /// No bar yet; [`Progress::start`] draws one when `show`.
    pub fn new(show: bool) -> Bar {
        Bar {
            show,
            bar: ProgressBar::hidden(),
        }
    }
}

impl Progress for Bar {
    fn start(&mut self, total: u64, done: u64, unit: &'static str) {
        self.bar.finish_and_clear();
        if !self.show {
            return;
        }
        let bar = ProgressBar::new(total).with_position(done);
        let template = format!(
            "{{elapsed_precise}} {{wide_bar}} {{human_pos}}/{{human_len}} {unit} {{msg}} {{per_sec}} ETA {{eta}}"
        );
        // The template is fixed text; only a brace in `unit` could break it, and then the
        // plain bar does.
        let style = ProgressStyle::with_template(&template)
            .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        self.bar = bar;
    }

    fn update(&mut self, done: u64) {
        self.bar.set_position(done);
    }

    fn status(&mut self, status: &str) {
        self.bar.set_message(status.to_string());
    }

    fn note(&mut self, line: &str) {
        self.bar.suspend(|| tracing::info!("{line}"));
    }

    fn warn(&mut self, line: &str) {
        self.bar.suspend(|| tracing::warn!("{line}"));
    }

    fn finish(&mut self) {
        self.bar.finish_and_clear();
    }
}
