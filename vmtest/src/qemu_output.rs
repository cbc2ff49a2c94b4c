//! Reading what QEMU prints on stderr: its own words without the CPU
//! register dumps a KVM failure or a triple fault adds, for one-line
//! reasons (`accel`, `machine`) and console tails in reports.

/// Whether a line of QEMU's output is part of a CPU register dump (what
/// follows "KVM internal error", a triple fault, ...): evidence for the
/// artifact, noise in a one-line reason.
fn register_dump(line: &str) -> bool {
    let l = line.trim_start();
    if l.starts_with("extra data[") || l.starts_with("Code=") {
        return true;
    }
    // "EAX=00000000 EBX=…", "ES =0000 …", "GDT=     …", "EFER=…", "XMM00=…"
    match l.split_once('=') {
        Some((name, _)) => {
            let name = name.trim_end();
            !name.is_empty()
                && name.len() <= 5
                && name
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
        }
        None => false,
    }
}

/// The lines of QEMU's output worth reading: not blank, not a register
/// dump (trailing white space trimmed).
fn worth_reading(output: &str) -> impl Iterator<Item = &str> {
    output
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.trim().is_empty() && !register_dump(l))
}

/// QEMU's own words: its output without register dumps, one line each,
/// the first few joined with "; ".
pub fn qemu_words(output: &str) -> String {
    const MAX: usize = 4;
    worth_reading(output)
        .map(str::trim)
        .take(MAX)
        .collect::<Vec<_>>()
        .join("; ")
}

/// The last `n` lines of QEMU's output worth reading, register dumps
/// left out.
pub fn last_lines(output: &str, n: usize) -> String {
    let lines: Vec<&str> = worth_reading(output).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
