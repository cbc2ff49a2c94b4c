//! Boots strata images in QEMU and checks the layout from inside the guest.

pub mod journal;
