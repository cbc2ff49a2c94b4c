//! `strata test --dry-run`: what a run of a `TestConfig` will do, boot by
//! boot, without booting. A pure function of the config, kept next to the
//! engine it describes: whoever changes which boots the engine makes or
//! which checks run in them changes this too (its snapshot shows it).
//! Whether the plain run reboots is the engine's rule
//! (`run::plain_run_reboots`), asked, not restated.

use super::BuildSpec;
use crate::checks::user::When;
use crate::checks::{CheckId, Phase};
use crate::qemu::BootMode;
use crate::run::{self, TestConfig};
use std::fmt::Write;

fn selected(cfg: &TestConfig, id: CheckId) -> bool {
    cfg.checks.contains(&id)
}

/// The plan, one line per boot and per scenario, after a header with the
/// image (and whether `[build]` makes it first) and the machine.
pub fn render(cfg: &TestConfig, build: Option<&BuildSpec>) -> String {
    let mut out = String::new();
    let _ = write!(out, "image: {}", cfg.image.display());
    if let Some(b) = build {
        let _ = write!(
            out,
            " (built first from {}, size {})",
            b.rootfs.value.display(),
            b.size
        );
    }
    out.push('\n');
    let _ = writeln!(
        out,
        "machine: {} MiB, {} vCPU{}, accel {}, disk bus {}, timeout {} s, qemu {}",
        cfg.memory_mib,
        cfg.cpus,
        if cfg.cpus == 1 { "" } else { "s" },
        super::value_name(cfg.accel),
        super::value_name(cfg.disk_bus),
        cfg.timeout.as_secs(),
        cfg.qemu_binary.display()
    );
    let skipped: Vec<&str> = CheckId::ALL
        .into_iter()
        .filter(|id| !cfg.checks.contains(id))
        .map(CheckId::name)
        .collect();
    if !skipped.is_empty() {
        let _ = writeln!(out, "not run (skipped): {}", skipped.join(", "));
    }
    match &cfg.lifecycle {
        None => plain(cfg, &mut out),
        Some(l) => lifecycle(cfg, &l.label, &mut out),
    }
    for s in &cfg.scenarios {
        let cmds: Vec<String> = s.commands.iter().map(|c| format!("`{c}`")).collect();
        let mut judged: Vec<String> = CheckId::ALL
            .into_iter()
            .filter(|id| s.checks.contains(id))
            .map(|id| id.name().to_owned())
            .collect();
        if !s.user_checks.is_empty() {
            judged.push(format!("user: {}", s.user_checks.join(", ")));
        }
        let _ = writeln!(
            out,
            "scenario {} (restore of the guest saved after boot 1): {} → {}",
            s.name,
            cmds.join("; "),
            judged.join("; ")
        );
    }
    out
}

/// Boot 1's first-boot built-ins, in registry order.
fn first_boot_checks(cfg: &TestConfig) -> Vec<&'static str> {
    CheckId::ALL
        .into_iter()
        .filter(|id| id.phase() == Phase::FirstBoot && cfg.checks.contains(id))
        .map(CheckId::name)
        .collect()
}

/// One boot's line: `boot N WHY (VIA) — phase P: part; part; …`.
fn boot_line(out: &mut String, n: u32, why: &str, via: BootMode, when: When, parts: Vec<String>) {
    let parts: Vec<String> = parts.into_iter().filter(|p| !p.is_empty()).collect();
    let body = if parts.is_empty() {
        "no checks".to_owned()
    } else {
        parts.join("; ")
    };
    let why = if why.is_empty() {
        String::new()
    } else {
        format!(" {why}")
    };
    let _ = writeln!(out, "boot {n}{why} ({}) — phase {when}: {body}", via.name());
}

fn setup_part(cfg: &TestConfig) -> String {
    match cfg.setup.len() {
        0 => String::new(),
        1 => "setup (1 command)".into(),
        n => format!("setup ({n} commands)"),
    }
}

fn user_part(cfg: &TestConfig, when: When) -> String {
    let names: Vec<&str> = cfg
        .user_checks
        .iter()
        .filter(|c| c.runs_in(when))
        .map(|c| c.name.as_str())
        .collect();
    if names.is_empty() {
        String::new()
    } else {
        format!("user: {}", names.join(", "))
    }
}

/// Boot 1 records the paths to preserve; later phases compare.
fn contract_part(cfg: &TestConfig, first: bool) -> String {
    if cfg.preserve.is_empty() || !selected(cfg, CheckId::StateContract) {
        String::new()
    } else if first {
        let n = cfg.preserve.len();
        format!(
            "state-contract records {n} path{}",
            if n == 1 { "" } else { "s" }
        )
    } else {
        "state-contract".into()
    }
}

/// The closing line: boot-health judges every boot the plan lists.
fn health_line(cfg: &TestConfig, out: &mut String) {
    if selected(cfg, CheckId::BootHealth) {
        let _ = writeln!(
            out,
            "boot-health: the console, journal and failed units of every boot above"
        );
    }
}

fn plain(cfg: &TestConfig, out: &mut String) {
    boot_line(
        out,
        1,
        "",
        cfg.boot,
        When::Boot,
        vec![
            setup_part(cfg),
            first_boot_checks(cfg).join(", "),
            user_part(cfg, When::Boot),
            contract_part(cfg, true),
        ],
    );
    if run::plain_run_reboots(cfg) {
        // `later_boots` applies only to an extlinux run (TestConfig).
        let via = match cfg.boot {
            BootMode::Direct => BootMode::Direct,
            BootMode::Extlinux => cfg.later_boots,
        };
        for (n, why, when) in [
            (2, "clean reboot", When::Reboot),
            (3, "power cut", When::PowerCut),
        ] {
            let mut builtins: Vec<&str> = Vec::new();
            if when == When::Reboot && selected(cfg, CheckId::Shutdown) {
                builtins.push("shutdown (of boot 1)");
            }
            for id in [CheckId::Overmount, CheckId::Persistence] {
                if selected(cfg, id) {
                    builtins.push(id.name());
                }
            }
            boot_line(
                out,
                n,
                why,
                via,
                when,
                vec![
                    builtins.join(", "),
                    user_part(cfg, when),
                    contract_part(cfg, false),
                ],
            );
        }
    }
    health_line(cfg, out);
}

fn lifecycle(cfg: &TestConfig, label: &str, out: &mut String) {
    let checks = first_boot_checks(cfg).join(", ");
    let shutdown = match selected(cfg, CheckId::Shutdown) {
        true => "clean poweroff: shutdown".to_owned(),
        false => "clean poweroff".to_owned(),
    };
    boot_line(
        out,
        1,
        "current default",
        cfg.boot,
        When::Boot,
        vec![
            setup_part(cfg),
            checks.clone(),
            user_part(cfg, When::Boot),
            contract_part(cfg, true),
            shutdown.clone(),
        ],
    );
    let upgrade = format!("upgrade to {label}");
    for (n, why, when) in [
        (2, upgrade.as_str(), When::Upgrade),
        (3, "rollback to the old default", When::Rollback),
    ] {
        // The lifecycle's own row: the tokens written before each change.
        let builtins = match checks.is_empty() {
            true => "tokens".to_owned(),
            false => format!("{checks}, tokens"),
        };
        let last = match when {
            When::Upgrade => shutdown.clone(),
            _ => String::new(),
        };
        boot_line(
            out,
            n,
            why,
            cfg.boot,
            when,
            vec![
                builtins,
                user_part(cfg, when),
                contract_part(cfg, false),
                last,
            ],
        );
    }
    health_line(cfg, out);
}
