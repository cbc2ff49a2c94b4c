//! From the file's text to a [`Spec`]: serde reads the raw types (syntax,
//! types, unknown keys), then every value is judged with its line.

use super::raw::{self, RawSpec, S};
use super::{
    builtin_checks, unknown_check, value_name, BuildSpec, Located, MachineSpec, OutputSpec, Site,
    Spec, SpecError, UpgradeSpec,
};
use crate::checks::user::{UserCheck, When};
use crate::checks::CheckId;
use crate::run::valid_name;
use crate::run::Scenario;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

struct Ctx<'a> {
    file: &'a Path,
    text: &'a str,
    /// Relative paths in the file are relative to this.
    dir: PathBuf,
}

impl Ctx<'_> {
    fn line(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    fn site(&self, span: Range<usize>, key: impl Into<String>) -> Site {
        Site {
            line: self.line(span.start),
            key: key.into(),
        }
    }

    fn err(&self, span: Range<usize>, key: impl Into<String>, msg: impl Into<String>) -> SpecError {
        SpecError {
            file: self.file.to_owned(),
            line: self.line(span.start),
            key: key.into(),
            message: msg.into(),
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.join(p)
    }

    fn located_path(&self, v: &S<String>, key: &str) -> Result<Located<PathBuf>, SpecError> {
        Ok(Located {
            value: self.path(self.nonempty(v, key)?),
            site: self.site(v.span(), key),
        })
    }

    /// A string that must say something (a command, a path, a name).
    fn nonempty<'v>(&self, v: &'v S<String>, key: &str) -> Result<&'v str, SpecError> {
        if v.get_ref().trim().is_empty() {
            return Err(self.err(v.span(), key, "is empty"));
        }
        Ok(v.get_ref())
    }

    /// A value `strata test`/`strata build` takes as a flag: the same names.
    fn value<E: clap::ValueEnum>(&self, v: &S<String>, key: &str) -> Result<E, SpecError> {
        E::from_str(v.get_ref(), false).map_err(|_| {
            let known: Vec<String> = E::value_variants()
                .iter()
                .map(|e| value_name(e.clone()))
                .collect();
            self.err(
                v.span(),
                key,
                format!(
                    "unknown value {:?} (one of: {})",
                    v.get_ref(),
                    known.join(", ")
                ),
            )
        })
    }

    /// Every pattern of a test file is multi-line (`^`/`$` at each line):
    /// the user's checks match command output, the ignores single lines.
    fn regex(&self, v: &S<String>, key: &str) -> Result<regex::Regex, SpecError> {
        crate::checks::user::pattern(v.get_ref()).map_err(|e| {
            // The regex crate's message is a multi-line picture; its last
            // line says what is wrong.
            let why = e.to_string();
            let why = why.lines().last().unwrap_or("").trim();
            let why = why.strip_prefix("error: ").unwrap_or(why).to_owned();
            self.err(
                v.span(),
                key,
                format!("invalid regex {:?}: {why}", v.get_ref()),
            )
        })
    }
}

