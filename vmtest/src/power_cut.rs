//! The power-cut matrix of an in-guest upgrade (`strata test --upgrade-to
//! … --power-cut steps|random:N[:SEED]|all`), the part that needs no VM:
//! which points to cut at, and how a boot after a cut is judged. The run
//! (`run::power_cut`) restores the guest saved after boot 1 for each
//! point, starts `strata upgrade --running` in it, cuts the power at the
//! point (QMP `quit`, nothing flushed), boots the disk as it was left
//! through its own bootloader, and reports what it saw here.

use crate::report::{CheckResult, Status};

/// Where the upgrade is cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CutPoint {
    /// Right after this step of the upgrade finished (it stops itself
    /// there: `STRATA_STOP_AFTER_STEP`).
    AfterStep(String),
    /// This many milliseconds after the upgrade started, wherever it is.
    After { millis: u64 },
}

impl CutPoint {
    /// The row's name: `power-cut/<step>`, `power-cut/at-<ms>ms`.
    pub fn row(&self) -> String {
        match self {
            CutPoint::AfterStep(s) => format!("power-cut/{s}"),
            CutPoint::After { millis } => format!("power-cut/at-{millis}ms"),
        }
    }
}

/// `--power-cut`: every step boundary (or the named ones), N random
/// moments (seeded), or both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub steps: bool,
    /// `steps:NAME,…`: only these boundaries (to run one point again, or
    /// to show where an unsafe upgrade breaks); empty: every one.
    pub only: Vec<String>,
    pub random: u32,
    pub seed: u64,
}

impl std::str::FromStr for Plan {
    type Err = String;

    /// `steps`, `steps:STEP,…`, `random:N[:SEED]`, `all[:SEED]` (every step
    /// and 2 random moments), or parts of those joined by `+`
    /// (`steps:flush,set-default+random:1:7`).
    fn from_str(s: &str) -> Result<Plan, String> {
        let bad = || {
            format!(
                "--power-cut {s:?}: say steps, steps:STEP[,STEP…], random:N[:SEED], all[:SEED], \
                 or such parts joined by + (N moments, seeded)"
            )
        };
        let seed = |x: Option<&str>| match x {
            None => Ok(seed_now()),
            Some(x) => x.parse().map_err(|_| bad()),
        };
        let mut plan = Plan {
            steps: false,
            only: Vec::new(),
            random: 0,
            seed: 0,
        };
        let mut seeded = false;
        for part in s.split('+') {
            let (kind, rest) = match part.split_once(':') {
                Some((k, r)) => (k, Some(r)),
                None => (part, None),
            };
            match (kind, rest) {
                ("steps", None) if !plan.steps => plan.steps = true,
                ("steps", Some(list)) if !plan.steps => {
                    plan.steps = true;
                    plan.only = list.split(',').map(str::to_owned).collect();
                    if plan.only.iter().any(|x| x.is_empty()) {
                        return Err(bad());
                    }
                }
                ("random", Some(args)) if !seeded => {
                    let mut args = args.split(':');
                    plan.random = args
                        .next()
                        .and_then(|n| n.parse().ok())
                        .filter(|n| *n > 0)
                        .ok_or_else(bad)?;
                    plan.seed = seed(args.next())?;
                    if args.next().is_some() {
                        return Err(bad());
                    }
                    seeded = true;
                }
                ("all", x) if !plan.steps && !seeded => {
                    plan.steps = true;
                    plan.random = 2;
                    plan.seed = seed(x)?;
                    seeded = true;
                }
                _ => return Err(bad()),
            }
        }
        Ok(plan)
    }
}

fn seed_now() -> u64 {
    crate::random_u64() % 1_000_000
}

/// The step whose end makes the new version the default: a cut after it
/// may boot either version, a cut before it must boot the old one.
pub const FLIP_STEP: &str = "set-default";

impl Plan {
    /// Refuses a named step the upgrade does not have (`steps`: its list,
    /// `strata upgrade --list-steps`).
    pub fn check(&self, steps: &[String]) -> Result<(), String> {
        match self.only.iter().find(|x| !steps.contains(x)) {
            Some(x) => Err(format!(
                "--power-cut: the upgrade has no step {x:?}; its steps: {}",
                steps.join(", ")
            )),
            None => Ok(()),
        }
    }

    /// The cut points, in order: after each step (`steps`, the upgrade's
    /// own list), then `random` moments within `span_ms` (the length of a
    /// whole upgrade), drawn from `seed` (reported, so a failure can be
    /// run again).
    pub fn points(&self, steps: &[String], span_ms: u64) -> Vec<CutPoint> {
        let mut out: Vec<CutPoint> = Vec::new();
        if self.steps {
            out.extend(
                steps
                    .iter()
                    .filter(|x| self.only.is_empty() || self.only.contains(x))
                    .cloned()
                    .map(CutPoint::AfterStep),
            );
        }
        let mut x = self
            .seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        for _ in 0..self.random {
            // A small LCG: reproducible from the seed, nothing more needed.
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let millis = (x >> 33) % span_ms.max(1);
            out.push(CutPoint::After { millis });
        }
        out
    }
}

