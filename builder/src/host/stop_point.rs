//! Test hooks that stop strata (SIGSTOP) at a named point, so that a test
//! can SIGKILL it exactly there and look at what a crash leaves behind. The
//! step runner (`steps`) stops after a named step; host tools deep inside a
//! step (`loopdev`) stop at their own points. It lives with the host tools
//! so that they need nothing from the pipeline above them.

/// Test hook, no other effect: with `STRATA_STOP_AFTER_STEP=<step name>`
/// (a `Step::name`, e.g. `sync-rootfs`) the process stops itself with
/// SIGSTOP right after that step finished, so a test can SIGKILL it at that
/// exact step boundary and check what a crash there leaves behind.
///
/// It also names two points inside a step, where a loop device is bound
/// but not mounted: `loop-attached` (just after a loop device is attached,
/// before the mount) and `loop-unmounted` (after the unmount, before the
/// detach). Alone they stop at the first such point of the run; prefixed by
/// a step name (`mount:loop-attached`, `finish:loop-unmounted`) only at
/// the one inside that step.
pub const STOP_AFTER_STEP_ENV: &str = "STRATA_STOP_AFTER_STEP";

/// `stop_point` names: see `STOP_AFTER_STEP_ENV`.
pub const LOOP_ATTACHED: &str = "loop-attached";
pub const LOOP_UNMOUNTED: &str = "loop-unmounted";

/// The step running now, for `stop_point` (a point deep in `image::open`
/// does not see the runner); `steps::Steps` sets it.
static CURRENT_STEP: std::sync::Mutex<Option<&'static str>> = std::sync::Mutex::new(None);

/// Test hook at a point inside a step: stops the process (SIGSTOP) when
/// `STOP_AFTER_STEP_ENV` names `point`, alone or as `<step>:<point>` of
/// the step running now. No effect otherwise.
pub fn stop_point(point: &str) {
    let Ok(want) = std::env::var(STOP_AFTER_STEP_ENV) else {
        return;
    };
    let step = *CURRENT_STEP.lock().unwrap_or_else(|e| e.into_inner());
    if stop_point_matches(&want, step, point) {
        stop();
    }
}

fn stop_point_matches(want: &str, step: Option<&str>, point: &str) -> bool {
    match want.split_once(':') {
        Some((s, p)) => p == point && step == Some(s),
        None => want == point,
    }
}

/// Sets the step running now (`None` between steps); returns the one
/// before, for nested runners to put back.
pub fn enter_step(step: Option<&'static str>) -> Option<&'static str> {
    std::mem::replace(
        &mut *CURRENT_STEP.lock().unwrap_or_else(|e| e.into_inner()),
        step,
    )
}

/// Stops the process until it is continued or killed.
pub fn stop() {
    // SAFETY: raise has no preconditions; SIGSTOP cannot be caught, the
    // process simply stops until continued or killed.
    unsafe { libc::raise(libc::SIGSTOP) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_points_match_alone_or_inside_their_step() {
        assert!(stop_point_matches("loop-attached", None, LOOP_ATTACHED));
        assert!(stop_point_matches(
            "loop-attached",
            Some("mount"),
            LOOP_ATTACHED
        ));
        assert!(stop_point_matches(
            "mount:loop-attached",
            Some("mount"),
            LOOP_ATTACHED
        ));
        assert!(!stop_point_matches(
            "mount:loop-attached",
            Some("check-image"),
            LOOP_ATTACHED
        ));
        assert!(!stop_point_matches(
            "mount:loop-attached",
            None,
            LOOP_ATTACHED
        ));
        assert!(!stop_point_matches(
            "finish:loop-unmounted",
            Some("finish"),
            LOOP_ATTACHED
        ));
        assert!(!stop_point_matches("mount", Some("mount"), LOOP_ATTACHED));
    }
}
