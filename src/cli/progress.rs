//! The progress display every long-running subcommand shares (build,
//! upgrade): one line per step, a spinner while it runs, a bar while a
//! tree is copied; plain lines when stderr is not a terminal (CI logs).

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::time::Duration;
use strata_builder::progress::Event;

/// One line per step; a bar while the rootfs is copied. Plain lines when
/// stderr is not a terminal (CI logs).
pub struct Progress {
    bar: Option<ProgressBar>,
    tty: bool,
}

impl Progress {
    pub fn new() -> Self {
        Progress {
            bar: None,
            tty: std::io::stderr().is_terminal(),
        }
    }

    pub fn event(&mut self, e: Event) {
        match e {
            Event::StepStarted(step) => {
                if !self.tty {
                    eprintln!("→ {}", step.describe());
                } else {
                    let bar = ProgressBar::new_spinner().with_message(step.describe());
                    bar.set_style(ProgressStyle::with_template("{spinner} {msg}").expect("style"));
                    bar.enable_steady_tick(Duration::from_millis(120));
                    self.bar = Some(bar);
                }
            }
            Event::StepFinished(step, took) => {
                let line = format!("✓ {} ({:.1}s)", step.describe(), took.as_secs_f64());
                match self.bar.take() {
                    Some(bar) => {
                        bar.set_style(ProgressStyle::with_template("{msg}").expect("style"));
                        bar.finish_with_message(line);
                    }
                    None => eprintln!("{line}"),
                }
            }
            Event::CopyProgress { done, total } => {
                if let Some(bar) = &self.bar {
                    if bar.length().is_none() {
                        bar.set_style(
                            ProgressStyle::with_template(
                                "{spinner} {msg} [{bar:30}] {pos}/{len} entries",
                            )
                            .expect("style")
                            .progress_chars("=> "),
                        );
                    }
                    bar.set_length(total.max(done));
                    bar.set_position(done);
                }
            }
            Event::Note(n) => match &self.bar {
                Some(bar) => bar.println(n),
                None => eprintln!("{n}"),
            },
        }
    }

    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}
