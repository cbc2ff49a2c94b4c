//! Reading an image back: its layout as data (`model`).

pub mod model;