pub(super) fn resolve(file: &Path, text: &str) -> Result<Spec, SpecError> {
    let dir = match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let cx = Ctx { file, text, dir };
    let raw = deserialize(&cx)?;

    let image = raw
        .image
        .as_ref()
        .map(|v| cx.located_path(v, "image"))
        .transpose()?;
    let build = raw
        .build
        .as_ref()
        .map(|b| build(&cx, b, image.as_ref()))
        .transpose()?;
    let machine = raw
        .machine
        .as_ref()
        .map(|m| machine(&cx, m))
        .transpose()?
        .unwrap_or_default();

    let mut user_checks: Vec<UserCheck> = Vec::new();
    let mut phase_sites = Vec::new();
    for (i, c) in raw.check.iter().enumerate() {
        let (check, site) = user_check(&cx, i, c, &user_checks, raw.upgrade.is_some())?;
        user_checks.push(check);
        phase_sites.push(site);
    }
    let user_names: Vec<&str> = user_checks.iter().map(|c| c.name.as_str()).collect();

    let checks = match &raw.checks {
        None => None,
        Some(list) => {
            for n in list.get_ref() {
                builtin_checks(std::slice::from_ref(n.get_ref()), &user_names)
                    .map_err(|e| cx.err(n.span(), "checks", e))?;
            }
            let names: Vec<String> = list.get_ref().iter().map(|n| n.get_ref().clone()).collect();
            Some(builtin_checks(&names, &user_names).expect("each name was accepted above"))
        }
    };

    let mut setup = Vec::new();
    for (i, s) in raw.setup.iter().enumerate() {
        let run = cx.nonempty(&s.get_ref().run, &format!("setup[{i}].run"))?;
        setup.push(run.to_owned());
    }

    let mut preserve = Vec::new();
    for (i, p) in raw
        .state
        .as_ref()
        .map(|s| s.preserve.as_slice())
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let key = format!("state.preserve[{i}]");
        let path = cx.nonempty(p, &key)?;
        if !path.starts_with('/') {
            return Err(cx.err(
                p.span(),
                key,
                format!("{path:?} is not absolute (a path in the guest, e.g. /var/lib/app)"),
            ));
        }
        if path.split('/').any(|c| c == "..") {
            return Err(cx.err(
                p.span(),
                key,
                format!("{path:?} has a \"..\" component: name the path itself"),
            ));
        }
        preserve.push(path.to_owned());
    }

    let mut scenarios: Vec<Scenario> = Vec::new();
    for (i, s) in raw.scenario.iter().enumerate() {
        scenarios.push(scenario(&cx, i, s, &scenarios, &user_names)?);
    }
    let scenario_site = raw
        .scenario
        .first()
        .map(|s| cx.site(s.get_ref().name.span(), "scenario[0]"));

    let upgrade = raw.upgrade.as_ref().map(|u| upgrade(&cx, u)).transpose()?;

    let mut boot_health_ignore = Vec::new();
    if let Some(b) = &raw.boot_health {
        for (i, r) in b.ignore.iter().enumerate() {
            boot_health_ignore.push(cx.regex(r, &format!("boot_health.ignore[{i}]"))?);
        }
    }

    let output = match &raw.output {
        None => OutputSpec::default(),
        Some(o) => {
            let p = |v: &Option<S<String>>, key: &str| {
                v.as_ref()
                    .map(|v| cx.nonempty(v, key).map(|s| cx.path(s)))
                    .transpose()
            };
            OutputSpec {
                json: p(&o.json, "output.json")?,
                junit: p(&o.junit, "output.junit")?,
                artifacts: p(&o.artifacts, "output.artifacts")?,
            }
        }
    };

    let spec = Spec {
        file: file.to_owned(),
        image,
        build,
        machine,
        checks,
        setup,
        user_checks,
        preserve,
        scenarios,
        upgrade,
        boot_health_ignore,
        output,
        phase_sites,
        scenario_site,
    };
    spec.check_run_shape(spec.upgrade.is_some())?;
    Ok(spec)
}

/// Syntax, types and unknown keys: toml's error has the place (its span),
/// serde_path_to_error the key's path.
fn deserialize(cx: &Ctx) -> Result<RawSpec, SpecError> {
    let de = toml::Deserializer::parse(cx.text).map_err(|e| toml_error(cx, &e, String::new()))?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = key_path(&e.path().to_string());
        toml_error(cx, e.inner(), key)
    })
}

/// The keys of the file's top level (`RawSpec`'s fields).
const TOP_LEVEL: [&str; 2] = ["image", "checks"];

fn toml_error(cx: &Ctx, e: &toml::de::Error, key: String) -> SpecError {
    let line = e.span().map(|s| cx.line(s.start)).unwrap_or(0);
    // toml words unknown keys as serde does; say it as the rest of strata.
    let mut message = e.message().trim().replace('`', "\"");
    // TOML puts every key after `[machine]` into that table: a top-level
    // key written below a table is the classic mistake.
    if let Some((table, name)) = key.rsplit_once('.') {
        if message.starts_with("unknown field") && TOP_LEVEL.contains(&name) {
            message.push_str(&format!(
                " ({name} is a top-level key: TOML reads it as part of [{table}]; move it above the first [table])"
            ));
        }
    }
    SpecError {
        file: cx.file.to_owned(),
        line,
        key,
        message,
    }
}

