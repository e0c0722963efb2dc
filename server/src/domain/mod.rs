//! The presence model, pure and I/O-free: sessions per device, the user-level
//! status, the derived visible status, versions, `last_seen` and offline
//! reasons, and what each kind of viewer may see.
//!
//! Everything here is plain data and functions over it, so that every
//! transition is tested exhaustively without a runtime, and so that every hot
//! store (embedded or Redis) runs exactly the same rules.

mod model;
mod transition;
mod view;

#[cfg(test)]
mod tests;

pub use model::*;
pub use transition::{Applied, Limits, Mutation, TransitionError, apply, apply_stepwise};
pub use view::{View, Viewer, history_view};
