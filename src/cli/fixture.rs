//! `strata fixture debian [--output DIR | --tar OUT.tar] [--cache-dir DIR]
//! [--rebuild]`: the
//! arguments and the terminal UI of `strata_builder::fixture` (the engine:
//! mmdebstrap, the cache, the copy). stdout: the rootfs path, nothing else.

use super::exit;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;
use strata_builder::fixture::{self, recipe, Event, FixtureOptions};

#[derive(clap::Args)]
pub struct FixtureArgs {
    /// The fixture to build.
    #[arg(value_enum)]
    which: Which,
    /// Put a copy of the rootfs here (replaced if it is an earlier fixture
    /// output). Without it, the cache path is printed.
    #[arg(long, short, conflicts_with = "tar")]
    output: Option<PathBuf>,
    /// Write the rootfs as a tar archive here instead (for `strata build
    /// --rootfs OUT.tar`): as root, an archive of the cached rootfs; as an
    /// ordinary user, built by mmdebstrap's unshare mode (needs the uidmap
    /// package and a range in /etc/subuid and /etc/subgid).
    #[arg(long, value_name = "OUT.tar")]
    tar: Option<PathBuf>,
    /// Cache directory [default: $XDG_CACHE_HOME/strata, /var/cache/strata
    /// as root, else ~/.cache/strata].
    #[arg(long, env = "STRATA_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Build again even when the cache has this recipe.
    #[arg(long)]
    rebuild: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Which {
    /// Debian bookworm minbase + systemd, kernel, qemu-guest-agent.
    Debian,
}

pub fn run(args: FixtureArgs) -> u8 {
    let recipe = match args.which {
        Which::Debian => recipe::DEBIAN,
    };
    let opts = FixtureOptions {
        output: args.output,
        cache_dir: args.cache_dir,
        rebuild: args.rebuild,
    };
    let mut ui = Ui::new(recipe.name);
    let result = match &args.tar {
        Some(out) => fixture::fixture_tar(&recipe, &opts, out, &mut |e| ui.event(e)),
        None => fixture::fixture(&recipe, &opts, &mut |e| ui.event(e)),
    };
    ui.finish();
    match result {
        Ok(path) => {
            println!("{}", path.display());
            0
        }
        Err(e) => exit::fail(e),
    }
}

/// A spinner with mmdebstrap's current phase on a terminal; one line per
/// phase otherwise (CI logs).
struct Ui {
    name: &'static str,
    bar: Option<ProgressBar>,
    tty: bool,
}

impl Ui {
    fn new(name: &'static str) -> Ui {
        Ui {
            name,
            bar: None,
            tty: std::io::stderr().is_terminal(),
        }
    }

    fn line(&self, text: String) {
        match &self.bar {
            Some(b) => b.println(text),
            None => eprintln!("{text}"),
        }
    }

    fn event(&mut self, e: Event) {
        let name = self.name;
        match e {
            Event::WaitingForLock => {
                self.line(format!(
                    "strata: fixture {name}: waiting for another strata building it"
                ));
            }
            Event::Cached { key, rootfs } => self.line(format!(
                "strata: fixture {name}: cached ({key}) at {}",
                rootfs.display()
            )),
            Event::BuildStarted if self.tty => {
                let b = ProgressBar::new_spinner()
                    .with_style(
                        ProgressStyle::with_template(
                            "{spinner} fixture {prefix}: {msg} [{elapsed}]",
                        )
                        .expect("valid template"),
                    )
                    .with_prefix(name)
                    .with_message("starting mmdebstrap");
                b.enable_steady_tick(Duration::from_millis(120));
                self.bar = Some(b);
            }
            Event::BuildStarted => {}
            Event::Phase { phase, elapsed } => match &self.bar {
                Some(b) => b.set_message(phase),
                None => eprintln!(
                    "strata: fixture {name} [{:>3.0} s] {phase}",
                    elapsed.as_secs_f64()
                ),
            },
            Event::Built { seconds, rootfs } => {
                self.finish();
                eprintln!(
                    "strata: fixture {name}: built in {seconds:.0} s, cached at {}",
                    rootfs.display()
                );
            }
            Event::Copied { to, seconds, total } => eprintln!(
                "strata: fixture {name}: copied to {} in {seconds:.1} s (total {total:.1} s)",
                to.display()
            ),
            Event::Archived { to, seconds, .. } => eprintln!(
                "strata: fixture {name}: archived to {} in {seconds:.1} s",
                to.display()
            ),
            Event::Warning(w) => self.line(format!("strata: warning: {w}")),
        }
    }

    fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}