/// serde_path_to_error's path without `Spanned`'s private fields, and
/// without the "." it prints for an empty path.
fn key_path(path: &str) -> String {
    let cleaned: Vec<&str> = path
        .split('.')
        .filter(|seg| !seg.starts_with("$__serde_spanned_private"))
        .collect();
    let joined = cleaned.join(".").replace(".[", "[");
    if joined == "." || joined == "?" {
        String::new()
    } else {
        joined
    }
}

fn build(
    cx: &Ctx,
    b: &S<raw::RawBuild>,
    image: Option<&Located<PathBuf>>,
) -> Result<BuildSpec, SpecError> {
    let r = b.get_ref();
    let Some(rootfs) = &r.rootfs else {
        return Err(cx.err(
            b.span(),
            "build",
            "has no rootfs (the directory or tar archive to build the image from)",
        ));
    };
    let Some(size) = &r.size else {
        return Err(cx.err(b.span(), "build", "has no size (e.g. size = \"4G\")"));
    };
    strata_builder::size::parse_size(size.get_ref())
        .map_err(|e| cx.err(size.span(), "build.size", e.to_string()))?;
    let output = match (&r.output, image) {
        (Some(o), _) => cx.path(cx.nonempty(o, "build.output")?),
        (None, Some(i)) => i.value.clone(),
        (None, None) => {
            let stem = cx
                .file
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "image".into());
            cx.dir.join(format!("{stem}.img"))
        }
    };
    if let Some(l) = &r.label {
        strata_builder::layout::validate_label(l.get_ref())
            .map_err(|e| cx.err(l.span(), "build.label", e.to_string()))?;
    }
    let opt_path = |v: &Option<S<String>>, key: &str| {
        v.as_ref()
            .map(|v| cx.nonempty(v, key).map(|s| cx.path(s)))
            .transpose()
    };
    Ok(BuildSpec {
        rootfs: cx.located_path(rootfs, "build.rootfs")?,
        size: size.get_ref().clone(),
        output,
        label: r.label.as_ref().map(|l| l.get_ref().clone()),
        state_dirs: r.state_dirs.as_ref().map(|d| d.get_ref().clone()),
        root_device: r.root_device.as_ref().map(|d| d.get_ref().clone()),
        kernel: opt_path(&r.kernel, "build.kernel")?,
        initramfs: opt_path(&r.initramfs, "build.initramfs")?,
        kernel_args: r.kernel_args.as_ref().map(|k| k.get_ref().clone()),
        state_migration: r
            .state_migration
            .as_ref()
            .map(|v| cx.value(v, "build.state_migration"))
            .transpose()?,
        fs_uuid: r.fs_uuid.as_ref().map(|u| u.get_ref().clone()),
        backend: r
            .backend
            .as_ref()
            .map(|v| cx.value(v, "build.backend"))
            .transpose()?,
        force: r.force.unwrap_or(false),
    })
}

fn machine(cx: &Ctx, m: &raw::RawMachine) -> Result<MachineSpec, SpecError> {
    let positive = |v: &Option<S<u32>>, key: &str| -> Result<Option<u32>, SpecError> {
        match v {
            Some(n) if *n.get_ref() == 0 => Err(cx.err(n.span(), key, "must be at least 1")),
            Some(n) => Ok(Some(*n.get_ref())),
            None => Ok(None),
        }
    };
    let timeout = match &m.timeout {
        Some(t) if *t.get_ref() == 0 => {
            return Err(cx.err(t.span(), "machine.timeout", "must be at least 1 (seconds)"))
        }
        Some(t) => Some(Duration::from_secs(*t.get_ref())),
        None => None,
    };
    Ok(MachineSpec {
        memory_mib: positive(&m.memory, "machine.memory")?,
        cpus: positive(&m.cpus, "machine.cpus")?,
        accel: m
            .accel
            .as_ref()
            .map(|v| cx.value(v, "machine.accel"))
            .transpose()?,
        timeout,
        boot: m
            .boot
            .as_ref()
            .map(|v| cx.value(v, "machine.boot"))
            .transpose()?,
        later_boots: m
            .later_boots
            .as_ref()
            .map(|v| cx.value(v, "machine.later_boots"))
            .transpose()?,
        disk_bus: m
            .disk_bus
            .as_ref()
            .map(|v| cx.value(v, "machine.disk_bus"))
            .transpose()?,
        // A bare name is looked up in PATH, as `--qemu` does; a path is
        // the file's.
        qemu: match &m.qemu {
            None => None,
            Some(q) => {
                let s = cx.nonempty(q, "machine.qemu")?;
                Some(if s.contains('/') {
                    cx.path(s)
                } else {
                    PathBuf::from(s)
                })
            }
        },
    })
}

