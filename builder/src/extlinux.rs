//! extlinux.conf, byte for byte as layout.md §4 gives it.

use crate::layout::{self, Version};

/// One boot menu entry: one deployed system version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootEntry {
    pub version: Version,
    pub root_device: String,
    pub has_initramfs: bool,
    pub kernel_args: String,
}

impl BootEntry {
    /// The kernel command line; `strata test --boot direct` uses the same.
    pub fn append(&self) -> String {
        let mut s = format!(
            "root={} rootfstype=btrfs rootflags=subvol={} init=/sbin/init rw console=tty0 console=ttyS0,115200",
            self.root_device,
            layout::rootflags_subvol(&self.version)
        );
        let extra = self.kernel_args.trim();
        if !extra.is_empty() {
            s.push(' ');
            s.push_str(extra);
        }
        s
    }
}

/// The whole menu: `default` names `default`; one stanza per entry, in the
/// order given.
pub fn render(default: &Version, entries: &[BootEntry]) -> String {
    let mut s = format!("serial 0 115200\ndefault {default}\ntimeout 10\n");
    for e in entries {
        s.push_str(&format!(
            "label {}\n  kernel {}\n",
            e.version,
            layout::boot_kernel_path(&e.version)
        ));
        if e.has_initramfs {
            s.push_str(&format!(
                "  initrd {}\n",
                layout::boot_initramfs_path(&e.version)
            ));
        }
        s.push_str(&format!("  append {}\n", e.append()));
    }
    s
}

/// An extlinux.conf read back, from any image (not only strata's).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    pub default: Option<String>,
    pub timeout: Option<String>,
    pub entries: Vec<ConfigEntry>,
}

/// One `label` stanza.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigEntry {
    pub label: String,
    pub kernel: Option<String>,
    /// From an `initrd` line, or syslinux's `initrd=` inside `append`.
    pub initrd: Option<String>,
    /// The `append` line as written.
    pub append: Option<String>,
}

impl ConfigEntry {
    /// The kernel command line: `append` without syslinux's own `initrd=`.
    pub fn cmdline(&self) -> String {
        self.append
            .as_deref()
            .unwrap_or_default()
            .split_whitespace()
            .filter(|w| !w.starts_with("initrd="))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl Config {
    /// The entry syslinux boots: the one named by `default`, else the first.
    pub fn default_entry(&self) -> Option<&ConfigEntry> {
        self.default
            .as_deref()
            .and_then(|d| self.entries.iter().find(|e| e.label == d))
            .or_else(|| self.entries.first())
    }
}

/// Parses the subset of syslinux's config language a boot menu like ours
/// uses: global `default`/`timeout`, `label` stanzas with `kernel`/`linux`,
/// `initrd` and `append`. Keywords are case-insensitive, as in syslinux.
pub fn parse(text: &str) -> Config {
    let mut config = Config::default();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = match line.split_once([' ', '\t']) {
            Some((k, v)) => (k.to_ascii_lowercase(), v.trim().to_owned()),
            None => (line.to_ascii_lowercase(), String::new()),
        };
        match (key.as_str(), config.entries.last_mut()) {
            ("default", _) => config.default = Some(value),
            ("timeout", _) => config.timeout = Some(value),
            ("label", _) => config.entries.push(ConfigEntry {
                label: value,
                kernel: None,
                initrd: None,
                append: None,
            }),
            ("kernel" | "linux", Some(e)) => e.kernel = Some(value),
            ("initrd", Some(e)) => e.initrd = Some(value),
            ("append", Some(e)) => {
                if e.initrd.is_none() {
                    e.initrd = value
                        .split_whitespace()
                        .find_map(|w| w.strip_prefix("initrd="))
                        .map(str::to_owned);
                }
                e.append = Some(value);
            }
            _ => {}
        }
    }
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_we_render_parses_back() {
        let factory = Version::new("factory").unwrap();
        let entry = BootEntry {
            version: factory.clone(),
            root_device: "UUID=x".into(),
            has_initramfs: true,
            kernel_args: "quiet".into(),
        };
        let c = parse(&render(&factory, std::slice::from_ref(&entry)));
        assert_eq!(c.timeout.as_deref(), Some("10"));
        let d = c.default_entry().unwrap();
        assert_eq!(d.kernel.as_deref(), Some("/systems/factory/kernel"));
        assert_eq!(d.initrd.as_deref(), Some("/systems/factory/initramfs"));
        assert_eq!(d.cmdline(), entry.append());
    }

    fn entry(label: &str, root: &str, initramfs: bool, args: &str) -> BootEntry {
        BootEntry {
            version: Version::new(label).unwrap(),
            root_device: root.into(),
            has_initramfs: initramfs,
            kernel_args: args.into(),
        }
    }

    /// One version: byte for byte what every build so far has written
    /// (tests/snapshots/build__extlinux.conf.snap).
    #[test]
    fn one_version_menu_is_unchanged() {
        let e = entry(
            "factory",
            "UUID=0d9c6f4e-52b1-4c6a-9e77-3f5a2b8c1d40",
            true,
            "quiet",
        );
        assert_eq!(
            render(&e.version, std::slice::from_ref(&e)),
            "serial 0 115200\n\
             default factory\n\
             timeout 10\n\
             label factory\n\
             \x20 kernel /systems/factory/kernel\n\
             \x20 initrd /systems/factory/initramfs\n\
             \x20 append root=UUID=0d9c6f4e-52b1-4c6a-9e77-3f5a2b8c1d40 rootfstype=btrfs rootflags=subvol=systems/factory/run init=/sbin/init rw console=tty0 console=ttyS0,115200 quiet\n"
        );
    }

    /// Two versions after an upgrade: one stanza each, in the order given,
    /// the default named by `default`.
    #[test]
    fn two_version_menu() {
        let factory = entry(
            "factory",
            "UUID=0d9c6f4e-52b1-4c6a-9e77-3f5a2b8c1d40",
            true,
            "",
        );
        let v2 = entry("v2", "/dev/vda", false, "quiet loglevel=3");
        insta::assert_snapshot!(render(&v2.version, &[factory, v2.clone()]));
    }

    #[test]
    fn syslinux_spellings() {
        let c = parse(
            "DEFAULT b\nLABEL a\n  LINUX /a\nlabel b\n\tkernel /b\n\tappend initrd=/b.img root=/dev/vda rw\n",
        );
        let d = c.default_entry().unwrap();
        assert_eq!(d.label, "b");
        assert_eq!(d.initrd.as_deref(), Some("/b.img"));
        assert_eq!(d.cmdline(), "root=/dev/vda rw");
        assert_eq!(c.entries[0].kernel.as_deref(), Some("/a"));
        assert_eq!(parse("label x\n").default_entry().unwrap().label, "x");
    }
}
