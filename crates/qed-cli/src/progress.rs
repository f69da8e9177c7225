//! The progress bar of `-p`.

/// A progress reporter for `-p`: a bar on stderr when enabled, nothing otherwise.
pub struct ProgressReport {
    bar: Option<indicatif::ProgressBar>,
}

impl ProgressReport {
    /// A reporter that draws only when `enabled`.
    pub fn new(enabled: bool) -> Self {
        let bar = enabled.then(|| {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "    ({percent:>3}.00/100%) [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar
        });
        Self { bar }
    }

    /// The callback to hand to an operation.
    pub fn update(&mut self, done: u64, total: u64) {
        if let Some(bar) = &self.bar {
            bar.set_length(total);
            bar.set_position(done);
        }
    }

    /// Ends the bar, leaving it on screen.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}