fn user_check(
    cx: &Ctx,
    i: usize,
    c: &S<raw::RawCheck>,
    before: &[UserCheck],
    lifecycle: bool,
) -> Result<(UserCheck, Option<Site>), SpecError> {
    let r = c.get_ref();
    let key = |k: &str| format!("check[{i}].{k}");
    let name = cx.nonempty(&r.name, &key("name"))?.to_owned();
    if !valid_name(&name) {
        return Err(cx.err(
            r.name.span(),
            key("name"),
            format!("{name:?}: use up to 64 letters, digits, '-' and '_' (it names report rows, PHASE/NAME)"),
        ));
    }
    if name.parse::<CheckId>().is_ok() {
        return Err(cx.err(
            r.name.span(),
            key("name"),
            format!("{name:?} is a built-in check's name: pick another"),
        ));
    }
    if let Some(j) = before.iter().position(|b| b.name == name) {
        return Err(cx.err(
            r.name.span(),
            key("name"),
            format!("{name:?} is check[{j}]'s name too: names must be unique"),
        ));
    }
    let run = r
        .run
        .as_ref()
        .map(|v| cx.nonempty(v, &key("run")).map(str::to_owned))
        .transpose()?;
    let wait_for_unit = match &r.wait_for_unit {
        None => None,
        Some(u) => {
            let unit = cx.nonempty(u, &key("wait_for_unit"))?;
            if unit.chars().any(char::is_whitespace) {
                return Err(cx.err(
                    u.span(),
                    key("wait_for_unit"),
                    format!("{unit:?}: one unit name, without spaces"),
                ));
            }
            Some(unit.to_owned())
        }
    };
    if run.is_none() && wait_for_unit.is_none() {
        return Err(cx.err(
            c.span(),
            format!("check[{i}]"),
            format!("check {name:?} has neither run nor wait_for_unit: give at least one"),
        ));
    }
    let has_output_match =
        r.stdout_matches.is_some() || r.stdout_contains.is_some() || r.stderr_matches.is_some();
    if run.is_none() && (has_output_match || r.expect_exit.is_some()) {
        return Err(cx.err(
            c.span(),
            format!("check[{i}]"),
            format!("check {name:?} matches a command's exit or output but has no run"),
        ));
    }
    let regex =
        |v: &Option<S<String>>, k: &str| v.as_ref().map(|v| cx.regex(v, &key(k))).transpose();
    let (phases, site) = match &r.phases {
        None => (None, None),
        Some(list) => {
            let k = key("phases");
            if list.get_ref().is_empty() {
                return Err(cx.err(
                    list.span(),
                    k,
                    "is empty: the check would never run (leave phases out for every phase)",
                ));
            }
            let mut phases = Vec::new();
            for p in list.get_ref() {
                let Some(w) = When::parse(p.get_ref()) else {
                    return Err(cx.err(
                        p.span(),
                        k,
                        format!(
                            "unknown phase {:?} (the run has: {})",
                            p.get_ref(),
                            super::names(super::phases_of_run(lifecycle))
                        ),
                    ));
                };
                if !phases.contains(&w) {
                    phases.push(w);
                }
            }
            phases.sort();
            (Some(phases), Some(cx.site(list.span(), k)))
        }
    };
    Ok((
        UserCheck {
            name,
            run,
            wait_for_unit,
            expect_exit: r.expect_exit.unwrap_or(0),
            stdout_matches: regex(&r.stdout_matches, "stdout_matches")?,
            stdout_contains: r.stdout_contains.as_ref().map(|s| s.get_ref().clone()),
            stderr_matches: regex(&r.stderr_matches, "stderr_matches")?,
            phases,
        },
        site,
    ))
}

