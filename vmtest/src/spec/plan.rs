//! `strata test --dry-run`: what a run of a `TestConfig` will do, boot by
//! boot, without booting. A pure function of the config, kept next to the
//! engine it describes: whoever changes which boots the engine makes or
//! which checks run in them changes this too (its snapshot shows it).
//!
//! Where it depends on the built-in checks that the engine adds
//! (`boot-health`, `shutdown`, `state-contract`), it finds them by name in
//! the registry, so until a check exists it is simply not listed (and
//! `state-contract` is shown whenever `[state] preserve` names paths).

use super::BuildSpec;
use crate::checks::user::When;
use crate::checks::{CheckId, Phase};
use crate::run::{BootMode, TestConfig};
use std::fmt::Write;

/// The built-in check of that name, if the registry has it.
fn builtin(name: &str) -> Option<CheckId> {
    name.parse().ok()
}

fn selected(cfg: &TestConfig, name: &str) -> bool {
    builtin(name).is_some_and(|id| cfg.checks.contains(&id))
}

/// Checks rendered in their own place, not in boot 1's list of first-boot
/// checks: `shutdown` judges the clean shutdown before a later boot,
/// `state-contract` records after setup and compares in later phases.
const OWN_PLACE: [&str; 2] = ["shutdown", "state-contract"];

/// Built-in checks that run again in the plain run's later boots (after
/// `shutdown`, which only the clean reboot has), in this order.
const LATER: [&str; 3] = ["boot-health", "overmount", "persistence"];

/// Whether `state-contract` runs: paths to preserve, and the check selected
/// (always, before the registry has it).
fn state_contract(cfg: &TestConfig) -> bool {
    !cfg.preserve.is_empty() && builtin("state-contract").is_none_or(|id| cfg.checks.contains(&id))
}

/// Whether the plain run has its reboot and power-cut boots: a check that
/// needs them (persistence, shutdown), paths to preserve across them, or a
/// user check that names one of their phases. A user check with default
/// phases runs in them when they happen but does not make them happen.
pub fn plain_run_reboots(cfg: &TestConfig) -> bool {
    selected(cfg, "persistence")
        || selected(cfg, "shutdown")
        || !cfg.preserve.is_empty()
        || cfg.user_checks.iter().any(|c| {
            c.phases
                .as_ref()
                .is_some_and(|p| p.contains(&When::Reboot) || p.contains(&When::PowerCut))
        })
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
        .filter(|id| {
            id.phase() == Phase::FirstBoot
                && cfg.checks.contains(id)
                && !OWN_PLACE.contains(&id.name())
        })
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
    if !state_contract(cfg) {
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
    if !plain_run_reboots(cfg) {
        return;
    }
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
        if when == When::Reboot && selected(cfg, "shutdown") {
            builtins.push("shutdown");
        }
        builtins.extend(LATER.into_iter().filter(|n| selected(cfg, n)));
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

fn lifecycle(cfg: &TestConfig, label: &str, out: &mut String) {
    let checks = first_boot_checks(cfg).join(", ");
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
        ],
    );
    let upgrade = format!("upgrade to {label}");
    for (n, why, when) in [
        (2, upgrade.as_str(), When::Upgrade),
        (3, "rollback to the old default", When::Rollback),
    ] {
        let mut builtins = String::new();
        if selected(cfg, "shutdown") {
            builtins.push_str("shutdown, ");
        }
        builtins.push_str(&checks);
        // The lifecycle's own row: tokens written before each change.
        builtins.push_str(if checks.is_empty() {
            "tokens"
        } else {
            ", tokens"
        });
        boot_line(
            out,
            n,
            why,
            cfg.boot,
            when,
            vec![builtins, user_part(cfg, when), contract_part(cfg, false)],
        );
    }
}