/// What the guest showed after the cut and the cold boot.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AfterCut {
    /// The version `/` is the run subvolume of; None: it did not come up
    /// (`booted_error` says how).
    pub booted: Option<String>,
    pub booted_error: Option<String>,
    /// `strata versions --running --json` there: the versions and the default.
    pub versions: Vec<String>,
    pub default: Option<String>,
    /// Versions it lists that are not whole (debris shown as a version).
    pub partial: Vec<String>,
    /// The tokens written before the upgrade, as the `tokens` check judged them.
    pub tokens: Option<CheckResult>,
    /// The `[state] preserve` paths against their record after setup (the
    /// `state-contract` check's verdict); None when there are none.
    pub contract: Option<CheckResult>,
    /// The console's last lines, when no version came up: what it did
    /// instead.
    pub console: Vec<String>,
    /// The upgrade run again (or the new version made the default when it
    /// was whole already), and the version the next boot ran.
    pub rerun: Option<Result<String, String>>,
}

/// The verdict of one cut point. `flipped`: the cut came after the
/// default flip (only the old version may boot before it).
pub fn judge(
    point: &CutPoint,
    flipped: Option<bool>,
    old: &str,
    new: &str,
    seen: &AfterCut,
) -> CheckResult {
    let mut problems = Vec::new();
    let mut evidence = Vec::new();
    match (&seen.booted, &seen.booted_error) {
        (Some(b), _) => {
            evidence.push(format!("booted {b}"));
            let allowed: &[&str] = match flipped {
                Some(false) => &[old],
                _ => &[old, new],
            };
            if !allowed.contains(&b.as_str()) {
                problems.push(format!(
                    "booted {b}, not {} (a cut {} the default flip)",
                    allowed.join(" or "),
                    if flipped == Some(false) {
                        "before"
                    } else {
                        "after"
                    }
                ));
            }
        }
        (None, e) => {
            problems.push(format!(
                "the machine did not boot a whole version: {}",
                e.as_deref().unwrap_or("no version came up")
            ));
            evidence.extend(seen.console.iter().cloned());
        }
    }
    if seen.booted.is_some() {
        evidence.push(format!(
            "strata versions: {} (default {})",
            seen.versions.join(", "),
            seen.default.as_deref().unwrap_or("none")
        ));
        if seen.default != seen.booted {
            problems.push(format!(
                "strata versions says the default is {}, but {} booted",
                seen.default.as_deref().unwrap_or("none"),
                seen.booted.as_deref().unwrap_or("?")
            ));
        }
        if let Some(x) = seen.versions.iter().find(|v| *v != old && *v != new) {
            problems.push(format!("strata versions lists {x}, which no one deployed"));
        }
        if !seen.partial.is_empty() {
            problems.push(format!(
                "strata versions lists {} as a version that is not whole",
                seen.partial.join(", ")
            ));
        }
        match &seen.tokens {
            Some(t) if t.status == Status::Fail => {
                problems.push(format!("state tokens: {}", t.detail));
                evidence.extend(t.evidence.iter().cloned());
            }
            Some(t) => evidence.push(format!("tokens: {}", t.detail)),
            None => problems.push("the state tokens were not read".into()),
        }
        if let Some(c) = &seen.contract {
            match c.status {
                Status::Fail => {
                    problems.push(format!("[state] preserve: {}", c.detail));
                    evidence.extend(c.evidence.iter().cloned());
                }
                _ => evidence.push(format!("[state] preserve: {}", c.detail)),
            }
        }
        match &seen.rerun {
            Some(Ok(b)) if b == new => evidence.push(format!("upgrade run again: {new} boots")),
            Some(Ok(b)) => problems.push(format!(
                "after the upgrade was run again, {b} booted, not {new}"
            )),
            Some(Err(e)) => problems.push(format!("the upgrade run again failed: {e}")),
            None => problems.push("the upgrade was not run again".into()),
        }
    }
    let name = point.row();
    match problems.is_empty() {
        true => CheckResult::new(
            &name,
            Status::Pass,
            format!(
                "booted {} (a whole version), versions agree, tokens intact; run again, {new} boots",
                seen.booted.as_deref().unwrap_or("?")
            ),
            evidence,
        ),
        false => CheckResult::new(&name, Status::Fail, problems.join("; "), evidence),
    }
}