fn scenario(
    cx: &Ctx,
    i: usize,
    s: &S<raw::RawScenario>,
    before: &[Scenario],
    user_names: &[&str],
) -> Result<Scenario, SpecError> {
    let r = s.get_ref();
    let key = |k: &str| format!("scenario[{i}].{k}");
    let name = cx.nonempty(&r.name, &key("name"))?.to_owned();
    if !valid_name(&name) {
        return Err(cx.err(
            r.name.span(),
            key("name"),
            format!(
                "{name:?}: use up to 64 letters, digits, '-' and '_' (it prefixes report rows)"
            ),
        ));
    }
    if let Some(j) = before.iter().position(|b| b.name == name) {
        return Err(cx.err(
            r.name.span(),
            key("name"),
            format!("{name:?} is scenario[{j}]'s name too: names must be unique"),
        ));
    }
    let commands = match r.run.get_ref() {
        raw::Commands::One(c) => vec![c.clone()],
        raw::Commands::Many(v) => v.clone(),
    };
    if commands.is_empty() {
        return Err(cx.err(r.run.span(), key("run"), "has no command"));
    }
    if let Some(n) = commands.iter().position(|c| c.trim().is_empty()) {
        let k = match r.run.get_ref() {
            raw::Commands::One(_) => key("run"),
            raw::Commands::Many(_) => key(&format!("run[{n}]")),
        };
        return Err(cx.err(r.run.span(), k, "is empty"));
    }
    let mut checks = Vec::new();
    let mut user_checks = Vec::new();
    for n in r.checks.get_ref() {
        match n.get_ref().parse::<CheckId>() {
            Ok(id) if !checks.contains(&id) => checks.push(id),
            Ok(_) => {}
            Err(_) if user_names.contains(&n.get_ref().as_str()) => {
                if !user_checks.contains(n.get_ref()) {
                    user_checks.push(n.get_ref().clone());
                }
            }
            Err(_) => {
                return Err(cx.err(
                    n.span(),
                    key("checks"),
                    unknown_check(n.get_ref(), user_names),
                ))
            }
        }
    }
    if checks.is_empty() && user_checks.is_empty() {
        return Err(cx.err(
            r.checks.span(),
            key("checks"),
            "names no check to judge the scenario",
        ));
    }
    checks.sort();
    Ok(Scenario {
        name,
        commands,
        checks,
        user_checks,
    })
}

fn upgrade(cx: &Ctx, u: &S<raw::RawUpgrade>) -> Result<UpgradeSpec, SpecError> {
    let r = u.get_ref();
    let label = match &r.label {
        None => None,
        Some(l) => {
            strata_builder::layout::validate_label(l.get_ref())
                .map_err(|e| cx.err(l.span(), "upgrade.label", e.to_string()))?;
            Some(Located {
                value: l.get_ref().clone(),
                site: cx.site(l.span(), "upgrade.label"),
            })
        }
    };
    Ok(UpgradeSpec {
        rootfs: cx.located_path(&r.rootfs, "upgrade.rootfs")?,
        label,
        state_migration: r
            .state_migration
            .as_ref()
            .map(|v| cx.value(v, "upgrade.state_migration"))
            .transpose()?,
        state_data: r
            .state_data
            .as_ref()
            .map(|v| cx.value(v, "upgrade.state_data"))
            .transpose()?,
        in_guest: r.in_guest.unwrap_or(false),
        power_cut: match &r.power_cut {
            None => None,
            Some(p) => Some(
                p.get_ref()
                    .parse()
                    .map_err(|e: String| cx.err(p.span(), "upgrade.power_cut", e))?,
            ),
        },
    })
}
