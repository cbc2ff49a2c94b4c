//! extlinux.conf, byte for byte as layout.md §4 gives it.

/// One boot menu entry: one deployed system version.
#[derive(Debug, Clone)]
pub struct BootEntry {
    pub label: String,
    pub root_device: String,
    pub has_initramfs: bool,
    pub kernel_args: String,
}

impl BootEntry {
    /// The kernel command line; `strata test --boot direct` uses the same.
    pub fn append(&self) -> String {
        let mut s = format!(
            "root={} rootfstype=btrfs rootflags=subvol=systems/{}/run init=/sbin/init rw console=tty0 console=ttyS0,115200",
            self.root_device, self.label
        );
        let extra = self.kernel_args.trim();
        if !extra.is_empty() {
            s.push(' ');
            s.push_str(extra);
        }
        s
    }
}

pub fn render(default_label: &str, entries: &[BootEntry]) -> String {
    let mut s = format!("serial 0 115200\ndefault {default_label}\ntimeout 10\n");
    for e in entries {
        s.push_str(&format!(
            "label {label}\n  kernel /systems/{label}/kernel\n",
            label = e.label
        ));
        if e.has_initramfs {
            s.push_str(&format!("  initrd /systems/{}/initramfs\n", e.label));
        }
        s.push_str(&format!("  append {}\n", e.append()));
    }
    s
}
