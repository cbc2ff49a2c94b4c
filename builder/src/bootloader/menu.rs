//! A boot menu as read back, whatever loader wrote it: what
//! `Bootloader::read_menu` gives the image reader and `--boot direct`.

/// A boot menu read back, from any image (not only strata's).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Menu {
    pub default: Option<String>,
    pub timeout: Option<String>,
    pub entries: Vec<MenuEntry>,
}

/// One entry (an extlinux `label` stanza).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MenuEntry {
    pub label: String,
    pub kernel: Option<String>,
    /// From an `initrd` line, or syslinux's `initrd=` inside `append`.
    pub initrd: Option<String>,
    /// The `append` line as written.
    pub append: Option<String>,
}

impl MenuEntry {
    /// The kernel command line: `append` without syslinux's own `initrd=`
    /// (the loader's word, not the kernel's).
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

impl Menu {
    /// The entry the loader boots: the one named by `default`, else the
    /// first.
    pub fn default_entry(&self) -> Option<&MenuEntry> {
        self.default
            .as_deref()
            .and_then(|d| self.entries.iter().find(|e| e.label == d))
            .or_else(|| self.entries.first())
    }
}
