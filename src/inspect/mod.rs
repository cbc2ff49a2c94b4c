//! The engine behind `strata inspect`: read an image's layout and find files
//! hidden under mountpoints, without booting it and without writing to it.
//!
//! - `image`: superblock check, read-only loop device and mount (RAII).
//! - `scan`: reads a mounted top level (or any directory shaped like one).
//! - the data, serialised as the `--json` output, is `strata_builder::image::model`.
//! - `render`: the human output (pure, snapshot-tested).

pub mod image;
pub mod render;
pub mod scan;
