//! Where desired state comes from. Each source builds the same model
//! (`compile::model::ClusterState`); nothing here touches the kernel.

pub mod convert;
pub mod files;

pub use files::{FileSource, Loaded, ObjectError};
