//! The host tools strata drives, and nothing above them: processes
//! (`cmd`, `interrupt`), btrfs, loop devices, mounts, the cache directory,
//! the leftovers of killed runs (`debris`) and the libguestfs appliance
//! (`guestfish`), and the test hooks that stop strata at a named point
//! (`stop_point`). Modules here import each other and, above them, only
//! the pure `fstab` parser (mountinfo's unescaping); the pipeline (plan,
//! build, deploy, upgrade, image, versions) uses them, never the other way
//! round.

pub mod btrfs;
pub mod cache_dir;
pub mod claim;
pub mod cmd;
pub mod debris;
pub mod guestfish;
pub mod interrupt;
pub mod loopdev;
pub mod mount;
pub mod stop_point;