/// `strata versions --json`'s versions, the default, and the versions it
/// lists that are not whole.
pub fn parse_versions(json: &str, seen: &mut AfterCut) -> Result<(), String> {
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("strata versions --json: {e}"))?;
    for x in v["versions"].as_array().into_iter().flatten() {
        let Some(label) = x["label"].as_str() else {
            continue;
        };
        seen.versions.push(label.to_owned());
        if x["status"].as_str() != Some("whole") {
            seen.partial.push(label.to_owned());
        }
    }
    seen.default = v["default"].as_str().map(str::to_owned);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(booted: &str) -> AfterCut {
        AfterCut {
            booted: Some(booted.into()),
            booted_error: None,
            versions: vec!["factory".into(), "v2".into()],
            default: Some(booted.into()),
            partial: vec![],
            tokens: Some(CheckResult::new("tokens", Status::Pass, "6 intact", vec![])),
            contract: None,
            console: vec![],
            rerun: Some(Ok("v2".into())),
        }
    }

    #[test]
    fn before_the_flip_only_the_old_version_may_boot() {
        let p = CutPoint::AfterStep("commit-version".into());
        assert_eq!(
            judge(&p, Some(false), "factory", "v2", &seen("factory")).status,
            Status::Pass
        );
        let r = judge(&p, Some(false), "factory", "v2", &seen("v2"));
        assert_eq!(r.status, Status::Fail);
        assert!(
            r.detail
                .contains("booted v2, not factory (a cut before the default flip)"),
            "{}",
            r.detail
        );
        let p = CutPoint::AfterStep("set-default".into());
        assert_eq!(
            judge(&p, Some(true), "factory", "v2", &seen("v2")).status,
            Status::Pass
        );
        assert_eq!(r.name, "power-cut/commit-version");
    }

    #[test]
    fn no_boot_debris_a_disagreeing_default_or_a_failed_rerun_fail() {
        let p = CutPoint::After { millis: 1234 };
        let mut s = seen("factory");
        s.booted = None;
        s.booted_error = Some("no kernel line within 240 s".into());
        s.console = vec!["console: Could not find kernel image: /systems/default/vmlinuz".into()];
        let r = judge(&p, None, "factory", "v2", &s);
        assert!(
            r.evidence
                .iter()
                .any(|e| e.contains("Could not find kernel")),
            "{r:?}"
        );
        assert!(
            r.detail
                .starts_with("the machine did not boot a whole version"),
            "{}",
            r.detail
        );
        assert_eq!(r.name, "power-cut/at-1234ms");
        let mut s = seen("factory");
        s.default = Some("v2".into());
        s.partial = vec!["v2".into()];
        s.rerun = Some(Err("exit 2: label exists".into()));
        s.contract = Some(CheckResult::new(
            "state-contract",
            Status::Fail,
            "/var/lib/app/db: changed",
            vec![],
        ));
        let d = judge(&p, None, "factory", "v2", &s).detail;
        assert!(
            d.contains("[state] preserve: /var/lib/app/db: changed"),
            "{d}"
        );
        assert!(d.contains("default is v2, but factory booted"), "{d}");
        assert!(d.contains("v2 as a version that is not whole"), "{d}");
        assert!(d.contains("run again failed: exit 2"), "{d}");
    }

    #[test]
    fn plans_parse_and_random_points_follow_the_seed() {
        let p: Plan = "random:3:42".parse().unwrap();
        assert_eq!((p.steps, p.random, p.seed), (false, 3, 42));
        let steps = vec!["mount".to_owned(), "flush".to_owned()];
        assert_eq!(p.points(&steps, 10_000), p.points(&steps, 10_000));
        assert_eq!(p.points(&steps, 10_000).len(), 3);
        let all: Plan = "steps".parse().unwrap();
        assert_eq!(
            all.points(&steps, 1)[1],
            CutPoint::AfterStep("flush".into())
        );
        let two: Plan = "steps:flush,mount".parse().unwrap();
        assert_eq!(
            two.points(&steps, 1),
            [
                CutPoint::AfterStep("mount".into()),
                CutPoint::AfterStep("flush".into())
            ],
            "in the upgrade's order"
        );
        assert!(two.check(&steps).is_ok());
        let e = "steps:flush,sink".parse::<Plan>().unwrap().check(&steps);
        assert!(e
            .unwrap_err()
            .contains("no step \"sink\"; its steps: mount, flush"));
        assert!("steps:".parse::<Plan>().is_err());
        let all: Plan = "all:7".parse().unwrap();
        assert_eq!((all.steps, all.random, all.seed), (true, 2, 7));
        assert!("all:x".parse::<Plan>().is_err());
        let both: Plan = "steps:flush+random:1:7".parse().unwrap();
        assert_eq!((both.steps, both.random, both.seed), (true, 1, 7));
        assert_eq!(both.only, ["flush"]);
        assert_eq!(both.points(&steps, 1000).len(), 2);
        for bad in [
            "steps+steps",
            "all+random:1",
            "random:1+random:2",
            "steps:+random:1",
            "",
        ] {
            assert!(bad.parse::<Plan>().is_err(), "{bad}");
        }
        assert!("random:0".parse::<Plan>().is_err());
        assert!("sometimes".parse::<Plan>().is_err());
    }

    #[test]
    fn versions_json_is_read_with_what_is_not_whole() {
        let mut s = AfterCut::default();
        parse_versions(
            r#"{"default":"factory","versions":[{"label":"factory","status":"whole"},{"label":"v2","status":"partial"}]}"#,
            &mut s,
        )
        .unwrap();
        assert_eq!(s.versions, ["factory", "v2"]);
        assert_eq!(s.partial, ["v2"]);
        assert_eq!(s.default.as_deref(), Some("factory"));
    }
}
