//! Where desired state comes from. Each source builds the same model
//! (`compile::model::ClusterState`) through one shared [`store::Store`], which keeps the
//! last good version of every object; nothing here touches the kernel.

pub mod convert;
pub mod crd;
pub mod files;
pub mod kube;
pub mod store;

pub use files::{FileSource, Loaded, ObjectError};
pub use store::{Kind, Object, ObjectKey};

use crate::compile::model::ClusterState;

/// A source of cluster state, driven by the controller: `refresh` brings it up to date
/// without blocking, `state` is what it knows now (the last good state when it cannot
/// refresh).
pub trait Source: Send {
    /// Takes in what changed. Returns whether the state changed (always true when `force`).
    fn refresh(&mut self, force: bool) -> Refresh;
    /// The cluster as the source knows it.
    fn state(&self) -> &ClusterState;
    /// Objects rejected and in force as their last good version, or left out.
    fn errors(&self) -> &[ObjectError];
    /// Notes that are not errors (ignored annotations, SCTP, duplicates).
    fn warnings(&self) -> &[String];
    /// Why the source cannot refresh, while it cannot (the last state stays in force).
    fn degraded(&self) -> Option<String>;
    /// Registers what to call when the source has news to `refresh` (sources that are not
    /// pushed to, like files, are polled instead and ignore it).
    fn on_change(&mut self, _wake: Waker) {}
    /// Why the state is not complete yet (nothing may be detached on it), while it is not.
    fn ready(&self) -> Option<String> {
        None
    }
}

/// Called by a source, from any thread, when it has news.
pub type Waker = std::sync::Arc<dyn Fn() + Send + Sync>;

/// What one refresh did.
#[derive(Debug, Default)]
pub struct Refresh {
    pub changed: bool,
    /// Errors not reported before (what `tollgate_policy_errors_total` counts).
    pub new_errors: Vec<ObjectError>,
}
